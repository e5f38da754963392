//! Membership rules, with containers described by hand (no engine: the
//! end-to-end tests use a real one).

use std::{
    io,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, UNIX_EPOCH},
};

use super::*;
use crate::config::Config;

fn config() -> Config {
    Config::parse(
        Path::new("lb.toml"),
        r#"
[datapath]
external = ["eth1"]
max_backends = 4

[[service]]
name = "web"
vip = "198.18.101.1:80"

[[service]]
name = "api"
vip = "198.18.101.2:80"
image = "lb-test/api:1"
target_port = 9000

[[service]]
name = "static"
vip = "198.18.101.3:80"
backends = ["198.18.0.9:80"]
"#,
    )
    .unwrap()
}

fn services() -> Vec<ServiceSpec> {
    config().services
}

const MAC: [u8; 6] = [2, 0x42, 198, 18, 0, 2];
const API: &str = "lb-test/api:1";
const OTHER: &str = "lb-test/busybox:1";

fn container(name: &str, image: &str, labels: &[(&str, &str)]) -> Container {
    Container {
        id: format!("id-{name}"),
        name: name.into(),
        image: image.into(),
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        networks: BTreeMap::from([(
            "bridge".to_owned(),
            Endpoint {
                ip: Ipv4Addr::new(198, 18, 0, 2),
                mac: Some(MAC),
            },
        )]),
        pid: 4242,
        paused: false,
        health: Health::None,
        stop_signal: libc::SIGTERM,
        stopping: false,
    }
}

fn labelled(name: &str, extra: &[(&str, &str)]) -> Container {
    let mut labels = vec![(LABEL_SERVICE, "web"), (LABEL_PORT, "8080")];
    labels.extend_from_slice(extra);
    container(name, OTHER, &labels)
}

/// The services `c` serves; panics on a problem.
fn served(c: &Container) -> Vec<Member> {
    members(c, &services()).unwrap_or_else(|p| panic!("{}: {p}", c.name))
}

/// Why `c` serves nothing; panics if it is not skipped.
fn skipped(c: &Container) -> String {
    match members(c, &services()) {
        Ok(m) => panic!("{} was not skipped: {m:?}", c.name),
        Err(p) => p.to_string(),
    }
}

#[test]
fn labels_make_a_backend_with_what_delivery_needs() {
    let m = served(&labelled("w1", &[(LABEL_WEIGHT, "3")]));
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].service, "web");
    assert_eq!(m[0].container, "w1");
    assert_eq!(m[0].container_id, "id-w1");
    let b = m[0].backend;
    assert_eq!(b.addr, "198.18.0.2:8080".parse().unwrap());
    assert_eq!(b.weight, 3);
    assert!(!b.drained);
    assert_eq!(
        b.via,
        Some(Via {
            pid: 4242,
            mac: MAC
        })
    );
}

#[test]
fn a_label_beats_an_image_rule() {
    // Its image matches api's rule, but it names web: web alone.
    let c = container("both", API, &[(LABEL_SERVICE, "web"), (LABEL_PORT, "8080")]);
    let m = served(&c);
    let joined: Vec<&str> = m.iter().map(|m| m.service.as_str()).collect();
    assert_eq!(joined, ["web"]);
    assert_eq!(m[0].backend.addr.port(), 8080);
    // Naming the rule's own service by label: once, on the label's port.
    let c = container(
        "api-l",
        API,
        &[(LABEL_SERVICE, "api"), (LABEL_PORT, "7000")],
    );
    let m = served(&c);
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].backend.addr.port(), 7000);
}

#[test]
fn a_label_naming_no_service_serves_nothing_until_it_exists() {
    let c = container(
        "early",
        API,
        &[(LABEL_SERVICE, "later"), (LABEL_PORT, "80")],
    );
    let why = skipped(&c);
    assert!(
        why.contains("container early") && why.contains("lb.service=\"later\": no such service"),
        "{why}"
    );
    // Not the image rule's service meanwhile.
    let mut with_later = services();
    let mut later = with_later[0].clone();
    later.name = "later".into();
    later.vip = "198.18.101.9:80".parse().unwrap();
    with_later.push(later);
    let m = members(&c, &with_later).unwrap();
    let joined: Vec<&str> = m.iter().map(|m| m.service.as_str()).collect();
    assert_eq!(joined, ["later"]);
}

