//! Rates for `lb stats --watch`: the difference between two snapshots of
//! the counters over the time between them.

use std::{collections::HashMap, time::Duration};

use serde::Serialize;
use serde_json::Value;

use crate::api::types::{Counters, Stats};

/// Per-second rates of one service or backend. Its JSON (`--watch
/// --json`) is `{"packets_per_sec", "bytes_per_sec", "new_flows_per_sec"}`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Rate {
    /// Packets per second.
    pub packets_per_sec: f64,
    /// Bytes per second.
    pub bytes_per_sec: f64,
    /// New flows per second.
    pub new_flows_per_sec: f64,
}

impl Rate {
    /// The rate from `prev` to `cur` over `elapsed`; `None` when no time
    /// passed or a counter went down (the counters were reset: a daemon
    /// restart, or a backend removed and added again).
    pub fn between(prev: &Counters, cur: &Counters, elapsed: Duration) -> Option<Rate> {
        let secs = elapsed.as_secs_f64();
        if secs <= 0.0 {
            return None;
        }
        let per_sec = |a: u64, b: u64| b.checked_sub(a).map(|d| d as f64 / secs);
        Some(Rate {
            packets_per_sec: per_sec(prev.packets, cur.packets)?,
            bytes_per_sec: per_sec(prev.bytes, cur.bytes)?,
            new_flows_per_sec: per_sec(prev.new_flows, cur.new_flows)?,
        })
    }
}

/// Rates of every service and backend found in both snapshots.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rates {
    /// Time between the two snapshots.
    pub elapsed: Duration,
    services: HashMap<String, Rate>,
    backends: HashMap<(String, String), Rate>,
}

impl Rates {
    /// Rates from `prev` to `cur`, taken `elapsed` apart. Services and
    /// backends are matched by name and address.
    pub fn between(prev: &Stats, cur: &Stats, elapsed: Duration) -> Rates {
        let mut rates = Rates {
            elapsed,
            ..Rates::default()
        };
        for svc in &cur.services {
            let Some(old) = prev.services.iter().find(|s| s.name == svc.name) else {
                continue;
            };
            if let Some(r) = Rate::between(&old.counters, &svc.counters, elapsed) {
                rates.services.insert(svc.name.clone(), r);
            }
            for b in &svc.backends {
                let Some(old_b) = old.backends.iter().find(|o| o.address == b.address) else {
                    continue;
                };
                if let Some(r) = Rate::between(&old_b.counters, &b.counters, elapsed) {
                    rates
                        .backends
                        .insert((svc.name.clone(), b.address.clone()), r);
                }
            }
        }
        rates
    }

    /// A service's rate.
    pub fn service(&self, name: &str) -> Option<&Rate> {
        self.services.get(name)
    }

    /// A backend's rate.
    pub fn backend(&self, service: &str, address: &str) -> Option<&Rate> {
        self.backends
            .get(&(service.to_string(), address.to_string()))
    }

    /// Adds the rates to `body`, the `GET /v1/stats` JSON that `stats` was
    /// parsed from: `"interval_secs"` at the top and a `"rates"` object (or
    /// `null` where there is none) in every service and backend. Everything
    /// else stays as the API sent it.
    pub fn annotate(&self, body: &mut Value, stats: &Stats) {
        let Some(obj) = body.as_object_mut() else {
            return;
        };
        obj.insert(
            "interval_secs".into(),
            Value::from(self.elapsed.as_secs_f64()),
        );
        let Some(services) = obj.get_mut("services").and_then(Value::as_array_mut) else {
            return;
        };
        for (svc, v) in stats.services.iter().zip(services) {
            let Some(v) = v.as_object_mut() else { continue };
            v.insert("rates".into(), rate_json(self.service(&svc.name)));
            let Some(backends) = v.get_mut("backends").and_then(Value::as_array_mut) else {
                continue;
            };
            for (b, bv) in svc.backends.iter().zip(backends) {
                if let Some(bv) = bv.as_object_mut() {
                    bv.insert(
                        "rates".into(),
                        rate_json(self.backend(&svc.name, &b.address)),
                    );
                }
            }
        }
    }
}

