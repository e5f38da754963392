//! The benchmark report: sections of rows of named figures, written as
//! JSON (for machines), Markdown (for the README) and an SVG chart (for a
//! person at a glance). Every section says how it was measured and how many
//! rounds each figure is the median of; every target says met or missed.

use std::fmt::Write as _;

use serde::Serialize;

/// The machine the figures come from.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    /// CPU model.
    pub cpu: String,
    /// Cores available.
    pub cores: usize,
    /// Kernel release.
    pub kernel: String,
}

impl Machine {
    /// Reads this machine's description.
    pub fn this() -> Self {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| {
                c.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "unknown".into());
        Self {
            cpu,
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            kernel,
        }
    }
}

/// A column of a section's table.
#[derive(Clone, Debug, Serialize)]
pub struct Column {
    /// Key of the value in each row.
    pub key: String,
    /// Header in the Markdown table, with its unit, e.g. "ns/packet".
    pub header: String,
    /// Decimals shown.
    pub decimals: usize,
}

impl Column {
    /// A column.
    pub fn new(key: &str, header: &str, decimals: usize) -> Self {
        Self {
            key: key.into(),
            header: header.into(),
            decimals,
        }
    }
}

/// One row: a contender or a case, with its figures by column key.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// What was measured.
    pub name: String,
    /// Figures by column key (a missing one shows as —).
    pub values: Vec<(String, f64)>,
    /// Every round's figure of the row's main column, for the record.
    pub rounds: Vec<f64>,
}

impl Row {
    /// A row with no figures yet.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.into(),
            values: Vec::new(),
            rounds: Vec::new(),
        }
    }

    /// Adds a figure.
    pub fn with(mut self, key: &str, value: f64) -> Self {
        self.values.push((key.into(), value));
        self
    }

    /// A figure by column key.
    pub fn get(&self, key: &str) -> Option<f64> {
        self.values.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
    }
}

/// A target from the issue and whether this run met it.
#[derive(Clone, Debug, Serialize)]
pub struct Target {
    /// The bar, in words.
    pub bar: String,
    /// This run's figure, in words.
    pub actual: String,
    /// Met or missed.
    pub met: bool,
}

/// One part of the report.
#[derive(Clone, Debug, Serialize)]
pub struct Section {
    /// Stable key, e.g. `per_packet`.
    pub key: String,
    /// Heading.
    pub title: String,
    /// How it was measured, in a sentence or three.
    pub method: String,
    /// Rounds each figure is the median of.
    pub rounds: usize,
    /// Table columns.
    pub columns: Vec<Column>,
    /// Table rows.
    pub rows: Vec<Row>,
    /// Targets.
    pub targets: Vec<Target>,
    /// Column drawn as bars in the chart, if any.
    pub chart: Option<String>,
    /// Anything a reader must know to read the figures right.
    pub notes: Vec<String>,
}

impl Section {
    /// The row named `name`; panics, listing the rows there are, if there
    /// is none (for the tests of the sections' machinery).
    pub fn row(&self, name: &str) -> &Row {
        self.rows
            .iter()
            .find(|r| r.name == name)
            .unwrap_or_else(|| {
                let names: Vec<&str> = self.rows.iter().map(|r| r.name.as_str()).collect();
                panic!("no row {name:?} in section {}: {names:?}", self.key)
            })
    }
}

/// The whole report.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Where it ran.
    pub machine: Machine,
    /// `true` for `--quick` runs (fewer rounds; not figures to publish).
    pub quick: bool,
    /// The sections, in order.
    pub sections: Vec<Section>,
}

/// The median of `v` (0 for an empty slice).
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => s[n / 2],
        _ => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// The `p`th percentile (0 to 100, nearest rank) of `v`.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

