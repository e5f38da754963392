//! End-to-end tests of the change log: `GET /v1/events` and `lb events`
//! against a real daemon in network namespaces. Changes made through the
//! API appear in order, numbered without holes, with their kinds and
//! reasons; `--since` resumes; a resume from before the history, and a
//! client that stops reading while thousands of changes go by, each get a
//! `gap` line; a member of the read group may follow; streams take at most
//! half the API's connections; stopping the daemon ends every stream with
//! `daemon_stopping`; a container started, paused, unpaused and killed in
//! a real Docker engine shows as its backend's events, with its name and
//! the engine's event. Run as root, one
//! at a time: `cargo test -p lb-tests --test e2e_events -- --test-threads=1`.

use std::{
    io::{Read as _, Write as _},
    os::unix::net::UnixStream,
    time::{Duration, Instant},
};

use lb::api::types::{BackendState, Event, EventKind, Reason};
use lb_harness::{
    docker_engine::{docker_ok, echo_cmd, Engine, RunOpts},
    ops::{stop_with_output, DaemonFiles, Follower, LbCli},
    render_config, require_root, Daemon, ServiceConfig, Topology,
};

/// A group the config lets read (no such group need exist on the host),
/// and a user in it that is nobody's on the host.
const READ_GID: u32 = 4002;
const READER: u32 = 4100;

/// How long one event may take to show.
const SHOWS_WITHIN: Duration = Duration::from_secs(10);

/// A daemon with one config service `web` (one backend) and no Docker.
struct Events {
    // Dropped in order: daemon, files (pins included), topology.
    daemon: Option<Daemon>,
    files: DaemonFiles,
    topo: Topology,
}

impl Events {
    /// With `[api] max_connections` (streams may take half of them) and
    /// `request_timeout_ms`; members of group [`READ_GID`] may read.
    fn start(prefix: &str, max_connections: usize, request_timeout_ms: u64) -> Events {
        let topo = Topology::new(prefix, 1);
        let files = DaemonFiles::new(&topo, "events");
        files.open_to_others();
        let web = ServiceConfig::web(&topo, &[0]);
        files.write_config(&format!(
            "{}\n[api]\nmax_connections = {max_connections}\nrequest_timeout_ms = {request_timeout_ms}\n\
             read_group = \"{READ_GID}\"\n\n\
             [docker]\nenabled = false\n",
            render_config(&[&topo.client_host_if()], &[web]),
        ));
        Events {
            daemon: Some(files.start(&[])),
            files,
            topo,
        }
    }

    fn cli(&self) -> LbCli {
        self.files.cli()
    }

    fn backend(&self, port: u16) -> String {
        format!("{}:{port}", self.topo.backend_addr(0))
    }
}

/// The events `lines` (NDJSON) hold.
fn parse(lines: &[String]) -> Vec<Event> {
    lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not an event ({e}): {l}")))
        .collect()
}

/// Waits until `f` has printed an event of `kind`; all its events so far.
fn wait_kind(f: &Follower, kind: EventKind) -> Vec<Event> {
    parse(
        &f.wait_for(&format!("an event {kind:?}"), SHOWS_WITHIN, |lines| {
            parse(lines).iter().any(|e| e.change.kind == kind)
        }),
    )
}

/// (kind, backend, reason) of each event, for comparing in one assert.
fn summary(events: &[Event]) -> Vec<(EventKind, Option<String>, Option<Reason>)> {
    events
        .iter()
        .map(|e| (e.change.kind, e.change.backend.clone(), e.change.reason))
        .collect()
}

fn assert_numbered_from(events: &[Event], first: u64) {
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    let want: Vec<u64> = (first..first + events.len() as u64).collect();
    assert_eq!(seqs, want, "numbered one after another, no hole");
}

