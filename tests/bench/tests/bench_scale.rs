//! The machinery of the "how cost grows" and "control plane" benchmark
//! sections, run small: the cases really are measured, the flows really are
//! in the table, the backend changes really are in the daemon's maps, and
//! the sections have their rows. No timing is asserted.
//!
//! Needs root (BPF, namespaces) and an `lb` binary (`LB_BIN`, or
//! `cargo build --release -p lb-userspace`).

use std::time::Duration;

use lb::datapath::MapSizes;
use lb_bench::{
    control_plane,
    scale::{self, Params},
};
use lb_common::maps;

#[test]
fn scale_section_measures_every_case() {
    lb_harness::require_root();
    let p = Params {
        rounds: 2,
        calls: 50,
        backends: vec![1, 10],
        services: vec![1, 10],
        flows: vec![1, 1_000],
        flow_table_size: 16_384,
        established: 100,
        maglev_backends: vec![10, 1_000],
        maglev_rounds: 1,
        memory: true,
    };
    // Panics if an output is not the expected rewrite, if an established
    // packet misses its flow, or if a new-flow packet does not start one.
    let s = scale::run_with(&p);
    assert_eq!(s.key, "scale");
    assert_eq!(s.rounds, 2);
    for name in [
        "1 backend per service",
        "10 backends per service",
        "1 service",
        "10 services",
        "1 flow in the table (replayed, as in the per-packet section)",
        "1,000 flows in the table",
    ] {
        let r = s.row(name);
        for key in ["pass_ns", "est_ns", "new_ns"] {
            let v = r
                .get(key)
                .unwrap_or_else(|| panic!("{name}: no {key}: {r:?}"));
            assert!(v.is_finite() && v >= 0.0, "{name}: {key} = {v}");
        }
        assert_eq!(r.rounds.len(), 2, "{name}: one figure per round");
    }
    let fill = s.row("flow table fill: 1,000 flows written from 1 CPU");
    assert_eq!(fill.get("entries"), Some(1_000.0), "{fill:?}");
    assert!(s.rows.iter().any(|r| r
        .name
        .starts_with("flow table fill: 1,000 flows written from")
        && !r.name.ends_with("1 CPU")
        && r.get("entries") == Some(1_000.0)));
    for n in ["10", "1,000"] {
        let r = s.row(&format!("Maglev rebuild, {n} backends (M = 65,537)"));
        assert!(r.get("ms").is_some_and(|v| v > 0.0), "{r:?}");
    }
    assert!(s.row("memory: LB_FLOWS").get("mib").is_some());
    assert!(s
        .rows
        .iter()
        .any(|r| r.name.starts_with("memory: all ") && r.get("mib").is_some_and(|v| v > 0.0)));
    assert!(s
        .row("memory per flow entry")
        .get("bytes_per")
        .is_some_and(|v| v > 0.0));
    assert!(
        s.targets
            .iter()
            .any(|t| t.bar.contains("flows fit") && t.met),
        "{:?}",
        s.targets
    );
    assert!(
        s.targets.iter().any(|t| t.bar.contains("Maglev rebuild")),
        "{:?}",
        s.targets
    );
    let md = lb_bench::report::Report {
        machine: lb_bench::report::Machine::this(),
        quick: true,
        sections: vec![s],
    }
    .markdown();
    assert!(md.contains("### How cost grows"), "{md}");
}

#[test]
fn flows_really_are_in_the_table() {
    lb_harness::require_root();
    assert_eq!(scale::flows_fit_spread(4_096, 1_000), 1_000);
    // From one CPU, an LRU with per-CPU lists holds at most that CPU's share.
    let cpus = aya::util::nr_cpus().expect("possible CPUs") as u64;
    let share = 4_096 / cpus;
    let one = scale::flows_fit_one_cpu(4_096, 3_000);
    if share >= 3_000 {
        assert_eq!(one, 3_000);
    } else {
        assert!(
            one <= share && one + 8 >= share,
            "{one} of 3,000, share {share}"
        );
    }
}

#[test]
fn map_memory_comes_from_the_kernel() {
    lb_harness::require_root();
    let sizes = MapSizes::default();
    let mem = scale::map_memory(&sizes);
    let get = |name: &str| {
        mem.iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("no map {name}: {mem:?}"))
    };
    let flows = get(maps::FLOWS);
    assert_eq!(flows.max_entries, sizes.flow_table_size);
    // At least key and value of every entry.
    assert!(flows.bytes >= u64::from(sizes.flow_table_size) * (16 + 28));
    let maglev = get(maps::MAGLEV);
    assert_eq!(maglev.max_entries, sizes.maglev_slots());
    assert!(maglev.bytes >= 4 * u64::from(sizes.maglev_slots()));
    get(maps::SERVICES);
    get(maps::BACKENDS);
}

#[test]
fn maglev_rebuild_is_timed() {
    let ms = scale::maglev_rebuild_ms(100, 65_537, 3);
    assert!(ms > 0.0 && ms.is_finite(), "{ms}");
}

