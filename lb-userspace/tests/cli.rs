//! The `lb` admin commands as a user runs them, without a daemon: no
//! socket, a usage error, completions, and a stand-in for the daemon — the
//! real admin API server (`api::server`) whose control task answers with
//! canned data — to check requests, `--json` bodies, tables, refusals and
//! exit codes. Nothing here needs root or a network namespace.

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Command, Output, Stdio},
    sync::{Arc, Mutex},
};

use lb::{
    api::{
        server,
        types::{
            AttachmentStatus, BackendInfo, BackendState, CheckResult, ContainersStatus, Counters,
            Health, InterfaceStatus, MapStatus, NewService, ServiceInfo, ServiceStats, Stats,
            Status,
        },
    },
    control::{Handle, Input, Request, Response},
    events::{Change, EventKind, EventLog, Reason},
    model::{Forwarding, HealthCheck, Origin, Protocol, Refusal},
};
use serde_json::Value;

fn lb(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lb"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("runs lb")
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).expect("utf-8 stdout")
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).expect("utf-8 stderr")
}

#[test]
fn no_daemon_is_one_line_and_exit_1() {
    let o = lb(&["service", "ls", "--socket", "/nonexistent/x.sock"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stdout(&o), "");
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: no lb daemon is listening on /nonexistent/x.sock"),
        "{err}"
    );
}

#[test]
fn a_stale_socket_is_no_daemon_either() {
    let dir = scratch("stale");
    let socket = dir.0.join("lb.sock");
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("bind"));
    let o = lb(&["--socket", socket.to_str().unwrap(), "status"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).starts_with("error: no lb daemon is listening on"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &["bogus"][..],
        &[
            "service",
            "add",
            "api",
            "--vip",
            "1.2.3.4:80",
            "--target-port",
            "70000",
        ],
        &[
            "service",
            "add",
            "api",
            "--vip",
            "1.2.3.4:80",
            "--proto",
            "icmp",
        ],
        &["backend", "add", "api"],
    ] {
        let o = lb(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        assert_eq!(stdout(&o), "", "{args:?}");
    }
}

#[test]
fn completions_print_a_script() {
    let o = lb(&["completions", "bash"]);
    assert_eq!(o.status.code(), Some(0));
    let script = stdout(&o);
    assert!(script.contains("_lb()"), "{script}");
    assert!(script.contains("complete -F _lb"), "{script}");
    assert!(script.contains("--health-interval"), "{script}");
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        let o = lb(&["completions", shell]);
        assert_eq!(o.status.code(), Some(0), "{shell}");
        assert!(stdout(&o).contains("service"), "{shell}");
    }
}

/// A directory removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn scratch(tag: &str) -> Scratch {
    let dir = std::env::temp_dir().join(format!("lb-cli-{}-{tag}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("scratch dir");
    Scratch(dir)
}

/// The admin API server with a control task that records requests and
/// answers with `answer`.
struct FakeDaemon {
    socket: PathBuf,
    requests: Arc<Mutex<Vec<Request>>>,
    events: EventLog,
    _rt: tokio::runtime::Runtime,
    _dir: Scratch,
}

impl FakeDaemon {
    fn start(tag: &str, answer: fn(&Request) -> Result<Response, Refusal>) -> Self {
        let dir = scratch(tag);
        let socket = dir.0.join("lb.sock");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = rt.block_on(server::bind(&socket, false)).expect("bind");
        let (handle, mut inbox) = Handle::new();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&requests);
        rt.spawn(async move {
            while let Some(input) = inbox.recv().await {
                if let Input::Call(req, reply) = input {
                    let r = answer(&req);
                    seen.lock().unwrap().push(req);
                    let _ = reply.send(r);
                }
            }
        });
        let events = EventLog::default();
        rt.spawn(server::serve(
            listener,
            handle,
            events.clone(),
            lb::config::ApiSpec::default(),
            std::future::pending(),
        ));
        Self {
            socket,
            requests,
            events,
            _rt: rt,
            _dir: dir,
        }
    }

    fn lb(&self, args: &[&str]) -> Output {
        let mut all = vec!["--socket", self.socket.to_str().unwrap()];
        all.extend(args);
        lb(&all)
    }

    fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }
}