impl Report {
    /// The report as Markdown.
    pub fn markdown(&self) -> String {
        let m = &self.machine;
        let mut s = format!(
            "Machine: {}, {} cores, Linux {}.{}\n",
            m.cpu,
            m.cores,
            m.kernel,
            if self.quick {
                " Quick run (`--quick`): fewer rounds, indicative only."
            } else {
                ""
            }
        );
        for sec in &self.sections {
            // Each section names its machine: `--only` replaces sections
            // of the README one at a time, from runs on other machines.
            let _ = write!(
                s,
                "\n### {}\n\nMeasured on {}, {} cores, Linux {}. {} Median of {} rounds.\n\n| |",
                sec.title, m.cpu, m.cores, m.kernel, sec.method, sec.rounds
            );
            for c in &sec.columns {
                let _ = write!(s, " {} |", c.header);
            }
            s.push_str("\n|---|");
            for _ in &sec.columns {
                s.push_str("---:|");
            }
            s.push('\n');
            for r in &sec.rows {
                let _ = write!(s, "| {} |", r.name);
                for c in &sec.columns {
                    match r.get(&c.key) {
                        Some(v) => {
                            let _ = write!(s, " {:.*} |", c.decimals, v);
                        }
                        None => s.push_str(" — |"),
                    }
                }
                s.push('\n');
            }
            if !sec.targets.is_empty() {
                s.push_str("\nTargets:\n");
                for t in &sec.targets {
                    let _ = writeln!(
                        s,
                        "- {}: {} — {}",
                        t.bar,
                        t.actual,
                        if t.met { "met" } else { "**missed**" }
                    );
                }
            }
            for n in &sec.notes {
                let _ = writeln!(s, "\n{n}");
            }
        }
        s
    }

    /// A chart of every section that names a chart column: horizontal bars,
    /// one group per section, each scaled to its own largest value.
    pub fn svg(&self) -> String {
        const W: f64 = 760.0;
        const LABEL: f64 = 300.0;
        const BAR_H: f64 = 18.0;
        let mut y = 30.0;
        let mut body = String::new();
        for sec in self.sections.iter().filter(|s| s.chart.is_some()) {
            let key = sec.chart.as_deref().unwrap_or_default();
            let header = sec
                .columns
                .iter()
                .find(|c| c.key == key)
                .map_or(key.to_owned(), |c| c.header.clone());
            let _ = writeln!(
                body,
                r#"<text x="10" y="{y}" font-weight="bold">{} ({})</text>"#,
                escape(&sec.title),
                escape(&header)
            );
            y += 10.0;
            let max = sec
                .rows
                .iter()
                .filter_map(|r| r.get(key))
                .fold(0.0_f64, f64::max)
                .max(f64::MIN_POSITIVE);
            for r in &sec.rows {
                let Some(v) = r.get(key) else { continue };
                let w = (W - LABEL - 90.0) * v / max;
                let _ = writeln!(
                    body,
                    r##"<text x="{lx}" y="{ty}" text-anchor="end">{name}</text><rect x="{LABEL}" y="{y}" width="{w:.1}" height="{h}" fill="#4a7fb5"/><text x="{vx:.1}" y="{ty}">{v:.1}</text>"##,
                    lx = LABEL - 8.0,
                    ty = y + 13.0,
                    name = escape(&r.name),
                    h = BAR_H - 4.0,
                    vx = LABEL + w + 6.0,
                );
                y += BAR_H;
            }
            y += 24.0;
        }
        format!(
            r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="10" y="18" font-size="11" fill="#555">{machine}</text>
{body}</svg>
"##,
            h = y + 10.0,
            machine = escape(&format!(
                "{}, {} cores, Linux {}{}",
                self.machine.cpu,
                self.machine.cores,
                self.machine.kernel,
                if self.quick { " (quick run)" } else { "" }
            )),
        )
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        Report {
            machine: Machine {
                cpu: "cpu <x>".into(),
                cores: 2,
                kernel: "6.18".into(),
            },
            quick: true,
            sections: vec![Section {
                key: "k".into(),
                title: "Per packet".into(),
                method: "How.".into(),
                rounds: 3,
                columns: vec![Column::new("ns", "ns/packet", 1)],
                rows: vec![Row::new("a").with("ns", 10.0), Row::new("b & c")],
                targets: vec![Target {
                    bar: "<= 5 ns".into(),
                    actual: "10 ns".into(),
                    met: false,
                }],
                chart: Some("ns".into()),
                notes: vec![],
            }],
        }
    }

    #[test]
    fn markdown_has_the_table_and_says_missed() {
        let md = report().markdown();
        assert!(md.contains("| a | 10.0 |"), "{md}");
        assert!(md.contains("| b & c | — |"), "{md}");
        assert!(md.contains("**missed**"), "{md}");
        assert!(md.contains("Median of 3 rounds"), "{md}");
    }

    #[test]
    fn svg_is_well_formed_enough() {
        let svg = report().svg();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("cpu &lt;x&gt;"));
        assert!(svg.contains("b &amp; c") || !svg.contains("b & c"));
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[3.0], 99.0), 3.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
        let v: Vec<f64> = (1..=50).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 25.0);
        assert_eq!(percentile(&v, 99.0), 50.0);
    }

    #[test]
    fn median_of_even_and_odd() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }
}
