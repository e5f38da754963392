//! Prometheus metrics over HTTP: `GET /metrics` in the text exposition
//! format 0.0.4, for `lb run --metrics ADDR`.
//!
//! Every scrape asks the control task for [`Stats`] (the same numbers as
//! `GET /v1/stats` of the admin API), so the maps keep one reader-writer.
//! Counting active flows walks the whole flow table: scrapes closer together
//! than [`MIN_SCRAPE_GAP`] get the previous answer instead of another walk.
//!
//! Backend series are labelled `service` and `backend` (its address), and
//! `container` for a Docker container's backend, so that a container that
//! later gets a dead one's address starts series of its own (from zero:
//! the reconciler zeroes a backend id's counters before reusing it).
//!
//! The format is written here rather than with `prometheus-client`: that
//! crate only writes OpenMetrics text (`# TYPE lb_packets counter` over
//! samples named `lb_packets_total`, then `# EOF`), which a 0.0.4 parser
//! reads as untyped series. The format is small; escaping is the only rule
//! with a trap, and it is tested below.

use std::{
    fmt::Write as _,
    future::Future,
    io,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    extract::State,
    http::{header, StatusCode},
    response::{IntoResponse, Response as HttpResponse},
    routing::get,
    Router,
};
use tokio::{net::TcpListener, sync::Mutex};
use tracing::warn;

use crate::{
    api::types::{BackendInfo, BackendState, Counters, Stats},
    control::{Handle, Request, Response},
};

/// `Content-Type` of the text exposition format 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Scrapes closer together than this share one read of the counters.
pub const MIN_SCRAPE_GAP: Duration = Duration::from_secs(1);

/// Binds the metrics listener. Anyone who can reach it can read service
/// names, backend addresses and traffic counts, so a non-loopback address
/// gets a warning (loopback is what the README recommends).
pub async fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    if !addr.ip().is_loopback() {
        warn!(%addr, "metrics served on a non-loopback address: anyone who can reach it sees services, backends and traffic");
    }
    TcpListener::bind(addr).await
}

/// Serves `GET /metrics` on `addr` until `shutdown` completes.
pub async fn serve(
    addr: SocketAddr,
    handle: Handle,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    serve_on(bind(addr).await?, handle, shutdown).await
}

/// Serves `GET /metrics` on a listener from [`bind`] until `shutdown`
/// completes; binding first lets the daemon refuse a busy port before it
/// attaches anything.
pub async fn serve_on(
    listener: TcpListener,
    handle: Handle,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    axum::serve(listener, router(handle))
        .with_graceful_shutdown(shutdown)
        .await
}

/// The last answer and when it was made.
type Cache = Arc<Mutex<Option<(Instant, String)>>>;

/// The routes: `/metrics` only.
pub fn router(handle: Handle) -> Router {
    let cache: Cache = Arc::default();
    Router::new()
        .route("/metrics", get(metrics))
        .with_state((handle, cache))
}

async fn metrics(State((handle, cache)): State<(Handle, Cache)>) -> HttpResponse {
    // Held across the call, so concurrent scrapes make one request to the
    // control task, not one each.
    let mut last = cache.lock().await;
    let fresh = last
        .as_ref()
        .filter(|(at, _)| at.elapsed() < MIN_SCRAPE_GAP)
        .map(|(_, body)| body.clone());
    let body = match fresh {
        Some(body) => body,
        None => match handle.call(Request::Stats(None)).await {
            Ok(Response::Stats(stats)) => {
                let body = render(&stats);
                *last = Some((Instant::now(), body.clone()));
                body
            }
            Ok(other) => {
                return unavailable(format!("unexpected answer to a stats request: {other:?}"))
            }
            Err(f) => return unavailable(f.message),
        },
    };
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response()
}

/// A failed scrape: Prometheus records `up == 0` and the reason is logged.
fn unavailable(message: String) -> HttpResponse {
    warn!(error = message, "metrics scrape failed");
    (StatusCode::SERVICE_UNAVAILABLE, message + "\n").into_response()
}

/// One metric family being written: `# HELP`, `# TYPE`, then its samples.
struct Family<'a> {
    out: &'a mut String,
    name: &'static str,
}

