//! Membership rules, with containers described by hand (no engine: the
//! end-to-end tests use a real one).

use std::path::Path;

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
    }
}

fn labelled(name: &str, extra: &[(&str, &str)]) -> Container {
    let mut labels = vec![(LABEL_SERVICE, "web"), (LABEL_PORT, "8080")];
    labels.extend_from_slice(extra);
    container(name, "lb-test/busybox:1", &labels)
}

#[test]
fn labels_make_a_backend_with_what_delivery_needs() {
    let (m, p) = members(&labelled("w1", &[(LABEL_WEIGHT, "3")]), &services());
    assert!(p.is_empty(), "{p:?}");
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].service, "web");
    assert_eq!(m[0].container, "w1");
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
fn malformed_labels_are_one_problem_each_and_no_member() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[(LABEL_SERVICE, "web"), (LABEL_PORT, "http")],
            "lb.port=\"http\"",
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
            &[(LABEL_SERVICE, "nope"), (LABEL_PORT, "80")],
            "no such service",
        ),
        (
            &[
                (LABEL_SERVICE, "web"),
                (LABEL_PORT, "80"),
                (LABEL_NETWORK, "x"),
            ],
            "lb.network=\"x\"",
        ),
        (&[(LABEL_PORT, "80")], "without lb.service"),
    ];
    for (labels, says) in cases {
        let (m, p) = members(&container("bad", "lb-test/busybox:1", labels), &services());
        assert!(m.is_empty(), "{labels:?} made a member: {m:?}");
        assert_eq!(p.len(), 1, "{labels:?}: {p:?}");
        let line = p[0].to_string();
        assert!(
            line.contains("container bad") && line.contains(says),
            "{labels:?}: {line}"
        );
        assert!(!line.contains('\n'));
    }
}

#[test]
fn image_rules_take_matching_images_only() {
    for image in ["lb-test/api:1", "docker.io/lb-test/api:1"] {
        let (m, p) = members(&container("a1", image, &[]), &services());
        assert!(p.is_empty(), "{p:?}");
        assert_eq!(m.len(), 1, "{image}");
        assert_eq!(m[0].service, "api");
        assert_eq!(m[0].backend.addr.port(), 9000);
    }
    for image in ["lb-test/api:2", "lb-test/api", "lb-test/busybox:1"] {
        let (m, _) = members(&container("o1", image, &[]), &services());
        assert!(m.is_empty(), "{image} joined: {m:?}");
    }
    assert_eq!(normalize_image("nginx"), "nginx:latest");
    assert_eq!(normalize_image("docker.io/library/nginx:1"), "nginx:1");
}

#[test]
fn a_container_can_join_by_label_and_by_image() {
    let c = container(
        "both",
        "lb-test/api:1",
        &[(LABEL_SERVICE, "web"), (LABEL_PORT, "8080")],
    );
    let (m, p) = members(&c, &services());
    assert!(p.is_empty(), "{p:?}");
    let joined: Vec<&str> = m.iter().map(|m| m.service.as_str()).collect();
    assert_eq!(joined, ["web", "api"]);
}

#[test]
fn unhealthy_starting_and_paused_containers_are_drained() {
    for (health, paused, drained) in [
        (Health::None, false, false),
        (Health::Healthy, false, false),
        (Health::Starting, false, true),
        (Health::Unhealthy, false, true),
        (Health::Healthy, true, true),
    ] {
        let mut c = labelled("h", &[]);
        c.health = health;
        c.paused = paused;
        let (m, _) = members(&c, &services());
        assert_eq!(m[0].backend.drained, drained, "{health:?} paused={paused}");
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
    let (m, p) = members(&c, &services());
    assert!(m.is_empty());
    assert!(p[0].0.contains("bridge, lbnet"), "{p:?}");
    c.labels.insert(LABEL_NETWORK.into(), "lbnet".into());
    let (m, p) = members(&c, &services());
    assert!(p.is_empty(), "{p:?}");
    assert_eq!(m[0].backend.addr, "198.19.1.2:8080".parse().unwrap());
    // No MAC on that network: delivery is worked out from the routing table.
    assert_eq!(m[0].backend.via, None);
    c.labels.remove(LABEL_NETWORK);
    c.networks.clear();
    let (m, p) = members(&c, &services());
    assert!(m.is_empty());
    assert!(p[0].0.contains("no IPv4 address"), "{p:?}");
}

fn member(container: &str, service: &str, ip: [u8; 4]) -> Member {
    Member {
        service: service.into(),
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
    let (fit, problems) = fit(&c.services, members, &limits);
    // One static backend plus three containers fill max_backends = 4.
    let addrs: Vec<String> = fit["web"].iter().map(|b| b.addr.to_string()).collect();
    assert_eq!(
        addrs,
        ["198.18.0.2:8080", "198.18.0.3:8080", "198.18.0.4:8080"]
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

    let (fit, problems) = fit_static_clash(&c);
    assert!(fit.is_empty());
    assert!(problems[0].0.contains("declared by hand"), "{problems:?}");
}

fn fit_static_clash(c: &Config) -> (BTreeMap<String, Vec<BackendSpec>>, Vec<Problem>) {
    let limits = Limits {
        max_services: 64,
        max_backends: 64,
        max_table_size: 65_537,
    };
    let mut m = member("clash", "static", [198, 18, 0, 9]);
    m.backend.addr = "198.18.0.9:80".parse().unwrap();
    fit(&c.services, vec![m], &limits)
}

#[test]
fn the_tracker_follows_updates_and_logs_each_problem_once() {
    let dir = std::env::temp_dir().join(format!("lb-docker-tracker-{}", std::process::id()));
    let mut desired = Desired::load(&config(), dir.join("none.json")).unwrap();
    let mut t = Tracker::new("connecting");
    assert!(t.update(DockerUpdate::Sync(vec![labelled("w1", &[])])));
    t.assign(&mut desired);
    let web = |d: &Desired| -> Vec<String> {
        d.services()
            .into_iter()
            .find(|s| s.name == "web")
            .unwrap()
            .backends
            .iter()
            .map(|b| b.addr.to_string())
            .collect()
    };
    assert_eq!(web(&desired), ["198.18.0.2:8080"]);
    assert_eq!(
        t.container("web", "198.18.0.2:8080".parse().unwrap()),
        Some("w1")
    );
    // The same list again changes nothing; a status is not a change.
    assert!(!t.update(DockerUpdate::Sync(vec![labelled("w1", &[])])));
    assert!(!t.update(DockerUpdate::Status("connected".into())));
    assert_eq!(t.status(), "connected");
    let mut bad = labelled("bad", &[(LABEL_WEIGHT, "x")]);
    bad.id = "id-bad".into();
    assert!(t.update(DockerUpdate::Upsert(bad)));
    t.assign(&mut desired);
    assert_eq!(t.reported.len(), 1);
    assert_eq!(web(&desired), ["198.18.0.2:8080"]);
    assert!(t.update(DockerUpdate::Remove("id-w1".into())));
    assert!(!t.update(DockerUpdate::Remove("id-w1".into())));
    t.assign(&mut desired);
    assert!(web(&desired).is_empty());
    // Docker's backends are never written to the state file.
    assert!(!dir.join("none.json").exists());
}