#[test]
fn a_malformed_label_serves_nothing_whatever_the_image() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[(LABEL_SERVICE, "web"), (LABEL_PORT, "http")],
            "lb.port=\"http\" is not a port",
        ),
        (
            &[(LABEL_SERVICE, "web"), (LABEL_PORT, "0")],
            "lb.port=\"0\"",
        ),
        (
            &[(LABEL_SERVICE, "web"), (LABEL_PORT, "70000")],
            "lb.port=\"70000\"",
        ),
        (&[(LABEL_SERVICE, "web")], "without lb.port"),
        (
            &[(LABEL_SERVICE, ""), (LABEL_PORT, "80")],
            "lb.service is empty",
        ),
        (
            &[
                (LABEL_SERVICE, "web"),
                (LABEL_PORT, "80"),
                (LABEL_WEIGHT, "0"),
            ],
            "lb.weight=\"0\"",
        ),
        (
            &[
                (LABEL_SERVICE, "web"),
                (LABEL_PORT, "80"),
                (LABEL_WEIGHT, "-2"),
            ],
            "lb.weight=\"-2\"",
        ),
        (
            &[
                (LABEL_SERVICE, "web"),
                (LABEL_PORT, "80"),
                (LABEL_NETWORK, "x"),
            ],
            "lb.network=\"x\" is not one of its networks (bridge)",
        ),
        (&[(LABEL_PORT, "80")], "lb.port=\"80\" without lb.service"),
        (&[(LABEL_WEIGHT, "many")], "lb.weight=\"many\""),
        (&[(LABEL_NETWORK, "x")], "lb.network=\"x\""),
        (&[("lb.wieght", "2")], "label lb.wieght is not one of"),
    ];
    for (labels, says) in cases {
        // With an image no rule takes, and with the image of api's rule:
        // the rule does not take a container whose labels are wrong.
        for image in [OTHER, API] {
            let why = skipped(&container("bad", image, labels));
            assert!(
                why.contains("container bad skipped, serves no service") && why.contains(says),
                "{labels:?} {image}: {why}"
            );
            assert!(!why.contains('\n'));
        }
    }
}

#[test]
fn every_malformed_label_is_named_in_one_line() {
    let c = container(
        "worse",
        API,
        &[
            (LABEL_SERVICE, "web"),
            (LABEL_PORT, "abc"),
            (LABEL_WEIGHT, "0"),
        ],
    );
    let why = skipped(&c);
    assert!(
        why.contains("lb.port=\"abc\"") && why.contains("lb.weight=\"0\""),
        "{why}"
    );
}

#[test]
fn image_rules_take_matching_images_only() {
    for image in [API, "docker.io/lb-test/api:1"] {
        let m = served(&container("a1", image, &[]));
        assert_eq!(m.len(), 1, "{image}");
        assert_eq!(m[0].service, "api");
        assert_eq!(m[0].backend.addr.port(), 9000);
        assert_eq!(m[0].backend.weight, 1);
    }
    for image in ["lb-test/api:2", "lb-test/api", OTHER] {
        assert!(served(&container("o1", image, &[])).is_empty(), "{image}");
    }
    assert_eq!(normalize_image("nginx"), "nginx:latest");
    assert_eq!(normalize_image("docker.io/library/nginx:1"), "nginx:1");
}

#[test]
fn weight_and_network_apply_to_an_image_rule_too() {
    let mut c = container("a2", API, &[(LABEL_WEIGHT, "3")]);
    c.networks.insert(
        "lbnet".into(),
        Endpoint {
            ip: Ipv4Addr::new(198, 19, 1, 2),
            mac: None,
        },
    );
    // Two networks and no lb.network: which one is not guessed.
    assert!(skipped(&c).contains("several networks (bridge, lbnet)"));
    c.labels.insert(LABEL_NETWORK.into(), "lbnet".into());
    let m = served(&c);
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].service, "api");
    assert_eq!(m[0].backend.weight, 3);
    assert_eq!(m[0].backend.addr, "198.19.1.2:9000".parse().unwrap());
}