impl<'a> Family<'a> {
    fn new(out: &'a mut String, name: &'static str, kind: &str, help: &str) -> Self {
        // HELP text is ours and has no `\` or newline to escape.
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        Self { out, name }
    }

    fn sample(&mut self, labels: &[(&str, &str)], value: u64) {
        self.out.push_str(self.name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                self.out.push_str(k);
                self.out.push_str("=\"");
                escape_label_value(self.out, v);
                self.out.push('"');
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }
}

/// Label values escape `\`, `"` and newline; nothing else.
fn escape_label_value(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

type BackendValue = fn(&BackendInfo) -> u64;

/// Per-backend families: name, type, help, value.
const PER_BACKEND: [(&str, &str, &str, BackendValue); 6] = [
    (
        "lb_packets_total",
        "counter",
        "Packets forwarded to the backend.",
        |b| b.counters.packets,
    ),
    (
        "lb_bytes_total",
        "counter",
        "Bytes forwarded to the backend.",
        |b| b.counters.bytes,
    ),
    (
        "lb_new_flows_total",
        "counter",
        "Flows given to the backend.",
        |b| b.counters.new_flows,
    ),
    (
        "lb_active_flows",
        "gauge",
        "Flows of the backend that carried a packet within the flow idle time.",
        |b| b.active_flows,
    ),
    (
        "lb_backend_up",
        "gauge",
        "1 while the backend keeps its flows (active or draining), 0 when down.",
        |b| u64::from(b.state != BackendState::Down),
    ),
    (
        "lb_backend_draining",
        "gauge",
        "1 while the backend is drained: it keeps its flows and takes no new ones.",
        |b| u64::from(b.state == BackendState::Draining),
    ),
];

type ServiceValue = fn(&Counters) -> u64;

/// Per-service counter families: name, help, value.
const PER_SERVICE: [(&str, &str, ServiceValue); 3] = [
    (
        "lb_service_packets_total",
        "Packets forwarded for the service.",
        |c| c.packets,
    ),
    (
        "lb_service_bytes_total",
        "Bytes forwarded for the service.",
        |c| c.bytes,
    ),
    (
        "lb_service_new_flows_total",
        "Flows started for the service.",
        |c| c.new_flows,
    ),
];

/// The whole exposition of `stats`, in the text format 0.0.4.
pub fn render(stats: &Stats) -> String {
    let mut out = String::new();
    for (name, kind, help, value) in PER_BACKEND {
        let mut f = Family::new(&mut out, name, kind, help);
        for s in &stats.services {
            for b in &s.backends {
                // A container's series carry its name: another container
                // at the same address later is another series.
                match &b.container {
                    Some(c) => f.sample(
                        &[
                            ("service", &s.name),
                            ("backend", &b.address),
                            ("container", c),
                        ],
                        value(b),
                    ),
                    None => f.sample(&[("service", &s.name), ("backend", &b.address)], value(b)),
                }
            }
        }
    }
    for (name, help, value) in PER_SERVICE {
        let mut f = Family::new(&mut out, name, "counter", help);
        for s in &stats.services {
            f.sample(&[("service", &s.name)], value(&s.counters));
        }
    }
    let mut f = Family::new(
        &mut out,
        "lb_datapath_packets_total",
        "counter",
        "Packets by data path outcome. Outcomes overlap (pass_to_skb_path then fwd_skb; flow_rebalanced is also forwarded): do not sum them.",
    );
    for (outcome, n) in &stats.global {
        f.sample(&[("outcome", outcome)], *n);
    }
    out
}

#[cfg(test)]
mod dashboard;

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;
    use crate::{
        api::types::{Health, ServiceStats},
        control::Input,
    };

    fn backend(address: &str, state: BackendState, packets: u64, flows: u64) -> BackendInfo {
        BackendInfo {
            address: address.into(),
            weight: 1,
            state,
            health: Health::Unchecked,
            last_check: None,
            active_flows: flows,
            counters: Counters {
                packets,
                bytes: packets * 100,
                new_flows: packets / 10,
            },
            container: None,
            node: None,
        }
    }

    fn stats() -> Stats {
        Stats {
            services: vec![
                ServiceStats {
                    name: "web".into(),
                    counters: Counters {
                        packets: 30,
                        bytes: 3000,
                        new_flows: 3,
                    },
                    active_flows: 5,
                    backends: vec![
                        backend("198.18.103.2:8080", BackendState::Active, 10, 2),
                        backend("198.18.104.2:8080", BackendState::Draining, 20, 3),
                    ],
                },
                ServiceStats {
                    // Not a name the API accepts, but the encoder must not care.
                    name: "we\"ird\\name\nx".into(),
                    counters: Counters::default(),
                    active_flows: 0,
                    backends: vec![backend("198.18.105.2:53", BackendState::Down, 0, 0)],
                },
            ],
            global: BTreeMap::from([("fwd_xdp".into(), 7), ("pass_no_service".into(), 9)]),
        }
    }

    /// A sample: name, labels in order (unescaped), value.
    type Sample = (String, Vec<(String, String)>, u64);

    /// Parses the text format 0.0.4 as a scraper would, strictly enough to
    /// fail on bad escaping: families announced before their samples, one
    /// TYPE per family, no series twice.
    fn parse(text: &str) -> (BTreeMap<String, String>, Vec<Sample>) {
        let mut types = BTreeMap::new();
        let mut samples = Vec::new();
        let mut seen = BTreeSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(
                    types.insert(name.to_owned(), kind.to_owned()).is_none(),
                    "{line}"
                );
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            assert!(!line.starts_with('#') && !line.is_empty(), "{line:?}");
            let name_end = line.find(['{', ' ']).unwrap();
            let name = &line[..name_end];
            let mut rest = &line[name_end..];
            let mut labels = Vec::new();
            if let Some(r) = rest.strip_prefix('{') {
                let mut chars = r.char_indices();
                let mut key = String::new();
                loop {
                    let (_, c) = chars.next().unwrap();
                    match c {
                        '}' => break,
                        ',' => {}
                        '=' => {
                            assert_eq!(chars.next().unwrap().1, '"', "{line}");
                            let mut value = String::new();
                            loop {
                                match chars.next().unwrap().1 {
                                    '"' => break,
                                    '\\' => match chars.next().unwrap().1 {
                                        'n' => value.push('\n'),
                                        c @ ('\\' | '"') => value.push(c),
                                        c => panic!("bad escape \\{c} in {line}"),
                                    },
                                    '\n' => panic!("raw newline in {line}"),
                                    c => value.push(c),
                                }
                            }
                            labels.push((std::mem::take(&mut key), value));
                        }
                        c => key.push(c),
                    }
                }
                rest = &r[chars.offset()..];
            }
            let value: u64 = rest.strip_prefix(' ').unwrap().parse().unwrap();
            assert!(types.contains_key(name), "{name} has no TYPE before it");
            assert!(
                seen.insert((name.to_owned(), labels.clone())),
                "{line} twice"
            );
            samples.push((name.to_owned(), labels, value));
        }
        (types, samples)
    }

    fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<u64> {
        samples
            .iter()
            .find(|(n, l, _)| {
                n == name
                    && l.len() == labels.len()
                    && l.iter()
                        .zip(labels)
                        .all(|((k, v), (k2, v2))| k == k2 && v == v2)
            })
            .map(|(_, _, v)| *v)
    }

    #[test]
    fn renders_every_family_with_its_type() {
        let (types, samples) = parse(&render(&stats()));
        let counters = [
            "lb_packets_total",
            "lb_bytes_total",
            "lb_new_flows_total",
            "lb_service_packets_total",
            "lb_service_bytes_total",
            "lb_service_new_flows_total",
            "lb_datapath_packets_total",
        ];
        let gauges = ["lb_active_flows", "lb_backend_up", "lb_backend_draining"];
        for c in counters {
            assert_eq!(types.get(c).map(String::as_str), Some("counter"), "{c}");
        }
        for g in gauges {
            assert_eq!(types.get(g).map(String::as_str), Some("gauge"), "{g}");
        }
        assert_eq!(types.len(), counters.len() + gauges.len());
        // 3 backends x 6 families, 2 services x 3, 2 outcomes.
        assert_eq!(samples.len(), 3 * 6 + 2 * 3 + 2);
    }

    #[test]
    fn values_and_labels_come_from_the_stats() {
        let (_, s) = parse(&render(&stats()));
        let a = [("service", "web"), ("backend", "198.18.103.2:8080")];
        let d = [("service", "web"), ("backend", "198.18.104.2:8080")];
        assert_eq!(value(&s, "lb_packets_total", &a), Some(10));
        assert_eq!(value(&s, "lb_bytes_total", &d), Some(2000));
        assert_eq!(value(&s, "lb_new_flows_total", &d), Some(2));
        assert_eq!(value(&s, "lb_active_flows", &d), Some(3));
        assert_eq!(value(&s, "lb_backend_up", &a), Some(1));
        assert_eq!(value(&s, "lb_backend_up", &d), Some(1));
        assert_eq!(value(&s, "lb_backend_draining", &a), Some(0));
        assert_eq!(value(&s, "lb_backend_draining", &d), Some(1));
        assert_eq!(
            value(&s, "lb_service_packets_total", &[("service", "web")]),
            Some(30)
        );
        assert_eq!(
            value(&s, "lb_service_bytes_total", &[("service", "web")]),
            Some(3000)
        );
        assert_eq!(
            value(&s, "lb_service_new_flows_total", &[("service", "web")]),
            Some(3)
        );
        let outcome = |o| value(&s, "lb_datapath_packets_total", &[("outcome", o)]);
        assert_eq!(outcome("fwd_xdp"), Some(7));
        assert_eq!(outcome("pass_no_service"), Some(9));
    }

