//! The machinery of the "docker" benchmark section, run small: a real
//! daemon follows the real engine, containers really start and are really
//! killed, every moment is seen, the section has its rows and targets, and
//! nothing is left behind. No timing is asserted.
//!
//! Needs root (BPF, namespaces, the engine) and an `lb` binary (`LB_BIN`,
//! or `cargo xtask build`). Run with
//! `cargo test --release -p lb-bench --test bench_docker -- --test-threads=1`.

use std::path::Path;

use lb_bench::{
    docker_churn::{self, Params, NAME_PREFIX, TOPOLOGY_PREFIX},
    report::Report,
};
use lb_harness::{
    docker_engine::{docker_ok, Engine},
    netns::list_netns,
};

/// Whether `pid` is a live process (not a zombie).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        let state = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .unwrap_or("");
        state != "Z" && state != "X"
    })
}

#[test]
fn docker_section_sees_every_start_and_death_and_cleans_up() {
    lb_harness::require_root();
    let o = docker_churn::measure(&Params {
        rounds: 2,
        burst: 3,
    });

    assert_eq!(o.asked, 2);
    assert_eq!(o.rounds.len(), 2, "every round ran");
    for r in &o.rounds {
        assert!(r.problems.is_empty(), "{}: {:?}", r.container, r.problems);
        for (what, v) in [
            ("start event to map", r.start_to_map_ms),
            ("start event to request", r.start_to_request_ms),
            (
                "start event to docker run returning",
                r.start_to_run_return_ms,
            ),
            (
                "docker run returning to request",
                r.run_return_to_request_ms,
            ),
            ("SIGKILL to die event", r.kill_to_die_ms),
            ("die event to map", r.die_to_map_ms),
            ("SIGKILL to map", r.kill_to_map_ms),
            ("SIGKILL to request", r.kill_to_request_ms),
        ] {
            let v = v.unwrap_or_else(|| panic!("{}: no figure {what}", r.container));
            assert!(v.is_finite(), "{}: {what} = {v}", r.container);
        }
        for (what, w) in [
            ("the start's flip", r.start_flip_window_ms),
            ("the death's flip", r.die_flip_window_ms),
        ] {
            let w = w.unwrap_or_else(|| panic!("{}: {what} not seen", r.container));
            assert!(w.is_finite() && w >= 0.0, "{}: {what}: {w}", r.container);
        }
        assert!(r.container.starts_with(NAME_PREFIX), "{}", r.container);
    }
    assert!(o.polls > 0 && o.ports_used > 0);
    assert!(
        ["xdp", "tc"].contains(&o.forward.as_str()),
        "forward path {:?}",
        o.forward
    );

    // Nothing left: containers, daemon, events stream, pins, namespaces.
    // The section's engine may have been its own and stopped with it: ask
    // an engine (started again if need be) which containers it has.
    let _engine = Engine::ensure();
    let left: Vec<String> = docker_ok(&["ps", "-a", "--format", "{{.Names}}"])
        .lines()
        .filter(|n| n.starts_with(NAME_PREFIX))
        .map(str::to_owned)
        .collect();
    assert!(left.is_empty(), "containers left behind: {left:?}");
    assert_eq!(
        o.names.len(),
        2 + 2 + 3,
        "two long-lived containers, two rounds' and three of the burst"
    );
    let b = o.burst.as_ref().expect("the burst ran");
    assert!(b.problems.is_empty(), "{:?}", b.problems);
    assert_eq!((b.asked, b.started, b.in_map_at_end), (3, 3, 3), "{b:?}");
    assert!(
        b.last_start_to_all_in_map_ms.is_some_and(f64::is_finite),
        "{b:?}"
    );
    assert!(
        b.last_return_to_all_in_map_ms.is_some_and(f64::is_finite),
        "{b:?}"
    );
    assert_eq!(b.left_behind, 0, "burst containers left behind");
    assert!(!alive(o.daemon_pid), "the daemon still runs");
    assert!(
        o.daemon_clean_exit,
        "the daemon did not exit cleanly on SIGTERM"
    );
    assert!(!alive(o.events_pid), "`docker events` still runs");
    assert!(
        !Path::new(&o.pin_path).exists(),
        "{} left behind",
        o.pin_path.display()
    );
    let ns: Vec<String> = list_netns()
        .into_iter()
        .filter(|n| n.starts_with(&format!("{TOPOLOGY_PREFIX}-")))
        .collect();
    assert!(ns.is_empty(), "namespaces left behind: {ns:?}");

    let s = docker_churn::section(&o);
    assert_eq!(s.key, "docker");
    assert_eq!(s.rounds, 2);
    for name in [
        "`die` event → out of the map",
        "SIGKILL → first request answered by another container",
        "`start` event → in the map",
        "`start` event → first request answered by the new container",
        "SIGKILL → `die` event (the engine)",
        "SIGKILL → out of the map",
        "`start` event → `docker run` returned",
        "`docker run` returned → first request answered by the new container",
    ] {
        let r = s.row(name);
        for key in ["p50", "p99", "max"] {
            assert!(
                r.get(key).is_some_and(f64::is_finite),
                "{name}: no {key}: {r:?}"
            );
        }
        assert_eq!(r.get("count"), Some(2.0), "{name}: {r:?}");
        assert_eq!(r.rounds.len(), 2, "{name}: one figure per round");
    }
    assert_eq!(s.targets.len(), 4, "{:?}", s.targets);
    let r = s.row("3 containers started at once: last `start` event → all in the map");
    assert!(r.get("max").is_some_and(f64::is_finite), "{r:?}");
    assert!(
        s.targets
            .iter()
            .any(|t| t.bar.starts_with("3 containers started at once")),
        "{:?}",
        s.targets
    );
    for bar in [
        "`die` event → out of the map",
        "SIGKILL → first request",
        "`start` event → in the map",
    ] {
        let t = s
            .targets
            .iter()
            .find(|t| t.bar.starts_with(bar))
            .unwrap_or_else(|| panic!("no target {bar:?}: {:?}", s.targets));
        assert!(t.actual.contains("over 2 "), "{t:?}");
    }
    let md = Report {
        machine: lb_bench::report::Machine::this(),
        quick: true,
        sections: vec![s],
    }
    .markdown();
    assert!(md.contains("### Docker"), "{md}");
    assert!(md.contains("Targets:"), "{md}");
}
