//! Keeps `dist/grafana-dashboard.json` true to what the daemon exports:
//! every metric and label its PromQL (and its variables' queries) name
//! must be one [`render`] writes. The exported names are read from
//! [`render`]'s own output, never from a list kept by hand.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::render;
use crate::api::types::{BackendInfo, BackendState, Counters, Health, ServiceStats, Stats};

const DASHBOARD: &str = include_str!("../../../dist/grafana-dashboard.json");

/// Metric names and label names the daemon writes, from an exposition of
/// one service with a plain and a container backend and one outcome.
fn exported() -> (BTreeSet<String>, BTreeSet<String>) {
    let backend = |address: &str, container: Option<&str>| BackendInfo {
        address: address.into(),
        weight: 1,
        state: BackendState::Active,
        health: Health::Unchecked,
        last_check: None,
        active_flows: 1,
        counters: Counters::default(),
        container: container.map(Into::into),
        node: None,
    };
    let stats = Stats {
        services: vec![ServiceStats {
            name: "web".into(),
            counters: Counters::default(),
            active_flows: 1,
            backends: vec![
                backend("198.18.103.2:80", None),
                backend("198.18.0.2:80", Some("web-1")),
            ],
        }],
        global: BTreeMap::from([("fwd_xdp".into(), 1)]),
    };
    let text = render(&stats);
    let mut metrics = BTreeSet::new();
    let mut labels = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            metrics.insert(rest.split(' ').next().unwrap_or_default().to_owned());
        } else if let Some((_, rest)) = line.split_once('{') {
            // Label values here hold no `,` or `=`.
            for pair in rest.split('}').next().unwrap_or_default().split(',') {
                labels.insert(pair.split('=').next().unwrap_or_default().to_owned());
            }
        }
    }
    (metrics, labels)
}

/// Names in one PromQL expression: the metrics it selects and the labels
/// it matches on or groups by. Functions, keywords, strings, numbers,
/// durations and Grafana's `$variables` are skipped.
#[derive(Debug, Default, PartialEq, Eq)]
struct Names {
    metrics: BTreeSet<String>,
    labels: BTreeSet<String>,
}

/// PromQL's aggregation operators: `sum by (…) (…)` is no metric `sum`.
const AGGREGATIONS: [&str; 12] = [
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
];

const KEYWORDS: [&str; 11] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "and",
    "or",
    "unless",
];

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// Skips a string literal starting at `chars[i]` (its quote); the index
/// after it.
fn skip_string(chars: &[char], mut i: usize) -> usize {
    let quote = chars[i];
    i += 1;
    while i < chars.len() && chars[i] != quote {
        if chars[i] == '\\' && quote != '`' {
            i += 1;
        }
        i += 1;
    }
    i + 1
}

fn names(expr: &str) -> Names {
    let chars: Vec<char> = expr.chars().collect();
    let mut out = Names::default();
    let mut i = 0;
    // Inside `{…}` matchers or a `by (…)` list: identifiers are labels.
    let mut in_matchers = false;
    let mut in_label_list = false;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => i = skip_string(&chars, i),
            '[' => {
                // A range or subquery: durations and `$__rate_interval`.
                while i < chars.len() && chars[i] != ']' {
                    i += 1;
                }
                i += 1;
            }
            '$' => {
                i += 1;
                while i < chars.len() && (is_ident(chars[i]) || "{}".contains(chars[i])) {
                    i += 1;
                }
            }
            '{' => {
                in_matchers = true;
                i += 1;
            }
            '}' => {
                in_matchers = false;
                i += 1;
            }
            ')' if in_label_list => {
                in_label_list = false;
                i += 1;
            }
            c if c.is_ascii_digit() || c == '.' => {
                // Numbers, with their exponent or duration unit.
                while i < chars.len() && (is_ident(chars[i]) || chars[i] == '.') {
                    i += 1;
                }
            }
            c if is_ident_start(c) => {
                let start = i;
                while i < chars.len() && is_ident(chars[i]) {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let mut next = i;
                while next < chars.len() && chars[next].is_whitespace() {
                    next += 1;
                }
                let call = chars.get(next) == Some(&'(');
                if in_matchers || in_label_list {
                    out.labels.insert(word);
                } else if KEYWORDS.contains(&word.as_str()) {
                    // `by (…)`, `on (…)`, `group_left (…)`: a label list.
                    if call {
                        in_label_list = true;
                        i = next + 1;
                    }
                } else if !call && !AGGREGATIONS.contains(&word.as_str()) {
                    out.metrics.insert(word);
                }
            }
            _ => i += 1,
        }
    }
    out
}

/// Every PromQL expression of the dashboard (`expr` of a target), and
/// every variable query, which is Grafana's `label_values(metric, label)`.
fn expressions(v: &Value, exprs: &mut Vec<String>, variables: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", Value::String(e)) => exprs.push(e.clone()),
                    ("definition", Value::String(q)) => variables.push(q.clone()),
                    _ => expressions(v, exprs, variables),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| expressions(v, exprs, variables)),
        _ => {}
    }
}

#[test]
fn the_scanner_finds_metrics_and_labels() {
    let n = names(
        r#"sum by (service, backend) (rate(lb_packets_total{service=~"$service", x!="a}b"}[$__rate_interval])) * 8 / on(service) group_left lb_up offset 5m"#,
    );
    assert_eq!(
        n.metrics,
        BTreeSet::from(["lb_packets_total".into(), "lb_up".into()])
    );
    assert_eq!(
        n.labels,
        BTreeSet::from(["service".into(), "backend".into(), "x".into()])
    );
}

#[test]
fn the_grafana_dashboard_uses_only_exported_metrics_and_labels() {
    let (metrics, labels) = exported();
    assert!(metrics.contains("lb_packets_total"), "{metrics:?}");
    assert!(labels.contains("container"), "{labels:?}");
    let dashboard: Value = serde_json::from_str(DASHBOARD).expect("dist/grafana-dashboard.json");
    let (mut exprs, mut variables) = (Vec::new(), Vec::new());
    expressions(&dashboard, &mut exprs, &mut variables);
    assert!(exprs.len() >= 10, "{exprs:?}");
    let mut used = BTreeSet::new();
    for e in &exprs {
        let n = names(e);
        assert!(!n.metrics.is_empty(), "no metric in {e}");
        for m in &n.metrics {
            assert!(
                metrics.contains(m),
                "{m} in {e} is not exported: {metrics:?}"
            );
        }
        for l in &n.labels {
            assert!(
                labels.contains(l),
                "label {l} in {e} is not exported: {labels:?}"
            );
        }
        used.extend(n.metrics);
    }
    for q in &variables {
        let args = q
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
            .unwrap_or_else(|| panic!("variable query {q} is not label_values(metric, label)"));
        let (m, l) = args.split_once(',').expect("metric, label");
        assert!(metrics.contains(m.trim()), "{q}");
        assert!(labels.contains(l.trim()), "{q}");
    }
    // Every family is on the dashboard somewhere.
    assert_eq!(used, metrics);
}
