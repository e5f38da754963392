//! Human output: aligned tables and readable numbers. Pure functions of the
//! API's types, so they are tested without a daemon.

use std::time::{Duration, UNIX_EPOCH};

use serde::Serialize;

use super::rates::{Rate, Rates};
use crate::{
    api::types::{
        BackendInfo, BackendState, CheckKind, Counters, Event, HealthCheck, ServiceInfo, Stats,
        Status,
    },
    model::{one_line, DEFAULT_HTTP_PATH, DEFAULT_HTTP_STATUS},
};

/// Alignment of a table column.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Align {
    /// Text.
    Left,
    /// Numbers.
    Right,
}

/// A table with a header row; columns separated by two spaces.
#[derive(Clone, Debug)]
pub struct Table {
    header: Vec<&'static str>,
    align: Vec<Align>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these columns.
    pub fn new(columns: &[(&'static str, Align)]) -> Self {
        Self {
            header: columns.iter().map(|c| c.0).collect(),
            align: columns.iter().map(|c| c.1).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row, one cell per column.
    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.header.len());
        self.rows.push(cells);
    }

    /// The lines, each ending in `\n`, without trailing blanks.
    pub fn render(&self) -> String {
        let header: Vec<String> = self.header.iter().map(|h| h.to_string()).collect();
        let mut widths = vec![0; self.header.len()];
        for row in std::iter::once(&header).chain(&self.rows) {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                let pad = widths[i] - cell.chars().count();
                match self.align[i] {
                    Align::Left => {
                        line.push_str(cell);
                        line.extend(std::iter::repeat_n(' ', pad));
                    }
                    Align::Right => {
                        line.extend(std::iter::repeat_n(' ', pad));
                        line.push_str(cell);
                    }
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Key/value lines, keys padded to one width.
pub fn key_values(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|p| p.0.len()).max().unwrap_or(0);
    pairs
        .iter()
        .map(|(k, v)| format!("{k:width$}  {v}").trim_end().to_string() + "\n")
        .collect()
}

/// The API's name of an enum value (`"active"`, `"api"`, …).
pub fn api_name<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => "?".into(),
    }
}

/// IEC units above bytes.
const IEC: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];

/// Bytes with IEC units: `512 B`, `1.5 KiB`, `3.0 GiB`.
pub fn bytes(n: u64) -> String {
    if n < 1024 {
        return format!("{n} B");
    }
    scaled(n as f64 / 1024.0, 1024.0, &IEC, " ")
}

/// A rate of bytes: `0 B/s`, `1.2 MiB/s`.
pub fn bytes_rate(per_sec: f64) -> String {
    if per_sec < 1023.5 {
        return format!("{per_sec:.0} B/s");
    }
    scaled(per_sec / 1024.0, 1024.0, &IEC, " ") + "/s"
}

/// A rate of packets or flows per second: `0.0`, `12.5`, `1.2k`, `3.4M`.
pub fn count_rate(per_sec: f64) -> String {
    if per_sec < 999.95 {
        return format!("{per_sec:.1}");
    }
    scaled(
        per_sec / 1000.0,
        1000.0,
        &["k", "M", "G", "T", "P", "E"],
        "",
    )
}

/// `value` in `units[0]`, moved to larger units while it would show as
/// `base` or more with one decimal (1023.96 KiB is `1.0 MiB`, not
/// `1024.0 KiB`).
fn scaled(mut value: f64, base: f64, units: &[&str], sep: &str) -> String {
    let mut unit = 0;
    while value >= base - 0.05 && unit + 1 < units.len() {
        value /= base;
        unit += 1;
    }
    format!("{value:.1}{sep}{}", units[unit])
}

/// A duration as `45s`, `2m 5s`, `1h 0m 3s`, `3d 4h 5m 6s`.
pub fn uptime(secs: u64) -> String {
    let parts = [
        (secs / 86_400, "d"),
        (secs / 3_600 % 24, "h"),
        (secs / 60 % 60, "m"),
        (secs % 60, "s"),
    ];
    let first = parts.iter().position(|p| p.0 > 0).unwrap_or(3);
    parts[first..]
        .iter()
        .map(|(n, u)| format!("{n}{u}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Fill level as a percentage with one decimal, `-` for no capacity.
pub fn fill(used: u64, capacity: u64) -> String {
    if capacity == 0 {
        return "-".into();
    }
    format!("{:.1}%", used as f64 * 100.0 / capacity as f64)
}

/// A health check in one cell.
pub fn health_check(h: &HealthCheck) -> String {
    let what = match h.kind {
        CheckKind::Tcp => "tcp".to_owned(),
        CheckKind::Http => format!(
            "http GET {} = {}",
            h.path.as_deref().unwrap_or(DEFAULT_HTTP_PATH),
            h.status.unwrap_or(DEFAULT_HTTP_STATUS)
        ),
        CheckKind::Udp => format!("udp {:?}", h.payload.as_deref().unwrap_or_default()),
    };
    format!(
        "{what} every {}ms, timeout {}ms, rise {}, fall {}",
        h.interval_ms, h.timeout_ms, h.rise, h.fall
    )
}

/// A backend's last health check in one cell: what it found, `-` before
/// the first.
fn last_check(b: &BackendInfo) -> String {
    b.last_check
        .as_ref()
        .map_or_else(|| "-".into(), |c| one_line(&c.detail))
}

/// `lb service ls`.
pub fn services(list: &[ServiceInfo]) -> String {
    let mut t = Table::new(&[
        ("NAME", Align::Left),
        ("VIP", Align::Left),
        ("PROTO", Align::Left),
        ("BACKENDS", Align::Right),
        ("TABLE", Align::Right),
        ("ORIGIN", Align::Left),
        ("IMAGE", Align::Left),
        ("HEALTH", Align::Left),
    ]);
    for s in list {
        let image = match (&s.image, s.target_port) {
            (Some(i), Some(p)) => format!("{i} port {p}"),
            (Some(i), None) => i.clone(),
            (None, Some(p)) => format!("port {p}"),
            (None, None) => "-".into(),
        };
        t.row(vec![
            s.name.clone(),
            s.vip.clone(),
            s.protocol.to_string(),
            format!("{}/{}", s.active_backends, s.backends),
            s.table_size.to_string(),
            api_name(&s.origin),
            image,
            s.health.as_ref().map_or("-".into(), health_check),
        ]);
    }
    t.render()
}

/// `lb backend ls`.
pub fn backends(list: &[BackendInfo]) -> String {
    let mut t = Table::new(&[
        ("ADDRESS", Align::Left),
        ("WEIGHT", Align::Right),
        ("STATE", Align::Left),
        ("HEALTH", Align::Left),
        ("LAST CHECK", Align::Left),
        ("ACTIVE FLOWS", Align::Right),
        ("PACKETS", Align::Right),
        ("BYTES", Align::Right),
        ("CONTAINER", Align::Left),
    ]);
    for b in list {
        t.row(vec![
            b.address.clone(),
            b.weight.to_string(),
            api_name(&b.state),
            api_name(&b.health),
            last_check(b),
            b.active_flows.to_string(),
            b.counters.packets.to_string(),
            bytes(b.counters.bytes),
            b.container.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    t.render()
}

/// `lb stats`: one row per service and, indented below it, one per
/// backend; with `rates` (from `--watch`) the per-second columns too, `-`
/// where there is no earlier snapshot to compare with. Data path totals
/// follow when `global` is set.
pub fn stats(s: &Stats, rates: Option<&Rates>, watching: bool, global: bool) -> String {
    let mut columns = vec![
        ("NAME", Align::Left),
        ("PACKETS", Align::Right),
        ("BYTES", Align::Right),
        ("NEW FLOWS", Align::Right),
        ("ACTIVE FLOWS", Align::Right),
    ];
    if watching {
        columns.extend([
            ("PACKETS/S", Align::Right),
            ("BYTES/S", Align::Right),
            ("NEW FLOWS/S", Align::Right),
        ]);
    }
    let mut t = Table::new(&columns);
    let row = |name: String, c: &Counters, active: u64, rate: Option<&Rate>| {
        let mut cells = vec![
            name,
            c.packets.to_string(),
            bytes(c.bytes),
            c.new_flows.to_string(),
            active.to_string(),
        ];
        if watching {
            match rate {
                Some(r) => cells.extend([
                    count_rate(r.packets_per_sec),
                    bytes_rate(r.bytes_per_sec),
                    count_rate(r.new_flows_per_sec),
                ]),
                None => cells.extend(["-".to_string(), "-".into(), "-".into()]),
            }
        }
        cells
    };
    for svc in &s.services {
        let rate = rates.and_then(|r| r.service(&svc.name));
        t.row(row(svc.name.clone(), &svc.counters, svc.active_flows, rate));
        for b in &svc.backends {
            let name = match b.state {
                BackendState::Active => format!("  {}", b.address),
                other => format!("  {} ({})", b.address, api_name(&other)),
            };
            let rate = rates.and_then(|r| r.backend(&svc.name, &b.address));
            t.row(row(name, &b.counters, b.active_flows, rate));
        }
    }
    let mut out = t.render();
    if global && !s.global.is_empty() {
        let mut g = Table::new(&[("DATA PATH", Align::Left), ("COUNT", Align::Right)]);
        for (name, n) in &s.global {
            g.row(vec![name.clone(), n.to_string()]);
        }
        out.push('\n');
        out.push_str(&g.render());
    }
    out
}

/// A time as `YYYY-MM-DD HH:MM:SS UTC`, from seconds since the Unix epoch.
pub fn utc(unix_secs: u64) -> String {
    let t = crate::events::rfc3339(UNIX_EPOCH + Duration::from_secs(unix_secs));
    // `YYYY-MM-DDTHH:MM:SS.mmmZ`
    format!("{} {} UTC", &t[..10], &t[11..19])
}

/// The Docker lines of `lb status`: how many containers serve, in which
/// services, and when the engine last listed them.
fn containers(s: &Status) -> Vec<(&'static str, String)> {
    let c = &s.containers;
    let mut serving = format!("{} serving of {} running", c.serving, c.running);
    if !c.services.is_empty() {
        let per: Vec<String> = c
            .services
            .iter()
            .map(|(service, names)| format!("{service}: {}", names.len()))
            .collect();
        serving.push_str(&format!(" ({})", per.join(", ")));
    }
    if !c.skipped.is_empty() {
        serving.push_str(&format!(
            ", {} skipped ({})",
            c.skipped.len(),
            c.skipped.join(", ")
        ));
    }
    let listed = match (c.last_list_unix_secs, c.last_list_age_secs) {
        (Some(at), Some(age)) => format!("{} ({} ago)", utc(at), uptime(age)),
        (Some(at), None) => utc(at),
        _ => "not yet".into(),
    };
    vec![("containers", serving), ("last list", listed)]
}

/// `lb status`.
pub fn status(s: &Status) -> String {
    let mut pairs = vec![
        ("version", s.version.clone()),
        ("uptime", uptime(s.uptime_secs)),
        ("services", s.services.to_string()),
        ("docker", s.docker.clone()),
    ];
    if s.docker != "disabled" {
        pairs.extend(containers(s));
    }
    pairs.extend([
        (
            "pin path",
            if s.pin_path.is_empty() {
                "-".into()
            } else {
                s.pin_path.clone()
            },
        ),
        ("adopted", if s.adopted { "yes" } else { "no" }.into()),
    ]);
    let mut out = key_values(&pairs);
    let mut ifaces = Table::new(&[
        ("INTERFACE", Align::Left),
        ("IFINDEX", Align::Right),
        ("ROLE", Align::Left),
        ("PROGRAMS", Align::Left),
    ]);
    for i in &s.interfaces {
        ifaces.row(vec![
            i.name.clone(),
            i.ifindex.to_string(),
            i.role.clone(),
            if i.programs.is_empty() {
                "-".into()
            } else {
                i.programs.join(", ")
            },
        ]);
    }
    let mut maps = Table::new(&[
        ("MAP", Align::Left),
        ("USED", Align::Right),
        ("CAPACITY", Align::Right),
        ("FILL", Align::Right),
    ]);
    for m in &s.maps {
        maps.row(vec![
            m.name.clone(),
            m.used.to_string(),
            m.capacity.to_string(),
            fill(m.used, m.capacity),
        ]);
    }
    let mut links = Table::new(&[
        ("LINK", Align::Right),
        ("HOOK", Align::Left),
        ("INTERFACE", Align::Left),
        ("IFINDEX", Align::Right),
        ("PROGRAM", Align::Right),
        ("PINNED AT", Align::Left),
    ]);
    let id = |n: Option<u32>| n.map_or("-".into(), |n| n.to_string());
    for a in &s.attachments {
        links.row(vec![
            id(a.link_id),
            a.hook.clone(),
            a.interface.clone(),
            a.ifindex.to_string(),
            id(a.program_id),
            a.pin.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    out.push('\n');
    out.push_str(&ifaces.render());
    if !s.attachments.is_empty() {
        out.push('\n');
        out.push_str(&links.render());
    }
    out.push('\n');
    out.push_str(&maps.render());
    out
}

/// One event as one line: time, sequence number, kind, then what it is
/// about (service, backend, container, state, weight, why, detail).
pub fn event(e: &Event) -> String {
    let c = &e.change;
    let mut parts: Vec<String> = Vec::new();
    if let Some(s) = &c.service {
        parts.push(s.clone());
    }
    if let (Some(vip), Some(p)) = (&c.vip, c.protocol) {
        parts.push(format!("{vip}/{p}"));
    }
    if let Some(b) = &c.backend {
        parts.push(b.clone());
    }
    if let Some(name) = &c.container {
        parts.push(format!("container={name}"));
    }
    if let Some(state) = c.state {
        parts.push(format!("state={}", api_name(&state)));
    }
    if let Some(w) = c.weight {
        parts.push(format!("weight={w}"));
    }
    if let Some(r) = c.reason {
        parts.push(format!("reason={}", api_name(&r)));
    }
    if let Some(d) = &c.detail {
        parts.push(d.clone());
    }
    let line = format!(
        "{}  {:>6}  {:<16}  {}",
        e.time,
        e.seq,
        api_name(&c.kind),
        parts.join("  ")
    );
    line.replace(char::is_control, " ") + "\n"
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, time::Duration};

    use super::*;
    use crate::api::types::{
        AttachmentStatus, BackendInfo, CheckResult, ContainersStatus, Forwarding, Health,
        InterfaceStatus, MapStatus, Origin, Protocol, ServiceStats,
    };

    fn counters(packets: u64, bytes: u64, new_flows: u64) -> Counters {
        Counters {
            packets,
            bytes,
            new_flows,
        }
    }

    fn backend(address: &str, state: BackendState, c: Counters) -> BackendInfo {
        BackendInfo {
            address: address.into(),
            weight: 1,
            state,
            health: Health::Unchecked,
            last_check: None,
            active_flows: 2,
            counters: c,
            container: None,
            node: None,
        }
    }

    #[test]
    fn byte_units() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1024), "1.0 KiB");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(1024 * 1024 - 1), "1.0 MiB");
        assert_eq!(bytes(5 * 1024 * 1024 * 1024), "5.0 GiB");
        assert_eq!(bytes(u64::MAX), "16.0 EiB");
        assert_eq!(bytes_rate(0.0), "0 B/s");
        assert_eq!(bytes_rate(1023.4), "1023 B/s");
        assert_eq!(bytes_rate(1023.6), "1.0 KiB/s");
        assert_eq!(bytes_rate(3.5 * 1024.0 * 1024.0), "3.5 MiB/s");
    }

    #[test]
    fn count_rates() {
        assert_eq!(count_rate(0.0), "0.0");
        assert_eq!(count_rate(12.46), "12.5");
        assert_eq!(count_rate(999.9), "999.9");
        assert_eq!(count_rate(999.96), "1.0k");
        assert_eq!(count_rate(1_234.0), "1.2k");
        assert_eq!(count_rate(3_400_000.0), "3.4M");
    }

    #[test]
    fn uptimes_and_fill() {
        assert_eq!(uptime(0), "0s");
        assert_eq!(uptime(45), "45s");
        assert_eq!(uptime(125), "2m 5s");
        assert_eq!(uptime(3_603), "1h 0m 3s");
        assert_eq!(uptime(3 * 86_400 + 4 * 3_600 + 5 * 60 + 6), "3d 4h 5m 6s");
        assert_eq!(fill(3, 64), "4.7%");
        assert_eq!(fill(0, 64), "0.0%");
        assert_eq!(fill(64, 64), "100.0%");
        assert_eq!(fill(0, 0), "-");
    }

    #[test]
    fn tables_align_and_trim() {
        let mut t = Table::new(&[
            ("A", Align::Left),
            ("NUM", Align::Right),
            ("C", Align::Left),
        ]);
        t.row(vec!["long name".into(), "5".into(), "".into()]);
        t.row(vec!["x".into(), "12345".into(), "z".into()]);
        assert_eq!(
            t.render(),
            "A            NUM  C\n\
             long name      5\n\
             x          12345  z\n"
        );
        assert_eq!(
            key_values(&[("version", "1".into()), ("pin path", "-".into())]),
            "version   1\npin path  -\n"
        );
    }

    #[test]
    fn enum_names_are_the_apis() {
        assert_eq!(api_name(&BackendState::Draining), "draining");
        assert_eq!(api_name(&Health::Unhealthy), "unhealthy");
        assert_eq!(api_name(&Origin::Api), "api");
    }

    #[test]
    fn service_table() {
        let s = ServiceInfo {
            name: "api".into(),
            vip: "198.18.101.2:80".into(),
            protocol: Protocol::Tcp,
            table_size: 65537,
            origin: Origin::Api,
            image: Some("nginx".into()),
            target_port: Some(8080),
            health: Some(HealthCheck::default()),
            forwarding: Forwarding::Nat,
            backends: 3,
            active_backends: 2,
        };
        let out = services(&[s]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("NAME  VIP"), "{out}");
        assert_eq!(
            lines[1],
            "api   198.18.101.2:80  tcp         2/3  65537  api     nginx port 8080  \
             tcp every 1000ms, timeout 500ms, rise 2, fall 3"
        );
        // No services: the header alone.
        assert_eq!(services(&[]).lines().count(), 1);
    }

    #[test]
    fn backend_table() {
        let out = backends(&[backend(
            "198.18.7.1:8080",
            BackendState::Draining,
            counters(10, 2048, 1),
        )]);
        assert_eq!(
            out,
            "ADDRESS          WEIGHT  STATE     HEALTH     LAST CHECK  ACTIVE FLOWS  PACKETS    BYTES  CONTAINER\n\
             198.18.7.1:8080       1  draining  unchecked  -                      2       10  2.0 KiB  -\n"
        );
    }

    #[test]
    fn backend_table_says_what_the_last_check_found() {
        let mut b = backend("198.18.7.1:8080", BackendState::Down, counters(0, 0, 0));
        b.health = Health::Unhealthy;
        b.last_check = Some(CheckResult {
            ok: false,
            detail: "HTTP 503, expected 200".into(),
            time: "2026-12-02T15:00:00.000Z".into(),
            took_ms: 3,
        });
        let out = backends(&[b]);
        let row = out.lines().nth(1).unwrap();
        assert!(row.contains("unhealthy  HTTP 503, expected 200"), "{out}");
    }

    #[test]
    fn health_checks_of_each_kind_in_one_cell() {
        let http = HealthCheck {
            kind: CheckKind::Http,
            path: Some("/healthz".into()),
            status: Some(204),
            ..HealthCheck::default()
        };
        assert_eq!(
            health_check(&http),
            "http GET /healthz = 204 every 1000ms, timeout 500ms, rise 2, fall 3"
        );
        let udp = HealthCheck {
            kind: CheckKind::Udp,
            payload: Some("ping".into()),
            ..HealthCheck::default()
        };
        assert_eq!(
            health_check(&udp),
            "udp \"ping\" every 1000ms, timeout 500ms, rise 2, fall 3"
        );
    }

    fn sample_stats() -> Stats {
        Stats {
            services: vec![ServiceStats {
                name: "web".into(),
                counters: counters(30, 3000, 3),
                active_flows: 3,
                backends: vec![
                    backend("198.18.7.1:80", BackendState::Active, counters(20, 2000, 2)),
                    backend("198.18.7.2:80", BackendState::Down, counters(10, 1000, 1)),
                ],
            }],
            global: BTreeMap::from([("fwd_xdp".to_string(), 30), ("pass_not_ipv4".into(), 7)]),
        }
    }

    #[test]
    fn stats_table() {
        let out = stats(&sample_stats(), None, false, true);
        assert_eq!(
            out,
            "NAME                    PACKETS    BYTES  NEW FLOWS  ACTIVE FLOWS\n\
             web                          30  2.9 KiB          3             3\n\
             \x20 198.18.7.1:80              20  2.0 KiB          2             2\n\
             \x20 198.18.7.2:80 (down)       10   1000 B          1             2\n\
             \n\
             DATA PATH      COUNT\n\
             fwd_xdp           30\n\
             pass_not_ipv4      7\n"
        );
        // One service asked for: no totals.
        assert!(!stats(&sample_stats(), None, false, false).contains("DATA PATH"));
    }

    #[test]
    fn stats_table_with_rates() {
        let before = sample_stats();
        let mut after = sample_stats();
        after.services[0].counters = counters(130, 3000 + 2048 * 10, 13);
        after.services[0].backends[0].counters = counters(120, 2000 + 2048 * 10, 12);
        let r = Rates::between(&before, &after, Duration::from_secs(10));
        assert_eq!(
            stats(&after, Some(&r), true, false),
            "NAME                    PACKETS     BYTES  NEW FLOWS  ACTIVE FLOWS  PACKETS/S    BYTES/S  NEW FLOWS/S\n\
             web                         130  22.9 KiB         13             3       10.0  2.0 KiB/s          1.0\n\
             \x20 198.18.7.1:80             120  22.0 KiB         12             2       10.0  2.0 KiB/s          1.0\n\
             \x20 198.18.7.2:80 (down)       10    1000 B          1             2        0.0      0 B/s          0.0\n"
        );
        // The first frame of a watch has nothing to compare with.
        let first = stats(&after, None, true, false);
        assert!(
            first
                .lines()
                .nth(1)
                .unwrap()
                .ends_with("-        -            -"),
            "{first}"
        );
    }

    #[test]
    fn status_view() {
        let mut s = Status {
            version: "0.1.0".into(),
            uptime_secs: 3_723,
            adopted: false,
            pin_path: String::new(),
            interfaces: vec![InterfaceStatus {
                name: "eth1".into(),
                ifindex: 2,
                role: "external".into(),
                programs: vec!["xdp".into(), "tc".into()],
            }],
            maps: vec![MapStatus {
                name: "LB_SERVICES".into(),
                used: 3,
                capacity: 64,
            }],
            docker: "disabled".into(),
            services: 3,
            containers: ContainersStatus::default(),
            attachments: Vec::new(),
        };
        assert_eq!(
            status(&s),
            "version   0.1.0\n\
             uptime    1h 2m 3s\n\
             services  3\n\
             docker    disabled\n\
             pin path  -\n\
             adopted   no\n\
             \n\
             INTERFACE  IFINDEX  ROLE      PROGRAMS\n\
             eth1             2  external  xdp, tc\n\
             \n\
             MAP          USED  CAPACITY  FILL\n\
             LB_SERVICES     3        64  4.7%\n"
        );
        s.docker = "connected to unix:///var/run/docker.sock (API 1.41)".into();
        s.containers = ContainersStatus {
            running: 4,
            serving: 3,
            services: BTreeMap::from([
                ("echo".into(), vec!["c".into()]),
                ("web".into(), vec!["a".into(), "b".into()]),
            ]),
            skipped: vec!["bad".into()],
            last_list_unix_secs: Some(1_764_665_529),
            last_list_age_secs: Some(12),
        };
        s.attachments = vec![
            AttachmentStatus {
                interface: "eth1".into(),
                ifindex: 2,
                hook: "xdp".into(),
                link_id: Some(12),
                program_id: Some(34),
                pin: Some("/sys/fs/bpf/lb/x/links/xdp-2".into()),
            },
            AttachmentStatus {
                interface: "eth1".into(),
                ifindex: 2,
                hook: "tc".into(),
                link_id: None,
                program_id: None,
                pin: None,
            },
        ];
        let out = status(&s);
        for want in [
            "docker      connected to unix:///var/run/docker.sock (API 1.41)\n",
            "containers  3 serving of 4 running (echo: 1, web: 2), 1 skipped (bad)\n",
            "last list   2025-12-02 08:52:09 UTC (12s ago)\n",
            "LINK  HOOK  INTERFACE  IFINDEX  PROGRAM  PINNED AT\n  \
               12  xdp   eth1             2       34  /sys/fs/bpf/lb/x/links/xdp-2\n   \
                -  tc    eth1             2        -  -\n",
        ] {
            assert!(out.contains(want), "{want:?} in\n{out}");
        }
    }

    #[test]
    fn utc_times() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_709_251_199), "2024-02-29 23:59:59 UTC");
        assert_eq!(utc(1_735_689_599), "2024-12-31 23:59:59 UTC");
        assert_eq!(utc(1_764_665_529), "2025-12-02 08:52:09 UTC");
    }

    #[test]
    fn an_event_is_one_readable_line() {
        use crate::api::types::{Change, EventKind, Reason};
        let e = Event {
            seq: 42,
            time: "2026-12-02T11:46:47.123Z".into(),
            change: Change {
                service: Some("web".into()),
                backend: Some("198.19.0.2:80".into()),
                container: Some("web-1".into()),
                state: Some(BackendState::Down),
                weight: Some(1),
                reason: Some(Reason::DockerDie),
                ..Change::new(EventKind::BackendDown)
            },
        };
        assert_eq!(
            event(&e),
            "2026-12-02T11:46:47.123Z      42  backend_down      web  198.19.0.2:80  \
             container=web-1  state=down  weight=1  reason=docker_die\n"
        );
        let gap = Event {
            seq: 6,
            time: "2026-12-02T11:46:47.123Z".into(),
            change: Change {
                detail: Some("events 3 to 6 are gone\nreally".into()),
                ..Change::new(EventKind::Gap)
            },
        };
        assert_eq!(
            event(&gap),
            "2026-12-02T11:46:47.123Z       6  gap               events 3 to 6 are gone really\n",
            "one line, whatever the detail holds"
        );
    }
}