    #[test]
    fn container_backends_carry_the_container_name() {
        let mut stats = stats();
        stats.services[0].backends[1].container = Some("web-2".into());
        let (_, s) = parse(&render(&stats));
        let plain = [("service", "web"), ("backend", "198.18.103.2:8080")];
        let container = [
            ("service", "web"),
            ("backend", "198.18.104.2:8080"),
            ("container", "web-2"),
        ];
        assert_eq!(value(&s, "lb_packets_total", &plain), Some(10));
        assert_eq!(value(&s, "lb_packets_total", &container), Some(20));
        assert_eq!(value(&s, "lb_backend_draining", &container), Some(1));
        // The address alone no longer names that series.
        let bare = [("service", "web"), ("backend", "198.18.104.2:8080")];
        assert_eq!(value(&s, "lb_packets_total", &bare), None);
    }

    #[test]
    fn label_values_are_escaped() {
        let text = render(&stats());
        assert!(text.contains(r#"service="we\"ird\\name\nx""#), "{text}");
        let (_, s) = parse(&text);
        let weird = [
            ("service", "we\"ird\\name\nx"),
            ("backend", "198.18.105.2:53"),
        ];
        assert_eq!(value(&s, "lb_backend_up", &weird), Some(0));
    }

    #[test]
    fn no_services_still_parses() {
        let text = render(&Stats {
            services: vec![],
            global: BTreeMap::new(),
        });
        let (types, samples) = parse(&text);
        assert_eq!(types.len(), 10);
        assert!(samples.is_empty());
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n");
        conn.write_all(req.as_bytes()).await.unwrap();
        let mut answer = String::new();
        conn.read_to_string(&mut answer).await.unwrap();
        answer
    }

    #[tokio::test]
    async fn serves_metrics_from_the_control_task() {
        // A stand-in control task that counts the stats requests it answers.
        let (handle, mut inbox) = Handle::new();
        let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = asked.clone();
        tokio::spawn(async move {
            while let Some(input) = inbox.recv().await {
                if let Input::Call(Request::Stats(None), reply) = input {
                    counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let _ = reply.send(Ok(Response::Stats(stats())));
                }
            }
        });
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_on(listener, handle, async {
            let _ = stopped.await;
        }));

        let answer = get(addr, "/metrics").await;
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains(&format!("content-type: {CONTENT_TYPE}")),
            "{head}"
        );
        assert_eq!(body, render(&stats()));
        // A second scrape right after is served from the first answer.
        let again = get(addr, "/metrics").await;
        assert!(again.ends_with(body));
        assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 1);

        let other = get(addr, "/v1/stats").await;
        assert!(other.starts_with("HTTP/1.1 404"), "{other}");

        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }
}