#[test]
fn api_changes_stream_in_order_and_resume_with_since() {
    require_root();
    let mut ev = Events::start("lbv1", 64, 10_000);
    let lb = ev.cli();
    let all = lb.follow(&["events", "--json", "--since", "0"]);
    let web = ev.backend(8080);
    let b2 = ev.backend(8081);

    // What the daemon started with: the config's service and backend.
    let start = wait_kind(&all, EventKind::BackendAdded);
    assert_eq!(
        summary(&start),
        [
            (EventKind::DaemonStarted, None, None),
            (EventKind::ServiceAdded, None, Some(Reason::Config)),
            (
                EventKind::BackendAdded,
                Some(web.clone()),
                Some(Reason::Config)
            ),
        ]
    );
    assert_numbered_from(&start, 1);
    assert_eq!(start[1].change.service.as_deref(), Some("web"));
    assert_eq!(
        start[1].change.vip.as_deref(),
        Some(format!("{}:80", ev.topo.vip()).as_str())
    );
    assert!(
        start[0].time.ends_with('Z') && start[0].time.len() == 24,
        "RFC 3339 UTC: {}",
        start[0].time
    );

    // Only what happens from now on, for one service, followed by a
    // member of the read group: following needs read access only.
    let live = lb.follow_as_member(
        READER,
        &[READ_GID],
        &["events", "--json", "--service", "api1"],
    );
    // Readable lines.
    let readable = lb.follow(&["events", "--since", "3"]);

    lb.ok(&["backend", "add", "web", &b2]);
    lb.ok(&["backend", "drain", "web", &b2]);
    lb.ok(&["backend", "undrain", "web", &b2]);
    lb.ok(&["backend", "weight", "web", &b2, "3"]);
    lb.ok(&["backend", "rm", "web", &b2]);
    lb.ok(&[
        "service",
        "add",
        "api1",
        "--vip",
        &format!("{}:81", ev.topo.vip()),
    ]);
    lb.ok(&["service", "rm", "api1"]);
    // A refused change publishes nothing.
    assert!(!lb.run(&["backend", "rm", "web", &b2]).status.success());

    let events = wait_kind(&all, EventKind::ServiceRemoved);
    assert_numbered_from(&events, 1);
    let api = Some(Reason::Api);
    assert_eq!(
        summary(&events[3..]),
        [
            (EventKind::BackendAdded, Some(b2.clone()), api),
            (EventKind::BackendDraining, Some(b2.clone()), api),
            (EventKind::BackendUp, Some(b2.clone()), api),
            (EventKind::BackendWeight, Some(b2.clone()), api),
            (EventKind::BackendRemoved, Some(b2.clone()), api),
            (EventKind::ServiceAdded, None, api),
            (EventKind::ServiceRemoved, None, api),
        ]
    );
    assert_eq!(events[6].change.weight, Some(3));
    assert_eq!(events[3].change.state, Some(BackendState::Active));

    // The filtered live reader (the read group's member) saw the two
    // events of api1 only.
    let filtered = wait_kind(&live, EventKind::ServiceRemoved);
    assert_eq!(
        summary(&filtered),
        [
            (EventKind::ServiceAdded, None, api),
            (EventKind::ServiceRemoved, None, api)
        ]
    );
    assert_eq!(filtered[0].seq, 9);

    // A resume after 5 gets 6 on, exactly.
    let resumed = lb.follow(&["events", "--json", "--since", "5"]);
    let again = wait_kind(&resumed, EventKind::ServiceRemoved);
    assert_eq!(summary(&again), summary(&events[5..]));
    assert_numbered_from(&again, 6);

    // One readable line per event after 3.
    let lines = readable.wait_for("the service's removal", SHOWS_WITHIN, |l| {
        l.iter().any(|l| l.contains("service_removed"))
    });
    assert_eq!(lines.len(), 7, "{lines:#?}");
    assert!(
        lines[0].contains("     4  backend_added")
            && lines[0].contains(&b2)
            && lines[0].contains("state=active")
            && lines[0].contains("reason=api"),
        "{}",
        lines[0]
    );

    // Stopping the daemon ends every stream, after daemon_stopping.
    let daemon = ev.daemon.take().expect("running");
    let (status, output) = stop_with_output(daemon);
    assert!(status.success(), "the daemon stops cleanly:\n{output}");
    for f in [all, live, resumed] {
        let (status, lines) = f.wait_exit(Duration::from_secs(10));
        assert!(status.success(), "lb events exits 0 at the daemon's stop");
        let last = parse(&lines).pop().expect("at least one event");
        assert_eq!(last.change.kind, EventKind::DaemonStopping);
    }
}

/// Sends `GET path` on a new connection to the admin socket; the stream.
fn get(socket: &std::path::Path, path: &str) -> UnixStream {
    let mut s = UnixStream::connect(socket).expect("connect to the admin socket");
    write!(s, "GET {path} HTTP/1.1\r\nHost: lb\r\n\r\n").expect("send a request");
    s
}

