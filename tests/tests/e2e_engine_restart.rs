//! The Docker engine restarted under `lb run`, with Docker's `live-restore`
//! (containers keep running while `dockerd` is away): no request fails, the
//! backends stay while the engine is away, and the resync afterwards
//! changes only what changed meanwhile. A real engine, started by the
//! harness as a user would (`dockerd --live-restore`), stopped and started
//! again. Run as root, one at a time: `cargo test -p lb-tests --test
//! e2e_engine_restart -- --test-threads=1`.

use std::{
    collections::BTreeSet,
    thread,
    time::{Duration, Instant},
};

use lb::api::types::{EventKind, Reason};
use lb_harness::{
    docker_engine::Engine,
    http_tally,
    reliability::{
        engine_restart, labelled, names, DockerRig, EventFeed, RESTART_CONTAINERS, RESTART_HELD,
        SETTLE,
    },
    require_root,
};

/// How long the change log is watched after the engine is back.
const QUIET: Duration = Duration::from_secs(1);

/// `dockerd` stopped and started again under HTTP requests and held
/// connections through the VIP: nothing fails, and the daemon's only
/// reaction is to say it lost the engine and found it again.
#[test]
fn with_live_restore_an_engine_restart_fails_no_request_and_changes_nothing() {
    require_root();
    let r = engine_restart("lbr1");
    eprintln!(
        "load: {} requests, {} failed, {} echoes; engine away {:?}, reconnected after {:?}",
        r.load.requests, r.load.failed, r.load.echoes, r.engine_away, r.reconnected_after
    );
    assert!(
        r.load.clean(),
        "requests failed or held connections broke across the engine's restart: {:#?}\n\
         daemon output:\n{}",
        r.load,
        r.daemon_output
    );
    assert!(
        r.load.answered() >= 50,
        "too few requests to show anything: {:?}",
        r.load
    );
    assert_eq!(r.load.held_by.len(), RESTART_HELD);
    assert!(r.load.echoes >= 100, "too few echoes: {:?}", r.load);
    let web: BTreeSet<&str> = r
        .before
        .iter()
        .filter(|l| l.starts_with("web "))
        .map(String::as_str)
        .collect();
    assert_eq!(web.len(), RESTART_CONTAINERS, "{:#?}", r.before);
    for (name, n) in &r.load.answered_by {
        assert!(
            web.iter().any(|l| l.contains(&format!(" {name} "))),
            "answered by {name}, not a web container: {:?}",
            r.load
        );
        assert!(*n > 0);
    }
    assert!(
        r.status_away.starts_with("disconnected"),
        "`lb status` while the engine was away: {}",
        r.status_away
    );
    assert_eq!(r.before, r.after, "who serves what changed");
    assert_eq!(
        r.maps_before, r.maps_after,
        "the pinned maps changed (a backend re-added, or a table rebuilt)"
    );
    let kinds: Vec<EventKind> = r.events.iter().map(|e| e.change.kind).collect();
    assert_eq!(
        kinds,
        [EventKind::DockerLost, EventKind::DockerConnected],
        "events across the restart: {:#?}",
        r.events
    );
    // One warning for the loss, not one per reconnection attempt.
    let warned = r
        .daemon_output
        .lines()
        .filter(|l| l.contains("docker watcher lost the engine"))
        .count();
    assert_eq!(warned, 1, "daemon output:\n{}", r.daemon_output);
}

/// The engine goes away, one container dies meanwhile, the engine comes
/// back: the resync removes that container, and only it.
#[test]
fn a_container_that_died_while_the_engine_was_away_is_the_only_one_removed() {
    require_root();
    let mut engine = Engine::ensure();
    engine.live_restore();
    let rig = DockerRig::new("lbr2");
    let web: Vec<_> = (1..=3)
        .map(|i| engine.run(&format!("lbr2-w{i}"), labelled()))
        .collect();
    let daemon = rig.start(&[]);
    rig.wait_active(&daemon, "web", &names(&web));
    let feed = EventFeed::follow(&rig.cli());
    let last = feed
        .wait_kind(EventKind::DockerConnected, 0, SETTLE)
        .last()
        .map_or(0, |e| e.seq);
    let maps_before = rig.maps();
    let membership_before = rig.membership();
    let (victim, rest) = web.split_first().expect("three containers");
    let pid = victim.pid();

    engine.stop();
    let status = rig.wait_docker_status("disconnected", SETTLE);
    assert!(status.starts_with("disconnected"), "{status}");
    // From the host: the engine that would do it is away.
    let raw = libc::pid_t::try_from(pid).expect("a pid fits pid_t");
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    let killed = unsafe { libc::kill(raw, libc::SIGKILL) };
    assert_eq!(
        killed,
        0,
        "kill -9 {pid}: {}",
        std::io::Error::last_os_error()
    );
    let end = Instant::now() + SETTLE;
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        assert!(
            Instant::now() < end,
            "{} (pid {pid}) survives SIGKILL",
            victim.name()
        );
        thread::sleep(Duration::from_millis(20));
    }
    // With no engine to tell it, the daemon changes nothing.
    thread::sleep(QUIET);
    assert_eq!(rig.membership(), membership_before);

    engine.start();
    rig.wait_active(&daemon, "web", &names(rest));
    feed.wait_kind(EventKind::DockerConnected, last, SETTLE);
    thread::sleep(QUIET);
    let events: Vec<_> = feed.events().into_iter().filter(|e| e.seq > last).collect();
    let mut kinds: Vec<EventKind> = events.iter().map(|e| e.change.kind).collect();
    kinds.sort_by_key(|k| format!("{k:?}"));
    assert_eq!(
        kinds,
        [
            EventKind::BackendRemoved,
            EventKind::DockerConnected,
            EventKind::DockerLost
        ],
        "events across the restart: {events:#?}"
    );
    let removed = events
        .iter()
        .find(|e| e.change.kind == EventKind::BackendRemoved)
        .expect("a removal");
    assert_eq!(removed.change.container.as_deref(), Some(victim.name()));
    assert_eq!(removed.change.reason, Some(Reason::DockerList));

    // In the maps: the victim's entry gone, the others' the same entries.
    let maps_after = rig.maps();
    let mut want = maps_before.backends.clone();
    want.retain(|_, (addr, ..)| Some(addr.to_string()) != removed.change.backend);
    assert_eq!(
        want.len(),
        maps_before.backends.len() - 1,
        "the victim's entry was not in the maps before: {maps_before:#?} ({removed:?})"
    );
    assert_eq!(maps_after.backends, want);
    let tally = http_tally(&rig.topo.client, rig.web(), 30, Duration::from_secs(60));
    assert_eq!(tally.failures, 0, "{tally:?}");
    assert_eq!(tally.count(victim.name()), 0, "{tally:?}");
}
