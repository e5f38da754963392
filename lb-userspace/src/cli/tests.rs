//! Command line parsing: what clap accepts, what it refuses (exit 2), and
//! the request bodies built from it.

use std::{path::PathBuf, time::Duration};

use clap::{CommandFactory as _, Parser as _};

use super::{
    args::{BackendCommand, HealthKind, Proto, ServiceCommand},
    stats_path, url_segment, Admin, Cli, Command,
};
use crate::api::types::{CheckKind, Forwarding, HealthCheck, NewBackend, NewService, Protocol};

fn parse(args: &[&str]) -> Cli {
    match Cli::try_parse_from(std::iter::once("lb").chain(args.iter().copied())) {
        Ok(c) => c,
        Err(e) => panic!("{args:?}: {e}"),
    }
}

/// The exit code clap gives `args`, which must not parse.
fn refused(args: &[&str]) -> i32 {
    match Cli::try_parse_from(std::iter::once("lb").chain(args.iter().copied())) {
        Ok(c) => panic!("{args:?} parsed: {c:?}"),
        Err(e) => e.exit_code(),
    }
}

fn admin(args: &[&str]) -> Admin {
    match parse(args).command {
        Command::Admin(a) => a,
        other => panic!("{args:?}: {other:?}"),
    }
}

fn service_add(args: &[&str]) -> NewService {
    match admin(args) {
        Admin::Service(ServiceCommand::Add(a)) => a.to_request(),
        other => panic!("{args:?}: {other:?}"),
    }
}

#[test]
fn the_command_line_is_consistent() {
    Cli::command().debug_assert();
}

#[test]
fn service_add_minimal_leaves_defaults_to_the_daemon() {
    assert_eq!(
        service_add(&["service", "add", "api", "--vip", "198.18.101.2:80"]),
        NewService {
            name: "api".into(),
            vip: "198.18.101.2:80".into(),
            protocol: None,
            table_size: None,
            image: None,
            target_port: None,
            health: None,
            forwarding: None,
        }
    );
}

#[test]
fn service_add_everything() {
    let req = service_add(&[
        "service",
        "add",
        "api",
        "--vip",
        "198.18.101.2:53",
        "--proto",
        "udp",
        "--table-size",
        "251",
        "--forwarding",
        "dsr",
        "--image",
        "nginx:1.25",
        "--target-port",
        "8080",
        "--health",
        "tcp",
        "--health-interval",
        "200",
        "--health-fall",
        "5",
    ]);
    assert_eq!(
        req,
        NewService {
            name: "api".into(),
            vip: "198.18.101.2:53".into(),
            protocol: Some(Protocol::Udp),
            table_size: Some(251),
            image: Some("nginx:1.25".into()),
            target_port: Some(8080),
            health: Some(HealthCheck {
                interval_ms: 200,
                fall: 5,
                ..HealthCheck::default()
            }),
            forwarding: Some(Forwarding::Dsr),
        }
    );
}

#[test]
fn health_tcp_alone_uses_the_api_defaults() {
    let req = service_add(&[
        "service",
        "add",
        "a",
        "--vip",
        "1.2.3.4:80",
        "--health",
        "tcp",
    ]);
    assert_eq!(req.health, Some(HealthCheck::default()));
}

#[test]
fn health_http_and_udp_carry_their_probe() {
    let req = service_add(&[
        "service",
        "add",
        "a",
        "--vip",
        "1.2.3.4:80",
        "--health",
        "http",
        "--health-path",
        "/healthz",
        "--health-status",
        "204",
    ]);
    assert_eq!(
        req.health,
        Some(HealthCheck {
            kind: CheckKind::Http,
            path: Some("/healthz".into()),
            status: Some(204),
            ..HealthCheck::default()
        })
    );
    let req = service_add(&[
        "service",
        "add",
        "dns",
        "--vip",
        "1.2.3.4:53",
        "--proto",
        "udp",
        "--health",
        "udp",
        "--health-payload",
        "ping",
    ]);
    assert_eq!(
        req.health,
        Some(HealthCheck {
            kind: CheckKind::Udp,
            payload: Some("ping".into()),
            ..HealthCheck::default()
        })
    );
}