fn service() -> ServiceInfo {
    ServiceInfo {
        name: "api".into(),
        vip: "198.18.101.2:80".into(),
        protocol: Protocol::Tcp,
        table_size: 65537,
        origin: Origin::Api,
        image: None,
        target_port: None,
        health: Some(HealthCheck::default()),
        forwarding: Forwarding::Nat,
        backends: 2,
        active_backends: 1,
    }
}

fn backends(packets: u64) -> Vec<BackendInfo> {
    vec![
        BackendInfo {
            address: "198.18.7.1:8080".into(),
            weight: 2,
            state: BackendState::Active,
            health: Health::Healthy,
            last_check: Some(CheckResult {
                ok: true,
                detail: "HTTP 200".into(),
                time: "2026-12-02T15:00:00.000Z".into(),
                took_ms: 2,
            }),
            active_flows: 3,
            counters: Counters {
                packets,
                bytes: packets * 100,
                new_flows: 3,
            },
            container: Some("web-1".into()),
            node: None,
        },
        BackendInfo {
            address: "198.18.7.2:8080".into(),
            weight: 1,
            state: BackendState::Draining,
            health: Health::Unhealthy,
            last_check: Some(CheckResult {
                ok: false,
                detail: "HTTP 503, expected 200".into(),
                time: "2026-12-02T15:00:00.000Z".into(),
                took_ms: 3,
            }),
            active_flows: 0,
            counters: Counters::default(),
            container: None,
            node: None,
        },
    ]
}

fn stats(packets: u64) -> Stats {
    Stats {
        services: vec![ServiceStats {
            name: "api".into(),
            counters: Counters {
                packets,
                bytes: packets * 100,
                new_flows: 3,
            },
            active_flows: 3,
            backends: backends(packets),
        }],
        global: BTreeMap::from([("fwd_xdp".to_string(), packets)]),
    }
}

fn status() -> Status {
    Status {
        version: "0.1.0".into(),
        uptime_secs: 61,
        adopted: true,
        pin_path: "/sys/fs/bpf/lb".into(),
        interfaces: vec![InterfaceStatus {
            name: "eth1".into(),
            ifindex: 2,
            role: "external".into(),
            programs: vec!["xdp".into(), "tc".into()],
        }],
        maps: vec![MapStatus {
            name: "LB_FLOWS".into(),
            used: 256,
            capacity: 1024,
        }],
        docker: "connected to unix:///var/run/docker.sock (API 1.41)".into(),
        services: 1,
        containers: ContainersStatus {
            running: 2,
            serving: 1,
            services: BTreeMap::from([("api".into(), vec!["web-1".into()])]),
            skipped: vec![],
            last_list_unix_secs: Some(1_764_665_529),
            last_list_age_secs: Some(5),
        },
        attachments: vec![AttachmentStatus {
            interface: "eth1".into(),
            ifindex: 2,
            hook: "xdp".into(),
            link_id: Some(7),
            program_id: Some(41),
            pin: Some("/sys/fs/bpf/lb/abi6/links/xdp-2".into()),
        }],
    }
}

fn answer(req: &Request) -> Result<Response, Refusal> {
    static STATS_CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    match req {
        Request::ListServices => Ok(Response::Services(vec![service()])),
        Request::AddService(new) => Ok(Response::Service(ServiceInfo {
            name: new.name.clone(),
            vip: new.vip.clone(),
            protocol: new.protocol.unwrap_or(Protocol::Tcp),
            ..service()
        })),
        Request::RemoveService(name) if name == "cfg" => Err(Refusal::conflict(
            "service cfg is declared in the config file; edit the file to remove it".into(),
        )),
        Request::ListBackends(name) if name == "api" => Ok(Response::Backends(backends(10))),
        Request::ListBackends(name) | Request::Stats(Some(name)) if name != "api" => {
            Err(Refusal::not_found(format!("no service {name}")))
        }
        Request::Stats(_) => {
            // Every call 100 packets more, for the rates of --watch.
            let n = STATS_CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(Response::Stats(stats(1000 + 100 * n)))
        }
        Request::Status => Ok(Response::Status(Box::new(status()))),
        _ => Ok(Response::Done),
    }
}