#[test]
fn labels_nothing_takes_are_said() {
    // lb.weight on a container no rule takes: it asked for something.
    let why = skipped(&container("w", OTHER, &[(LABEL_WEIGHT, "2")]));
    assert!(
        why.contains("lb.weight is set") && why.contains("no image rule"),
        "{why}"
    );
    // A container with no lb.* label that nothing takes is no problem.
    assert!(served(&container("plain", OTHER, &[("other", "x")])).is_empty());
}

#[test]
fn unhealthy_starting_and_paused_containers_are_drained() {
    for (health, paused, drained) in [
        (Health::None, false, None),
        (Health::Healthy, false, None),
        (Health::Starting, false, Some("health check starting")),
        (Health::Unhealthy, false, Some("health check failing")),
        (Health::Healthy, true, Some("paused")),
    ] {
        let mut c = labelled("h", &[]);
        c.health = health;
        c.paused = paused;
        assert_eq!(c.drained_by(), drained);
        let m = served(&c);
        assert_eq!(
            m[0].backend.drained,
            drained.is_some(),
            "{health:?} paused={paused}"
        );
    }
}

#[test]
fn networks_must_be_chosen_when_there_are_several() {
    let mut c = labelled("n", &[]);
    c.networks.insert(
        "lbnet".into(),
        Endpoint {
            ip: Ipv4Addr::new(198, 19, 1, 2),
            mac: None,
        },
    );
    assert!(skipped(&c).contains("bridge, lbnet"));
    c.labels.insert(LABEL_NETWORK.into(), "lbnet".into());
    let m = served(&c);
    assert_eq!(m[0].backend.addr, "198.19.1.2:8080".parse().unwrap());
    // No MAC on that network: delivery is worked out from the routing table.
    assert_eq!(m[0].backend.via, None);
    c.labels.remove(LABEL_NETWORK);
    c.networks.clear();
    assert!(skipped(&c).contains("no IPv4 address"));
}

fn member(container: &str, service: &str, ip: [u8; 4]) -> Member {
    Member {
        service: service.into(),
        container_id: format!("id-{container}"),
        container: container.into(),
        backend: BackendSpec {
            addr: SocketAddrV4::new(ip.into(), 8080),
            weight: 1,
            drained: false,
            via: None,
        },
    }
}

#[test]
fn fit_keeps_within_the_limits_and_says_who_is_left_out() {
    let c = config();
    let limits = Limits {
        max_services: c.datapath.max_services,
        max_backends: c.datapath.max_backends,
        max_table_size: c.datapath.max_table_size,
    };
    let members = vec![
        member("c4", "web", [198, 18, 0, 5]),
        member("c1", "web", [198, 18, 0, 2]),
        member("c2", "web", [198, 18, 0, 3]),
        member("c3", "web", [198, 18, 0, 4]),
        member("dup", "web", [198, 18, 0, 2]),
        member("ghost", "gone", [198, 18, 0, 6]),
    ];
    let (kept, problems) = fit(&c.services, members, &limits);
    // One static backend plus three containers fill max_backends = 4.
    let kept: Vec<String> = kept
        .iter()
        .map(|m| format!("{} {}", m.container, m.backend.addr))
        .collect();
    assert_eq!(
        kept,
        [
            "c1 198.18.0.2:8080",
            "c2 198.18.0.3:8080",
            "c3 198.18.0.4:8080"
        ]
    );
    let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
    assert_eq!(text.len(), 2, "{text:#?}");
    assert!(
        text[0].contains("c4") && text[0].contains("max_backends"),
        "{text:#?}"
    );
    assert!(
        text[1].contains("dup") && text[1].contains("same address"),
        "{text:#?}"
    );

    let limits = Limits {
        max_services: 64,
        max_backends: 64,
        max_table_size: 65_537,
    };
    let mut m = member("clash", "static", [198, 18, 0, 9]);
    m.backend.addr = "198.18.0.9:80".parse().unwrap();
    let (kept, problems) = fit(&c.services, vec![m], &limits);
    assert!(kept.is_empty());
    assert!(problems[0].0.contains("declared by hand"), "{problems:?}");
}