fn rate_json(rate: Option<&Rate>) -> Value {
    serde_json::to_value(rate).unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::api::types::{BackendInfo, BackendState, Health, ServiceStats};

    fn c(packets: u64, bytes: u64, new_flows: u64) -> Counters {
        Counters {
            packets,
            bytes,
            new_flows,
        }
    }

    /// A service: name, counters, and its backends' addresses and counters.
    type Svc<'a> = (&'a str, Counters, &'a [(&'a str, Counters)]);

    fn stats(services: &[Svc]) -> Stats {
        Stats {
            services: services
                .iter()
                .map(|(name, counters, backends)| ServiceStats {
                    name: name.to_string(),
                    counters: *counters,
                    active_flows: 0,
                    backends: backends
                        .iter()
                        .map(|(a, counters)| BackendInfo {
                            address: a.to_string(),
                            weight: 1,
                            state: BackendState::Active,
                            health: Health::Unchecked,
                            last_check: None,
                            active_flows: 0,
                            counters: *counters,
                            container: None,
                            node: None,
                        })
                        .collect(),
                })
                .collect(),
            global: BTreeMap::new(),
        }
    }

    #[test]
    fn rate_of_two_counters() {
        let r = Rate::between(
            &c(100, 1000, 10),
            &c(300, 5000, 11),
            Duration::from_millis(500),
        );
        assert_eq!(
            r,
            Some(Rate {
                packets_per_sec: 400.0,
                bytes_per_sec: 8000.0,
                new_flows_per_sec: 2.0
            })
        );
        // Reset counters and no elapsed time give no rate, never garbage.
        assert_eq!(
            Rate::between(&c(5, 5, 5), &c(6, 4, 6), Duration::from_secs(1)),
            None
        );
        assert_eq!(
            Rate::between(&c(5, 5, 5), &c(6, 6, 6), Duration::ZERO),
            None
        );
    }

    #[test]
    fn services_and_backends_are_matched_by_name() {
        let prev = stats(&[
            ("a", c(10, 100, 1), &[("198.18.7.1:80", c(10, 100, 1))]),
            ("gone", c(1, 1, 1), &[]),
        ]);
        let cur = stats(&[
            // Order changed, a backend added: matched by name, not position.
            ("new", c(1, 1, 1), &[]),
            (
                "a",
                c(30, 300, 3),
                &[
                    ("198.18.7.2:80", c(5, 5, 5)),
                    ("198.18.7.1:80", c(30, 300, 3)),
                ],
            ),
        ]);
        let r = Rates::between(&prev, &cur, Duration::from_secs(2));
        assert_eq!(r.service("a").unwrap().packets_per_sec, 10.0);
        assert_eq!(
            r.backend("a", "198.18.7.1:80").unwrap().bytes_per_sec,
            100.0
        );
        assert_eq!(r.service("new"), None);
        assert_eq!(r.service("gone"), None);
        assert_eq!(r.backend("a", "198.18.7.2:80"), None);
    }

    #[test]
    fn annotated_json_keeps_the_api_body_and_adds_rates() {
        let prev = stats(&[("a", c(10, 100, 1), &[("198.18.7.1:80", c(10, 100, 1))])]);
        let cur = stats(&[(
            "a",
            c(20, 200, 2),
            &[
                ("198.18.7.1:80", c(20, 200, 2)),
                ("198.18.7.2:80", c(1, 1, 1)),
            ],
        )]);
        let mut body = serde_json::to_value(&cur).unwrap();
        Rates::between(&prev, &cur, Duration::from_secs(1)).annotate(&mut body, &cur);
        assert_eq!(body["interval_secs"], 1.0);
        assert_eq!(body["services"][0]["rates"]["packets_per_sec"], 10.0);
        assert_eq!(body["services"][0]["rates"]["new_flows_per_sec"], 1.0);
        assert_eq!(
            body["services"][0]["backends"][0]["rates"]["bytes_per_sec"],
            100.0
        );
        assert_eq!(body["services"][0]["backends"][1]["rates"], Value::Null);
        // Still the API's type underneath.
        let back: Stats = serde_json::from_value(body).unwrap();
        assert_eq!(back, cur);
    }
}
