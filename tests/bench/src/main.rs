//! `lb-bench`, run by `cargo xtask bench`: runs the benchmark sections and
//! writes `report.json`, `report.md` and `chart.svg` to the output directory
//! (`target/bench` by default).

use std::{fs, path::PathBuf};

use lb_bench::{
    control_plane, docker_churn, e2e, per_packet, rate, reliability,
    report::{Machine, Report, Section},
    scale,
};

/// Runs one section; the flag is `--quick`.
type RunSection = fn(bool) -> Section;

/// The sections, in report order.
const SECTIONS: [(&str, RunSection); 7] = [
    ("per_packet", per_packet::run),
    ("rate", rate::run),
    ("scale", scale::run),
    ("control", control_plane::run),
    ("docker", docker_churn::run),
    ("e2e", e2e::run),
    ("reliability", reliability::run),
];

struct Args {
    quick: bool,
    out: PathBuf,
    only: Vec<String>,
}

fn args() -> Args {
    let mut a = Args {
        quick: false,
        out: PathBuf::from("target/bench"),
        only: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        match x.as_str() {
            "--quick" => a.quick = true,
            "--out" => a.out = it.next().expect("--out takes a directory").into(),
            "--only" => a.only.push(it.next().expect("--only takes a section")),
            other => panic!("unknown argument {other:?} (use --quick, --out DIR, --only SECTION)"),
        }
    }
    for o in &a.only {
        assert!(
            SECTIONS.iter().any(|(k, _)| k == o),
            "no section {o:?}; sections: {:?}",
            SECTIONS.iter().map(|(k, _)| *k).collect::<Vec<_>>()
        );
    }
    a
}

fn main() {
    let args = args();
    let sections = SECTIONS
        .iter()
        .filter(|(k, _)| args.only.is_empty() || args.only.iter().any(|o| o == k))
        .map(|(_, run)| run(args.quick))
        .collect();
    let report = Report {
        machine: Machine::this(),
        quick: args.quick,
        sections,
    };
    fs::create_dir_all(&args.out).expect("create the output directory");
    let json = serde_json::to_string_pretty(&report).expect("report serialises");
    fs::write(args.out.join("report.json"), json).expect("write report.json");
    let md = report.markdown();
    fs::write(args.out.join("report.md"), &md).expect("write report.md");
    fs::write(args.out.join("chart.svg"), report.svg()).expect("write chart.svg");
    println!("{md}");
    println!(
        "written: {0}/report.json, {0}/report.md, {0}/chart.svg",
        args.out.display()
    );
}