#[test]
fn help_states_the_health_defaults() {
    let d = HealthCheck::default();
    let help = Cli::command()
        .find_subcommand_mut("service")
        .and_then(|s| s.find_subcommand_mut("add"))
        .expect("lb service add")
        .render_help()
        .to_string();
    for (flag, value) in [
        ("--health-interval", d.interval_ms.to_string()),
        ("--health-timeout", d.timeout_ms.to_string()),
        ("--health-rise", d.rise.to_string()),
        ("--health-fall", d.fall.to_string()),
    ] {
        let line = help
            .lines()
            .skip_while(|l| !l.contains(flag))
            .take(3)
            .collect::<String>();
        assert!(
            line.contains(&format!("[default: {value}]")),
            "{flag}: {line}"
        );
    }
}

#[test]
fn usage_errors_exit_2() {
    let add = ["service", "add", "api", "--vip", "198.18.101.2:80"];
    let with = |extra: &[&'static str]| -> Vec<&'static str> {
        add.iter().chain(extra).copied().collect()
    };
    for bad in [
        with(&["--target-port", "70000"]),
        with(&["--target-port", "-1"]),
        with(&["--proto", "sctp"]),
        with(&["--table-size", "big"]),
        with(&["--health", "icmp"]),
        with(&["--health-interval", "100"]), // needs --health
        with(&["--health-path", "/"]),       // needs --health
        with(&["--health", "http", "--health-status", "70000"]),
        with(&["--health", "tcp", "--health-rise", "-2"]),
        vec!["service", "add", "api"],                 // no --vip
        vec!["service", "add", "--vip", "1.2.3.4:80"], // no name
        vec!["service", "add", "", "--vip", "1.2.3.4:80"],
        vec!["service", "rm"],
        vec!["service"],
        vec!["service", "frob"],
        vec!["backend", "add", "api"],
        vec!["backend", "add", "api", "198.18.7.1:80", "--weight", "-1"],
        vec![
            "backend",
            "add",
            "api",
            "198.18.7.1:80",
            "--weight",
            "4294967296",
        ],
        vec!["backend", "rm", "api"],
        vec!["backend", "drain"],
        vec!["backend", "ls"],
        vec!["stats", "--interval", "2"], // needs --watch
        vec!["stats", "--watch", "--interval", "0"],
        vec!["stats", "--watch", "--interval", "soon"],
        vec!["stats", "a", "b"],
        vec!["status", "extra"],
        vec!["completions"],
        vec!["completions", "tcsh"],
        vec!["bogus"],
        vec![],
    ] {
        assert_eq!(refused(&bad), 2, "{bad:?}");
    }
}

#[test]
fn backends() {
    match admin(&["backend", "add", "api", "198.18.7.1:8080", "--weight", "3"]) {
        Admin::Backend(BackendCommand::Add(a)) => {
            assert_eq!(a.service, "api");
            assert_eq!(
                a.to_request(),
                [NewBackend {
                    address: "198.18.7.1:8080".into(),
                    weight: Some(3)
                }]
            );
        }
        other => panic!("{other:?}"),
    }
    match admin(&["backend", "add", "api", "198.18.7.1:80", "198.18.7.2:80"]) {
        Admin::Backend(BackendCommand::Add(a)) => {
            let addrs: Vec<String> = a.to_request().into_iter().map(|b| b.address).collect();
            assert_eq!(addrs, ["198.18.7.1:80", "198.18.7.2:80"]);
        }
        other => panic!("{other:?}"),
    }
    match admin(&["backend", "set", "api"]) {
        Admin::Backend(BackendCommand::Set(s)) => assert!(s.to_request().is_empty()),
        other => panic!("{other:?}"),
    }
    match admin(&["backend", "weight", "api", "198.18.7.1:80", "5"]) {
        Admin::Backend(BackendCommand::Weight(w)) => assert_eq!(w.weight, 5),
        other => panic!("{other:?}"),
    }
    match admin(&["backend", "undrain", "api", "198.18.7.1:80"]) {
        Admin::Backend(BackendCommand::Undrain(b)) => assert_eq!(b.address, "198.18.7.1:80"),
        other => panic!("{other:?}"),
    }
    match admin(&["backend", "add", "api", "198.18.7.1:8080"]) {
        Admin::Backend(BackendCommand::Add(a)) => assert_eq!(a.weight, None),
        other => panic!("{other:?}"),
    }
    match admin(&["backend", "drain", "api", "198.18.7.1:8080"]) {
        Admin::Backend(BackendCommand::Drain(b)) => {
            assert_eq!(
                (b.service.as_str(), b.address.as_str()),
                ("api", "198.18.7.1:8080")
            )
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        admin(&["backend", "rm", "api", "198.18.7.1:8080"]),
        Admin::Backend(BackendCommand::Rm(_))
    ));
    match admin(&["backend", "ls", "api", "--json"]) {
        Admin::Backend(BackendCommand::Ls(l)) => assert!(l.json.json && l.service == "api"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn listings_take_json() {
    assert!(matches!(admin(&["service", "ls"]), Admin::Service(ServiceCommand::Ls(j)) if !j.json));
    assert!(
        matches!(admin(&["service", "ls", "--json"]), Admin::Service(ServiceCommand::Ls(j)) if j.json)
    );
    assert!(matches!(admin(&["status", "--json"]), Admin::Status(j) if j.json));
    assert!(matches!(admin(&["stats", "--json"]), Admin::Stats(s) if s.json && !s.watch));
}

#[test]
fn stats_watch() {
    match admin(&["stats", "web", "--watch"]) {
        Admin::Stats(s) => {
            assert_eq!(s.service.as_deref(), Some("web"));
            assert!(s.watch);
            assert_eq!(s.interval(), Duration::from_secs(1));
        }
        other => panic!("{other:?}"),
    }
    match admin(&["stats", "--watch", "--interval", "0.25", "--json"]) {
        Admin::Stats(s) => {
            assert_eq!(s.service, None);
            assert!(s.json);
            assert_eq!(s.interval(), Duration::from_millis(250));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn socket_is_global_and_shared_with_run() {
    let default = PathBuf::from(crate::api::server::DEFAULT_SOCKET);
    assert_eq!(parse(&["service", "ls"]).socket, default);
    for args in [
        &["--socket", "/tmp/x.sock", "service", "ls"][..],
        &["service", "--socket", "/tmp/x.sock", "ls"],
        &["service", "ls", "--socket", "/tmp/x.sock"],
        &["backend", "ls", "api", "--socket=/tmp/x.sock"],
        &["status", "--socket", "/tmp/x.sock"],
    ] {
        assert_eq!(parse(args).socket, PathBuf::from("/tmp/x.sock"), "{args:?}");
    }
    // `lb run --socket` is the daemon's own option; the global one reaches it.
    for args in [
        &["run", "-c", "lb.toml"][..],
        &["run", "-c", "lb.toml", "--socket", "/tmp/r.sock"],
        &["--socket", "/tmp/r.sock", "run", "-c", "lb.toml"],
    ] {
        let want = if args.contains(&"/tmp/r.sock") {
            PathBuf::from("/tmp/r.sock")
        } else {
            default.clone()
        };
        match parse(args).command {
            Command::Run(r) => {
                assert_eq!(r.socket, want, "{args:?}");
                assert_eq!(r.config, PathBuf::from("lb.toml"));
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn proto_maps_to_the_config_type() {
    assert_eq!(Protocol::from(Proto::Tcp), Protocol::Tcp);
    assert_eq!(Protocol::from(Proto::Udp), Protocol::Udp);
    assert_eq!(CheckKind::from(HealthKind::Tcp), CheckKind::Tcp);
    assert_eq!(CheckKind::from(HealthKind::Http), CheckKind::Http);
    assert_eq!(CheckKind::from(HealthKind::Udp), CheckKind::Udp);
}

#[test]
fn completions_for_every_shell() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        assert!(matches!(
            admin(&["completions", shell]),
            Admin::Completions(_)
        ));
    }
}

#[test]
fn url_parts_are_encoded() {
    assert_eq!(url_segment("web-1_a.b~"), "web-1_a.b~");
    assert_eq!(url_segment("198.18.7.1:80"), "198.18.7.1:80");
    assert_eq!(url_segment("a b/c?d#e%"), "a%20b%2Fc%3Fd%23e%25");
    assert_eq!(url_segment("é"), "%C3%A9");
    assert_eq!(stats_path(None), "/v1/stats");
    assert_eq!(
        stats_path(Some("a&b=c+d")),
        "/v1/stats?service=a%26b%3Dc%2Bd"
    );
}