/// What `tracing` writes while `f` runs, without colours.
fn logs(f: impl FnOnce()) -> String {
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::with_default(subscriber, f);
    let out = buf.0.lock().unwrap().clone();
    String::from_utf8(out).unwrap()
}

/// The lines of `log` that mention `what`.
fn lines<'a>(log: &'a str, what: &str) -> Vec<&'a str> {
    log.lines().filter(|l| l.contains(what)).collect()
}

/// Web's backends in `d`.
fn web_backends(d: &Desired) -> &[BackendSpec] {
    &d.specs().find(|s| s.name == "web").unwrap().backends
}

fn web(d: &Desired) -> Vec<String> {
    web_backends(d).iter().map(|b| b.to_string()).collect()
}

fn sync(containers: Vec<Container>, secs: u64) -> DockerUpdate {
    DockerUpdate::Sync {
        containers,
        at: UNIX_EPOCH + Duration::from_secs(secs),
    }
}

#[test]
fn the_tracker_follows_updates_and_says_what_serves() {
    let dir = std::env::temp_dir().join(format!("lb-docker-tracker-{}", std::process::id()));
    let mut desired = Desired::load(&config(), dir.join("none.json")).unwrap();
    let mut t = Tracker::new("connecting");
    assert_eq!(t.listed_at(), None);
    let mut w2 = labelled("w2", &[(LABEL_WEIGHT, "2")]);
    w2.networks.get_mut("bridge").unwrap().ip = Ipv4Addr::new(198, 18, 0, 3);
    let plain = container("a1", API, &[]);
    let bad = container("bad", API, &[(LABEL_SERVICE, "web"), (LABEL_PORT, "abc")]);
    assert!(t.update(sync(
        vec![labelled("w1", &[]), w2, plain.clone(), bad],
        1_000
    )));
    t.assign(&mut desired);
    assert_eq!(web(&desired), ["198.18.0.2:8080", "198.18.0.3:8080@2"]);
    assert_eq!(
        t.container("web", "198.18.0.2:8080".parse().unwrap()),
        Some("w1")
    );
    assert_eq!(t.running(), 4);
    assert_eq!(t.serving_containers(), 3);
    assert_eq!(
        t.serving(),
        BTreeMap::from([
            ("api".to_owned(), vec!["a1".to_owned()]),
            ("web".to_owned(), vec!["w1".to_owned(), "w2".to_owned()]),
        ])
    );
    assert_eq!(t.skipped(), ["bad"]);
    assert_eq!(t.listed_at(), Some(UNIX_EPOCH + Duration::from_secs(1_000)));
    // The same list again changes nothing but the time; a status is not a
    // change.
    let again = vec![labelled("w1", &[])];
    assert!(t.update(sync(again.clone(), 2_000)));
    assert!(!t.update(sync(again, 3_000)));
    assert_eq!(t.listed_at(), Some(UNIX_EPOCH + Duration::from_secs(3_000)));
    assert!(!t.update(DockerUpdate::Status("connected".into())));
    assert_eq!(t.status(), "connected");
    t.assign(&mut desired);
    assert!(t.skipped().is_empty());
    assert!(t.update(DockerUpdate::Remove {
        id: "id-w1".into(),
        why: "die".into()
    }));
    assert!(!t.update(DockerUpdate::Remove {
        id: "id-w1".into(),
        why: "destroy".into()
    }));
    t.assign(&mut desired);
    assert!(web(&desired).is_empty());
    assert_eq!(t.serving_containers(), 0);
    // Docker's backends are never written to the state file.
    assert!(!dir.join("none.json").exists());
}