#[test]
fn control_section_changes_are_in_the_map() {
    lb_harness::require_root();
    let o = control_plane::measure(10, Duration::from_secs(120), Duration::from_millis(500));
    assert_eq!(o.applied, 10, "all changes applied");
    assert_eq!(o.latencies_ms.len(), 10);
    assert_eq!(
        o.active_in_map, 10,
        "active entries in the pinned LB_BACKENDS"
    );
    assert_eq!(o.in_table, 10, "slots in the active Maglev table");
    assert_eq!(o.api_listed, Some((13, 13)), "the API lists them, active");
    assert!(!o.idle_api_ms.is_empty());
    assert!(o.rss_ready_kib > 0 && o.rss_after_kib > 0 && o.vm_rss_after_kib > 0);
    assert_eq!(o.milestones.len(), 1);
    assert!(o.milestones[0].1.is_some());
    let s = control_plane::section(&o);
    assert_eq!(s.key, "control");
    let r = s.row("10 backend additions, until the last is in the map");
    assert!(r.get("s").is_some_and(|v| v > 0.0), "{r:?}");
    assert_eq!(
        s.row("applied backends active in the pinned map (of 10)")
            .get("count"),
        Some(10.0)
    );
    assert!(s
        .row("daemon's own memory (RssAnon), after 10 additions")
        .get("mib")
        .is_some_and(|v| v > 0.0));
}

#[test]
fn control_section_batch_calls_are_in_the_map_and_clean_up() {
    lb_harness::require_root();
    let b = control_plane::measure_batch(5, 10, 2);
    assert_eq!(b.failed, None, "every batch call answered");
    assert_eq!(b.latencies_ms.len(), 5, "one call per service");
    assert_eq!(
        b.active_in_map, 50,
        "active entries in the pinned LB_BACKENDS"
    );
    assert_eq!(
        b.in_table, 50,
        "slots in each service's active Maglev table"
    );
    assert!(b.total.as_secs_f64() > 0.0 && b.create.as_secs_f64() > 0.0);
    assert!(b.rss_ready_kib > 0 && b.rss_after_kib > 0 && b.vm_rss_after_kib > 0);
    assert!(
        b.daemon_clean_exit,
        "the daemon did not exit cleanly on SIGTERM"
    );
    assert!(!b.pin_path.exists(), "{} left behind", b.pin_path.display());
    let o = control_plane::measure(3, Duration::from_secs(60), Duration::from_millis(200));
    let mut s = control_plane::section(&o);
    control_plane::add_batch(&mut s, &b);
    let r = s.row(
        "50 backends over 5 services by batch calls (10 per `PUT …/backends`, 2 calls in flight), until the last is in the map",
    );
    assert!(r.get("s").is_some_and(|v| v > 0.0), "{r:?}");
    assert_eq!(r.get("count"), Some(50.0));
    assert!(s
        .row("daemon's own memory (RssAnon), at 53 backends in 6 services")
        .get("mib")
        .is_some_and(|v| v > 0.0));
    for bar in [
        "3 single backend additions",
        "50 backends over 5 services by batch calls",
        "daemon RssAnon under 30 MiB at 50 backends",
    ] {
        assert!(
            s.targets.iter().any(|t| t.bar.starts_with(bar)),
            "no target {bar:?}: {:?}",
            s.targets
        );
    }
}

#[test]
fn control_section_scrape_run_measures_both_and_cleans_up() {
    lb_harness::require_root();
    let o = control_plane::measure_scrape(5_000, 10);
    assert_eq!(o.flows_in_table, 5_000, "every flow in LB_FLOWS");
    assert_eq!((o.idle_ms.len(), o.scraped_ms.len()), (10, 10));
    assert!(!o.scrape_ms.is_empty(), "the scraper ran");
    assert_eq!(o.scrape_failed, 0, "every scrape answered");
    assert!(o.metrics_bytes > 0);
    assert!(
        o.daemon_clean_exit,
        "the daemon did not exit cleanly on SIGTERM"
    );
    assert!(!o.pin_path.exists(), "{} left behind", o.pin_path.display());
    let mut s = lb_bench::report::Section {
        key: "control".into(),
        title: "Control plane".into(),
        method: String::new(),
        rounds: 1,
        columns: Vec::new(),
        rows: Vec::new(),
        targets: Vec::new(),
        chart: None,
        notes: Vec::new(),
    };
    control_plane::add_scrape(&mut s, &o);
    for name in [
        "API change with 5,000 flows, no scraper, p99",
        "API change with 5,000 flows, `/metrics` scraped every 100 ms, p99",
        "API change p99, scraped minus idle",
    ] {
        assert!(s.row(name).get("ms").is_some_and(f64::is_finite), "{name}");
    }
    assert!(
        s.targets
            .iter()
            .any(|t| t.bar.contains("within 2 ms of the idle p99")),
        "{:?}",
        s.targets
    );
}