/// Reads from `s` until `want` appears in what was read (or `timeout`).
fn read_until(s: &mut UnixStream, want: &str, timeout: Duration) -> String {
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("read timeout");
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut buf = [0u8; 65536];
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
        if String::from_utf8_lossy(&got).contains(want) {
            break;
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[test]
fn gaps_are_reported_and_a_reader_that_never_reads_holds_nothing_up() {
    require_root();
    // Three event streams at most; a request must be sent within 300 ms,
    // which does not limit how long a response (a stream) lasts.
    let ev = Events::start("lbv2", 6, 300);
    let lb = ev.cli();
    let socket = ev.files.socket.clone();

    // A client that asks for everything and then never reads.
    let mut stalled = get(&socket, "/v1/events?since=0");
    std::thread::sleep(Duration::from_secs(1));

    // More changes than the history keeps (4096) plus what the stalled
    // client's socket and the server's buffers hold (a few hundred KiB,
    // about 1,500 events): 3,000 backends in, all but one out, and back
    // in, in three calls (8,998 events).
    let many: Vec<String> = (0..3_000).map(|i| ev.backend(10_000 + i)).collect();
    let mut all = vec!["backend", "set", "web"];
    all.extend(many.iter().map(String::as_str));
    let started = Instant::now();
    lb.ok(&all);
    lb.ok(&["backend", "set", "web", &many[0]]);
    lb.ok(&all);
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(60),
        "9,000 changes took {took:?} with a stalled reader"
    );
    let services: serde_json::Value = lb.json(&["service", "ls", "--json"]);
    assert_eq!(services[0]["backends"], 3_000, "{services}");

    // A resume from before the history starts with a gap that says so.
    let resumed = lb.follow(&["events", "--json", "--since", "1"]);
    let lines = resumed.wait_for("the gap and the history", SHOWS_WITHIN, |l| l.len() >= 2);
    let gap: Event = serde_json::from_str(&lines[0]).expect("an event");
    assert_eq!(gap.change.kind, EventKind::Gap, "{}", lines[0]);
    let first_kept: Event = serde_json::from_str(&lines[1]).expect("an event");
    assert_eq!(gap.change.missed_from, Some(2));
    assert_eq!(gap.change.missed_to, Some(first_kept.seq - 1));
    assert_eq!(gap.seq, first_kept.seq - 1);
    assert!(
        gap.change.detail.as_deref().unwrap_or("").contains("4096"),
        "{:?}",
        gap.change.detail
    );
    // A readable resume says it too.
    let readable = lb.follow(&["events", "--since", "1"]);
    readable.wait_for("a readable gap line", SHOWS_WITHIN, |l| {
        l.first()
            .is_some_and(|l| l.contains("gap") && l.contains("no longer in the history"))
    });

    // Streams take at most half the connections: a fourth is refused, and
    // reads and changes still get through.
    let mut fourth = get(&socket, "/v1/events");
    let refused = read_until(&mut fourth, "event streams", Duration::from_secs(5));
    assert!(
        refused.starts_with("HTTP/1.1 503") && refused.contains("3 event streams are open"),
        "{refused}"
    );
    lb.ok(&["backend", "weight", "web", &many[0], "2"]);
    lb.ok(&["stats"]);

    // The stalled client, reading at last, finds a gap where it fell behind.
    let caught_up = read_until(&mut stalled, "\"kind\":\"gap\"", Duration::from_secs(30));
    assert!(
        caught_up.contains("\"kind\":\"gap\""),
        "a reader that fell behind is told so; it read {} bytes",
        caught_up.len()
    );
}

#[test]
fn docker_changes_carry_the_container_and_the_engines_event() {
    require_root();
    let engine = Engine::ensure();
    let topo = Topology::new("lbv3", 1);
    let files = DaemonFiles::new(&topo, "events-docker");
    files.write_config(&format!(
        "[datapath]\nexternal = [\"{}\"]\n\n[docker]\nenabled = true\n\n\
         [[service]]\nname = \"evweb\"\nvip = \"{}:80\"\n",
        topo.client_host_if(),
        topo.vip()
    ));
    let _daemon = files.start(&[]);
    let lb = files.cli();
    let f = lb.follow(&["events", "--json", "--since", "0"]);
    wait_kind(&f, EventKind::DockerConnected);

    let c = engine.run(
        "lbv3-w1",
        RunOpts::default()
            .cmd(echo_cmd(8080))
            .label("lb.service", "evweb")
            .label("lb.port", "8080"),
    );
    let addr = format!("{}:8080", c.ip());
    let about = |kind: EventKind| {
        let events = parse(&f.wait_for(
            &format!("{kind:?} of container lbv3-w1"),
            SHOWS_WITHIN,
            |lines| {
                parse(lines).iter().any(|e| {
                    e.change.kind == kind && e.change.container.as_deref() == Some("lbv3-w1")
                })
            },
        ));
        let e = events
            .into_iter()
            .rev()
            .find(|e| e.change.kind == kind)
            .expect("found above");
        assert_eq!(e.change.service.as_deref(), Some("evweb"));
        assert_eq!(e.change.backend.as_ref(), Some(&addr), "{e:?}");
        e.change.reason
    };
    assert_eq!(about(EventKind::BackendAdded), Some(Reason::DockerStart));
    docker_ok(&["pause", c.name()]);
    assert_eq!(about(EventKind::BackendDraining), Some(Reason::DockerPause));
    docker_ok(&["unpause", c.name()]);
    assert_eq!(about(EventKind::BackendUp), Some(Reason::DockerUnpause));
    c.kill();
    // SIGKILL drains it at once and its death removes it; when both reach
    // the daemon together, the removal alone is published.
    assert_eq!(about(EventKind::BackendRemoved), Some(Reason::DockerDie));
    let events = parse(&f.lines());
    let last_up = events
        .iter()
        .rposition(|e| e.change.kind == EventKind::BackendUp)
        .expect("seen above");
    for e in &events[last_up + 1..] {
        match e.change.kind {
            EventKind::BackendDraining => assert_eq!(e.change.reason, Some(Reason::DockerKill)),
            EventKind::BackendRemoved => {}
            other => panic!("unexpected {other:?} after the kill: {e:?}"),
        }
    }
    assert_numbered_from(&events, 1);
}