#[test]
fn each_membership_event_is_logged_once_naming_the_container() {
    let dir = std::env::temp_dir().join(format!("lb-docker-events-{}", std::process::id()));
    let mut desired = Desired::load(&config(), dir.join("none.json")).unwrap();
    let mut t = Tracker::new("connected");
    let w1 = labelled("w1", &[]);
    let bad = container("bad", API, &[(LABEL_SERVICE, "web"), (LABEL_PORT, "abc")]);
    let log = logs(|| {
        t.update(sync(vec![w1.clone(), bad.clone()], 1));
        t.assign(&mut desired);
        // A resync with the same containers, and assignments with nothing
        // new (a service change elsewhere): nothing more is said.
        t.update(sync(vec![w1.clone(), bad.clone()], 2));
        t.assign(&mut desired);
        t.assign(&mut desired);
    });
    let joined = lines(&log, "container joined");
    assert_eq!(joined.len(), 1, "{log}");
    assert!(
        joined[0].contains("w1")
            && joined[0].contains("web")
            && joined[0].contains("198.18.0.2:8080"),
        "{log}"
    );
    let about_bad = lines(&log, "bad");
    assert_eq!(about_bad.len(), 1, "{log}");
    assert!(
        about_bad[0].contains("WARN") && about_bad[0].contains("lb.port=\"abc\""),
        "{log}"
    );

    let mut paused = w1.clone();
    paused.paused = true;
    let mut sick = w1.clone();
    sick.health = Health::Unhealthy;
    let log = logs(|| {
        t.update(DockerUpdate::Upsert(paused.clone()));
        t.assign(&mut desired);
        t.assign(&mut desired);
        t.update(DockerUpdate::Upsert(w1.clone()));
        t.assign(&mut desired);
        t.update(DockerUpdate::Upsert(sick.clone()));
        t.assign(&mut desired);
        t.update(DockerUpdate::Remove {
            id: w1.id.clone(),
            why: "die".into(),
        });
        t.assign(&mut desired);
    });
    let events: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("w1"))
        .map(|l| {
            ["container drained", "container back", "container left"]
                .into_iter()
                .find(|e| l.contains(e))
                .unwrap_or(l)
        })
        .collect();
    assert_eq!(
        events,
        [
            "container drained",
            "container back",
            "container drained",
            "container left"
        ],
        "{log}"
    );
    let drained = lines(&log, "container drained");
    assert!(drained[0].contains("paused"), "{log}");
    assert!(drained[1].contains("health check failing"), "{log}");
    assert!(lines(&log, "container left")[0].contains("die"), "{log}");
}

#[test]
fn leaving_says_why() {
    let dir = std::env::temp_dir().join(format!("lb-docker-why-{}", std::process::id()));
    let mut desired = Desired::load(&config(), dir.join("none.json")).unwrap();
    let mut t = Tracker::new("connected");
    let a1 = container("a1", API, &[]);
    let mut a2 = container("a2", API, &[]);
    a2.networks.get_mut("bridge").unwrap().ip = Ipv4Addr::new(198, 18, 0, 3);
    t.update(sync(vec![a1.clone(), a2.clone()], 1));
    let log = logs(|| {
        // a2 died while the engine was out of reach: the next list lacks it.
        t.assign(&mut desired);
        t.update(sync(vec![a1.clone()], 2));
        t.assign(&mut desired);
    });
    let left = lines(&log, "container left");
    assert_eq!(left.len(), 1, "{log}");
    assert!(
        left[0].contains("a2") && left[0].contains("not running at the engine's last list"),
        "{log}"
    );
    assert_eq!(lines(&log, "container joined").len(), 2, "{log}");
}

/// Whether web's backend `addr` is drained in `d`.
fn drained(d: &Desired, addr: &str) -> bool {
    web_backends(d)
        .iter()
        .find(|b| b.addr.to_string() == addr)
        .unwrap_or_else(|| panic!("{addr} not in web"))
        .drained
}

