//! The end-to-end benchmark (`lb-bench --only e2e`) leaves nothing behind:
//! every contender's setup is undone after its run, and the whole rig
//! (nginx, namespaces, links, iptables rules, sysctls, lb's pins) after the
//! benchmark, also when it panics. Tiny runs (1 s, one round); no timing is
//! asserted. Needs root, nginx, wrk, haproxy, conntrack and an `lb` binary:
//! `cargo test -p lb-bench --test bench_e2e`.

use std::{
    net::Ipv4Addr,
    panic::{catch_unwind, AssertUnwindSafe},
    path::Path,
    sync::Mutex,
};

use lb_bench::e2e::{
    collect,
    host::{conntrack_count, nft_table_exists, rules_of, LINK_TAG, RULE_TAG},
    section, Contender, Mode, Plan, Rig,
};
use lb_harness::{netns::list_netns, require_root, topology::host_links};

/// The tests share host state they check (iptables, sysctls): one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn ip_forward() -> String {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
        .expect("read ip_forward")
        .trim()
        .to_owned()
}

/// The benchmark's rules (tagged) that name one of `prefix`'s interfaces.
fn tagged_rules(prefix: &str) -> Vec<String> {
    let mut v = Vec::new();
    for table in ["nat", "filter"] {
        for r in rules_of(table) {
            if r.contains(RULE_TAG) && r.contains(prefix) {
                v.push(format!("{table}: {r}"));
            }
        }
    }
    v
}

/// Processes whose command line contains `needle`.
fn processes_naming(needle: &str) -> Vec<String> {
    let mut v = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return v;
    };
    for e in dir.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmdline.contains(needle) {
            v.push(format!("{pid}: {cmdline}"));
        }
    }
    v
}

fn alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Host links whose name starts with `prefix` or that carry the
/// benchmark's alias.
fn links_of(prefix: &str) -> Vec<String> {
    host_links()
        .into_iter()
        .filter(|n| {
            n.starts_with(prefix)
                || std::fs::read_to_string(format!("/sys/class/net/{n}/ifalias"))
                    .is_ok_and(|a| a.trim() == LINK_TAG)
        })
        .collect()
}

/// What must be as before once a rig is gone.
struct Before {
    ip_forward: String,
    nat_table: Option<bool>,
}

impl Before {
    fn now() -> Before {
        Before {
            ip_forward: ip_forward(),
            nat_table: nft_table_exists("nat"),
        }
    }
}

/// Panics unless nothing of a rig with `prefix` (and, if known, its
/// directory, nginx pids and pin path) is left.
fn assert_nothing_left(
    prefix: &str,
    before: &Before,
    dir: Option<&Path>,
    nginx: &[i32],
    pin: Option<&str>,
) {
    let ns: Vec<String> = list_netns()
        .into_iter()
        .filter(|n| n.starts_with(&format!("{prefix}-")))
        .collect();
    assert!(ns.is_empty(), "namespaces left: {ns:?}");
    let links = links_of(prefix);
    assert!(links.is_empty(), "links left: {links:?}");
    let rules = tagged_rules(prefix);
    assert!(rules.is_empty(), "iptables rules left: {rules:?}");
    assert_eq!(
        nft_table_exists("nat"),
        before.nat_table,
        "the nat table's existence changed"
    );
    assert_eq!(ip_forward(), before.ip_forward, "ip_forward not restored");
    let left: Vec<i32> = nginx.iter().copied().filter(|p| alive(*p)).collect();
    assert!(left.is_empty(), "nginx processes left: {left:?}");
    if let Some(dir) = dir {
        let procs = processes_naming(&dir.display().to_string());
        assert!(procs.is_empty(), "processes left: {procs:?}");
        assert!(!dir.exists(), "{} left", dir.display());
    }
    // Any benchmark process of this test binary (nginx -p, haproxy -f, lb
    // --config all name the rig's directory, lb-tests-bench-e2e-PID-...).
    let marker = format!("lb-tests-bench-e2e-{}-", std::process::id());
    let procs = processes_naming(&marker);
    assert!(procs.is_empty(), "processes left: {procs:?}");
    if let Some(pin) = pin {
        assert!(!Path::new(pin).exists(), "pins left under {pin}");
    }
}