#[test]
fn mutations_send_the_request_and_print_one_line() {
    let d = FakeDaemon::start("mutations", answer);
    let cases: [(&[&str], &str); 10] = [
        (
            &[
                "service",
                "add",
                "api",
                "--vip",
                "198.18.101.2:80",
                "--health",
                "tcp",
            ],
            "service api added (198.18.101.2:80 tcp)\n",
        ),
        (
            &[
                "service",
                "add",
                "dns",
                "--vip",
                "198.18.101.3:53",
                "--proto",
                "udp",
            ],
            "service dns added (198.18.101.3:53 udp)\n",
        ),
        (&["service", "rm", "dns"], "service dns removed\n"),
        (
            &[
                "backend",
                "add",
                "a b/c",
                "198.18.7.1:8080",
                "--weight",
                "3",
            ],
            "backend 198.18.7.1:8080 added to a b/c (weight 3)\n",
        ),
        (
            &["backend", "rm", "api", "198.18.7.1:8080"],
            "backend 198.18.7.1:8080 removed from api\n",
        ),
        (
            &["backend", "drain", "api", "198.18.7.2:8080"],
            "backend 198.18.7.2:8080 of api draining: keeps its flows, takes no new ones\n",
        ),
        (
            &["backend", "undrain", "api", "198.18.7.2:8080"],
            "backend 198.18.7.2:8080 of api active: takes new flows again\n",
        ),
        (
            &["backend", "weight", "api", "198.18.7.2:8080", "4"],
            "backend 198.18.7.2:8080 of api weighs 4: new flows follow, established flows stay\n",
        ),
        (
            &["backend", "add", "api", "198.18.7.3:80", "198.18.7.4:80"],
            "2 backends (198.18.7.3:80, 198.18.7.4:80) added to api\n",
        ),
        (
            &["backend", "set", "api", "198.18.7.5:80"],
            "api now has backend 198.18.7.5:80\n",
        ),
    ];
    for (args, want) in cases {
        let o = d.lb(args);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", stderr(&o));
        assert_eq!(stdout(&o), want, "{args:?}");
        assert_eq!(stderr(&o), "", "{args:?}");
    }
    let reqs = d.requests();
    assert_eq!(
        reqs[0],
        Request::AddService(NewService {
            name: "api".into(),
            vip: "198.18.101.2:80".into(),
            protocol: None,
            table_size: None,
            image: None,
            target_port: None,
            health: Some(HealthCheck::default()),
            forwarding: None,
        })
    );
    assert_eq!(reqs[2], Request::RemoveService("dns".into()));
    // Names and addresses reach the daemon intact through the URL.
    match &reqs[3] {
        Request::AddBackends(name, b) => {
            assert_eq!(name, "a b/c");
            assert_eq!(b.len(), 1);
            assert_eq!(b[0].address, "198.18.7.1:8080");
            assert_eq!(b[0].weight, Some(3));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        reqs[4],
        Request::RemoveBackend("api".into(), "198.18.7.1:8080".into())
    );
    assert_eq!(
        reqs[5],
        Request::DrainBackend("api".into(), "198.18.7.2:8080".into())
    );
    assert_eq!(
        reqs[6],
        Request::UndrainBackend("api".into(), "198.18.7.2:8080".into())
    );
    assert_eq!(
        reqs[7],
        Request::SetWeight("api".into(), "198.18.7.2:8080".into(), 4)
    );
    let backends = |r: &Request| match r {
        Request::AddBackends(_, b) | Request::SetBackends(_, b) => {
            b.iter().map(|b| b.address.clone()).collect::<Vec<_>>()
        }
        other => panic!("{other:?}"),
    };
    assert_eq!(backends(&reqs[8]), ["198.18.7.3:80", "198.18.7.4:80"]);
    assert!(matches!(reqs[9], Request::SetBackends(..)));
    assert_eq!(backends(&reqs[9]), ["198.18.7.5:80"]);
}

#[test]
fn refusals_print_the_daemons_line_and_exit_1() {
    let d = FakeDaemon::start("refusals", answer);
    for (args, want) in [
        (
            &["service", "rm", "cfg"][..],
            "error: service cfg is declared in the config file; edit the file to remove it\n",
        ),
        (&["backend", "ls", "nope"], "error: no service nope\n"),
        (&["stats", "nope", "--json"], "error: no service nope\n"),
    ] {
        let o = d.lb(args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        assert_eq!(stdout(&o), "", "{args:?}");
        assert_eq!(stderr(&o), want, "{args:?}");
    }
}

#[test]
fn json_is_the_api_body() {
    let d = FakeDaemon::start("json", answer);
    let pretty = |v: Value| serde_json::to_string_pretty(&v).unwrap() + "\n";
    for (args, want) in [
        (
            &["service", "ls", "--json"][..],
            serde_json::to_value(vec![service()]).unwrap(),
        ),
        (
            &["backend", "ls", "api", "--json"],
            serde_json::to_value(backends(10)).unwrap(),
        ),
        (
            &["status", "--json"],
            serde_json::to_value(status()).unwrap(),
        ),
    ] {
        let o = d.lb(args);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", stderr(&o));
        // Same fields, same order as the server's serialisation.
        assert_eq!(stdout(&o), pretty(want), "{args:?}");
    }
    let o = d.lb(&["stats", "--json"]);
    let s: Stats = serde_json::from_slice(&o.stdout).expect("stats --json parses as Stats");
    assert_eq!(
        s.services[0].backends,
        backends(s.services[0].counters.packets)
    );
}

#[test]
fn tables() {
    let d = FakeDaemon::start("tables", answer);
    let o = d.lb(&["service", "ls"]);
    assert_eq!(
        stdout(&o),
        "NAME  VIP              PROTO  BACKENDS  TABLE  ORIGIN  IMAGE  HEALTH\n\
         api   198.18.101.2:80  tcp         1/2  65537  api     -      \
         tcp every 1000ms, timeout 500ms, rise 2, fall 3\n"
    );
    let o = d.lb(&["backend", "ls", "api"]);
    assert_eq!(
        stdout(&o),
        "ADDRESS          WEIGHT  STATE     HEALTH     LAST CHECK              ACTIVE FLOWS  PACKETS   BYTES  CONTAINER\n\
         198.18.7.1:8080       2  active    healthy    HTTP 200                           3       10  1000 B  web-1\n\
         198.18.7.2:8080       1  draining  unhealthy  HTTP 503, expected 200             0        0     0 B  -\n"
    );
    let o = d.lb(&["status"]);
    let out = stdout(&o);
    for want in [
        "uptime      1m 1s",
        "adopted     yes",
        "pin path    /sys/fs/bpf/lb",
        "docker      connected to unix:///var/run/docker.sock (API 1.41)",
        "containers  1 serving of 2 running (api: 1)",
        "last list   2025-12-02 08:52:09 UTC (5s ago)",
        "eth1             2  external  xdp, tc",
        "   7  xdp   eth1             2       41  /sys/fs/bpf/lb/abi6/links/xdp-2",
        "LB_FLOWS   256      1024  25.0%",
    ] {
        assert!(out.contains(want), "{want:?} in\n{out}");
    }
    let o = d.lb(&["stats", "api"]);
    let out = stdout(&o);
    assert!(out.starts_with("NAME "), "{out}");
    assert!(out.contains("  198.18.7.2:8080 (draining)"), "{out}");
    assert!(!out.contains("DATA PATH"), "{out}");
}

#[test]
fn watch_json_is_ndjson_with_rates_and_ctrl_c_exits_0() {
    let d = FakeDaemon::start("watch", answer);
    let mut child = Command::new(env!("CARGO_BIN_EXE_lb"))
        .args(["--socket", d.socket.to_str().unwrap()])
        .args(["stats", "--watch", "--json", "--interval", "0.05"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("runs lb");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for _ in 0..2 {
        let line = lines.next().expect("a line").expect("reads");
        let v: Value = serde_json::from_str(&line).expect("one JSON object per line");
        let rates = &v["services"][0]["rates"];
        assert!(rates["packets_per_sec"].as_f64().unwrap() > 0.0, "{line}");
        assert!(rates["bytes_per_sec"].as_f64().is_some(), "{line}");
        assert!(rates["new_flows_per_sec"].as_f64().is_some(), "{line}");
        assert!(
            v["services"][0]["backends"][0]["rates"].is_object(),
            "{line}"
        );
        assert!(v["interval_secs"].as_f64().unwrap() > 0.0, "{line}");
        let _: Stats = serde_json::from_value(v).expect("still a Stats");
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("SIGINT");
    let out = child.wait_with_output().expect("exits");
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
}

#[test]
fn watch_without_a_terminal_prints_successive_frames() {
    let d = FakeDaemon::start("watch-plain", answer);
    let mut child = Command::new(env!("CARGO_BIN_EXE_lb"))
        .args(["--socket", d.socket.to_str().unwrap()])
        .args(["stats", "api", "--watch", "--interval", "0.05"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("runs lb");
    let lines: Vec<String> = BufReader::new(child.stdout.take().unwrap())
        .lines()
        .take(9)
        .map(|l| l.expect("reads"))
        .collect();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("SIGINT");
    let out = child.wait_with_output().expect("exits");
    assert_eq!(out.status.code(), Some(0));
    // Frame 1: header, service, two backends; a blank line; frame 2.
    assert!(
        lines[0].starts_with("NAME ") && lines[0].ends_with("NEW FLOWS/S"),
        "{lines:#?}"
    );
    assert!(
        lines[1].starts_with("api ") && lines[1].ends_with('-'),
        "{lines:#?}"
    );
    assert_eq!(lines[4], "", "{lines:#?}");
    assert!(lines[5].starts_with("NAME "), "{lines:#?}");
    assert!(
        !lines[6].ends_with('-'),
        "rates in the second frame: {lines:#?}"
    );
    assert!(
        !lines.iter().any(|l| l.contains('\x1b')),
        "no escapes off a terminal"
    );
}

#[test]
fn events_prints_one_line_per_event_and_ends_with_the_stream() {
    let d = FakeDaemon::start("events", |_| Ok(Response::Done));
    d.events.emit(Change::new(EventKind::DaemonStarted));
    for (service, backend) in [("web", "198.18.1.1:80"), ("api", "198.18.1.2:80")] {
        d.events.emit(Change {
            service: Some(service.into()),
            backend: Some(backend.into()),
            state: Some(BackendState::Active),
            weight: Some(1),
            reason: Some(Reason::Api),
            ..Change::new(EventKind::BackendAdded)
        });
    }
    d.events.close();

    let o = d.lb(&["events", "--since", "0"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(lines[0].contains("     1  daemon_started"), "{out}");
    assert!(
        lines[1].ends_with(
            "2  backend_added     web  198.18.1.1:80  state=active  weight=1  reason=api"
        ),
        "{out}"
    );

    let o = d.lb(&["events", "--json", "--since", "1", "--service", "api"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let events: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object a line"))
        .collect();
    assert_eq!(events.len(), 1, "{out}");
    assert_eq!(events[0]["seq"], 3);
    assert_eq!(events[0]["service"], "api");
    assert_eq!(events[0]["kind"], "backend_added");

    let o = d.lb(&["events", "--since", "x"]);
    assert_eq!(o.status.code(), Some(2), "a usage error");
}