#[test]
fn a_container_asked_to_stop_is_drained_until_it_is_gone_or_restarted() {
    let dir = std::env::temp_dir().join(format!("lb-docker-stop-{}", std::process::id()));
    let mut desired = Desired::load(&config(), dir.join("none.json")).unwrap();
    let mut t = Tracker::new("connected");
    let mut nginx = labelled("w1", &[]);
    nginx.stop_signal = libc::SIGQUIT;
    t.update(sync(vec![nginx.clone()], 1));
    t.assign(&mut desired);
    let addr = "198.18.0.2:8080";
    assert!(!drained(&desired, addr));

    // Signals that do not stop it change nothing.
    for signal in [libc::SIGHUP, libc::SIGUSR1, libc::SIGWINCH] {
        assert!(!t.update(DockerUpdate::Kill {
            id: nginx.id.clone(),
            signal
        }));
    }
    // Its own stop signal drains it, at once; once is enough.
    assert!(t.update(DockerUpdate::Kill {
        id: nginx.id.clone(),
        signal: libc::SIGQUIT
    }));
    assert!(!t.update(DockerUpdate::Kill {
        id: nginx.id.clone(),
        signal: libc::SIGKILL
    }));
    t.assign(&mut desired);
    assert!(drained(&desired, addr));
    // A health report of the same process keeps it drained; so does a list.
    let mut healthy = nginx.clone();
    healthy.health = Health::Healthy;
    t.update(DockerUpdate::Upsert(healthy.clone()));
    t.update(sync(vec![healthy.clone()], 2));
    t.assign(&mut desired);
    assert!(drained(&desired, addr));
    // A restart is another process: it serves again.
    let mut restarted = healthy.clone();
    restarted.pid += 1;
    assert!(t.update(DockerUpdate::Upsert(restarted)));
    t.assign(&mut desired);
    assert!(!drained(&desired, addr));
    // SIGTERM stops any container; a signal to an unknown one is nothing.
    assert!(t.update(DockerUpdate::Kill {
        id: nginx.id.clone(),
        signal: libc::SIGTERM
    }));
    assert!(!t.update(DockerUpdate::Kill {
        id: "id-unknown".into(),
        signal: libc::SIGTERM
    }));
    t.assign(&mut desired);
    assert!(drained(&desired, addr));
}

#[test]
fn stop_signals_as_docker_writes_them() {
    assert!(stops(libc::SIGTERM, libc::SIGWINCH));
    assert!(stops(libc::SIGWINCH, libc::SIGWINCH));
    assert!(!stops(libc::SIGHUP, libc::SIGTERM));
}

#[test]
fn the_tracker_notes_the_docker_event_behind_each_containers_change() {
    let mut t = Tracker::new("connected");
    let w1 = labelled("w1", &[]);
    assert!(t.update(sync(vec![w1.clone()], 1)));
    assert_eq!(
        t.take_causes(),
        HashMap::from([("w1".to_owned(), Reason::DockerList)]),
        "what a list showed"
    );
    assert!(t.take_causes().is_empty(), "taken once");

    let w2 = labelled("w2", &[]);
    t.update(DockerUpdate::Upsert(w2.clone()));
    let mut paused = w1.clone();
    paused.paused = true;
    t.update(DockerUpdate::Upsert(paused.clone()));
    assert_eq!(
        t.take_causes(),
        HashMap::from([
            ("w2".to_owned(), Reason::DockerStart),
            ("w1".to_owned(), Reason::DockerPause),
        ])
    );
    t.update(DockerUpdate::Upsert(w1.clone()));
    let mut unhealthy = w2.clone();
    unhealthy.health = Health::Unhealthy;
    t.update(DockerUpdate::Upsert(unhealthy));
    assert_eq!(
        t.take_causes(),
        HashMap::from([
            ("w1".to_owned(), Reason::DockerUnpause),
            ("w2".to_owned(), Reason::DockerHealth),
        ])
    );
    // The same process started again is a start; a stop signal a kill.
    let mut restarted = w1.clone();
    restarted.pid += 1;
    t.update(DockerUpdate::Upsert(restarted.clone()));
    t.update(DockerUpdate::Kill {
        id: w2.id.clone(),
        signal: libc::SIGTERM,
    });
    assert_eq!(
        t.take_causes(),
        HashMap::from([
            ("w1".to_owned(), Reason::DockerStart),
            ("w2".to_owned(), Reason::DockerKill),
        ])
    );
    for (why, reason) in [("die", Reason::DockerDie), ("stop", Reason::DockerStop)] {
        let c = labelled(&format!("gone-{why}"), &[]);
        t.update(DockerUpdate::Upsert(c.clone()));
        t.take_causes();
        t.update(DockerUpdate::Remove {
            id: c.id,
            why: why.into(),
        });
        assert_eq!(t.take_causes(), HashMap::from([(c.name, reason)]));
    }
    // Nothing new, nothing noted.
    assert!(!t.update(DockerUpdate::Upsert(restarted)));
    assert!(t.take_causes().is_empty());
}