#[test]
fn each_contender_is_torn_down_after_its_run_and_the_rig_after_all() {
    require_root();
    let _serial = serial();
    let before = Before::now();
    let rig = Rig::new("lbbt");
    let dir = rig.dir().to_owned();
    let nginx = rig.nginx_pids();
    let pin = rig.pin_path().to_owned();
    assert_eq!(ip_forward(), "1", "forwarding is on while the rig lives");
    assert_eq!(
        nginx.len(),
        6,
        "a master and a worker per backend: {nginx:?}"
    );

    for c in Contender::ALL {
        let s = rig.measure(c, Mode::Close, 1);
        assert!(s.requests > 0, "{c:?}: no request");
        assert_eq!(s.backend_opens.len(), 3);
        let served = s.backend_opens.iter().filter(|n| **n > 0).count();
        let expected = if c == Contender::Direct { 1 } else { 3 };
        assert_eq!(
            served, expected,
            "{c:?}: backends used {:?}",
            s.backend_opens
        );
        // Torn down: no daemon or proxy naming the rig's files, no pins, no
        // nat rule, the nat table as before, no conntrack entry.
        let procs: Vec<String> = processes_naming(&dir.display().to_string())
            .into_iter()
            .filter(|p| !p.contains("nginx"))
            .collect();
        assert!(procs.is_empty(), "{c:?} left processes: {procs:?}");
        assert!(!Path::new(&pin).exists(), "{c:?} left pins under {pin}");
        let nat: Vec<String> = tagged_rules("lbbt")
            .into_iter()
            .filter(|r| r.starts_with("nat"))
            .collect();
        assert!(nat.is_empty(), "{c:?} left nat rules: {nat:?}");
        assert_eq!(
            nft_table_exists("nat"),
            before.nat_table,
            "{c:?}: nat table"
        );
        for addr in rig.client_addrs() {
            assert_eq!(
                conntrack_count(addr),
                0,
                "{c:?}: conntrack entries of {addr}"
            );
        }
        assert!(nginx.iter().all(|p| alive(*p)), "nginx keeps running");
    }
    let addrs: Vec<Ipv4Addr> = rig.client_addrs();
    drop(rig);
    assert_nothing_left("lbbt", &before, Some(&dir), &nginx, Some(&pin));
    for addr in addrs {
        assert_eq!(conntrack_count(addr), 0, "conntrack entries of {addr}");
    }
}

#[test]
fn a_tiny_run_makes_the_section_and_leaves_nothing() {
    require_root();
    let _serial = serial();
    let before = Before::now();
    let plan = Plan {
        prefix: "lbbu".into(),
        rounds: 1,
        secs: 1,
        ..Plan::quick()
    };
    let (samples, nat_before) = collect(&plan);
    assert_nothing_left(
        "lbbu",
        &before,
        None,
        &[],
        Some("/sys/fs/bpf/lb-bench-e2e-lbbu"),
    );
    assert_eq!(samples.len(), 8);
    assert_eq!(nat_before, before.nat_table);
    let sec = section(&plan, &samples, nat_before);
    assert_eq!(sec.key, "e2e");
    assert_eq!(sec.rows.len(), 8);
    assert_eq!(sec.targets.len(), 5, "{:?}", sec.targets);
    for row in &sec.rows {
        assert!(row.get("rps").is_some_and(|r| r > 0.0), "{row:?}");
        assert!(row.get("host_ms_per_1k").is_some(), "{row:?}");
    }
}

#[test]
fn a_panic_with_the_rig_up_leaves_nothing() {
    require_root();
    let _serial = serial();
    let before = Before::now();
    let mut seen = None;
    let result = catch_unwind(AssertUnwindSafe(|| {
        let rig = Rig::new("lbbv");
        seen = Some((rig.dir().to_owned(), rig.nginx_pids()));
        panic!("on purpose, with the rig up");
    }));
    assert!(result.is_err());
    let (dir, nginx) = seen.expect("the rig was built");
    assert_nothing_left("lbbv", &before, Some(&dir), &nginx, None);
}