#[test]
fn a_label_key_with_a_line_break_is_one_problem_line() {
    // Found by the property test below: the key was quoted as it is.
    let p = skipped(&labelled("k", &[("lb.x\nlb.service=web", "1")]));
    assert!(!p.contains(['\n', '\r']), "{p:?}");
    assert!(
        p.contains(r"label lb.x\nlb.service=web is not one of"),
        "{p}"
    );
}

mod properties {
    use proptest::{collection::btree_map, prelude::*, sample::select};

    use super::*;
    use crate::inputs::{one_clear_line, text};

    fn key() -> impl Strategy<Value = String> {
        prop_oneof![
            select(LABELS.to_vec()).prop_map(String::from),
            text().prop_map(|t| format!("lb.{t}")),
            text(),
        ]
    }

    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            select(vec!["web", "api", "8080", "0", "2", "bridge", "other"]).prop_map(String::from),
            text(),
        ]
    }

    /// One change to a well-formed label set.
    #[derive(Clone, Debug)]
    enum Mutation {
        Remove(usize),
        Value(usize, String),
        Key(usize, String),
        Add(String, String),
    }

    fn mutation() -> impl Strategy<Value = Mutation> {
        prop_oneof![
            (0..4usize).prop_map(Mutation::Remove),
            (0..4usize, value()).prop_map(|(i, v)| Mutation::Value(i, v)),
            (0..4usize, key()).prop_map(|(i, k)| Mutation::Key(i, k)),
            (key(), value()).prop_map(|(k, v)| Mutation::Add(k, v)),
        ]
    }

    /// `c` on one network, or on two (so `lb.network` must choose).
    fn on_networks(mut c: Container, two: bool) -> Container {
        if two {
            c.networks.insert(
                "other".into(),
                Endpoint {
                    ip: Ipv4Addr::new(198, 19, 0, 2),
                    mac: None,
                },
            );
        }
        c
    }

    /// Serves, with a usable backend, or gives one clear problem.
    fn check(c: &Container) -> Result<(), TestCaseError> {
        match members(c, &services()) {
            Ok(ms) => {
                for m in ms {
                    prop_assert!(m.backend.weight >= 1);
                    prop_assert!(m.backend.addr.port() != 0);
                }
                Ok(())
            }
            Err(p) => one_clear_line("labels", &p.0),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn any_labels_serve_or_give_one_clear_problem(
            labels in btree_map(key(), value(), 0..6),
            image in select(vec![API, OTHER]),
            two in any::<bool>(),
        ) {
            let mut c = on_networks(container("c1", image, &[]), two);
            c.labels = labels;
            check(&c)?;
        }

        #[test]
        fn well_formed_labels_with_one_change(m in mutation(), two in any::<bool>()) {
            let mut labels: Vec<(String, String)> = [
                (LABEL_SERVICE, "web"),
                (LABEL_PORT, "8080"),
                (LABEL_WEIGHT, "2"),
                (LABEL_NETWORK, "bridge"),
            ]
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
            match m {
                Mutation::Remove(i) => {
                    labels.remove(i);
                }
                Mutation::Value(i, v) => labels[i].1 = v,
                Mutation::Key(i, k) => labels[i].0 = k,
                Mutation::Add(k, v) => labels.push((k, v)),
            }
            let mut c = on_networks(container("c1", OTHER, &[]), two);
            c.labels = labels.into_iter().collect();
            check(&c)?;
        }
    }
}
