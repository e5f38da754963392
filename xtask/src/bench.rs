//! `cargo xtask bench`: the numbers, from `lb-bench`, written to
//! `target/bench/report.{json,md}`; `--update-readme` copies the report into
//! the README's performance section.

use std::fs;

use anyhow::{bail, Context as _};

use crate::{build, cmd, setup};

const BEGIN: &str = "<!-- bench:begin -->";
const END: &str = "<!-- bench:end -->";

#[derive(clap::Args)]
pub struct Args {
    /// Fewer rounds and calls: a check in seconds, not a figure to publish.
    #[arg(long)]
    quick: bool,
    /// Replace the README's performance section with this run's report.
    #[arg(long)]
    update_readme: bool,
    /// Run only this section (per_packet, rate, scale, control, docker,
    /// e2e, reliability); may be given more than once.
    #[arg(long, value_name = "SECTION")]
    only: Vec<String>,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    if !cmd::is_root() {
        bail!("cargo xtask bench must run as root: it loads BPF programs");
    }
    setup::run()?;
    build::run()?;
    let out = cmd::target_dir().join("bench");
    let mut bench = cmd::cargo([
        "run",
        "--release",
        "--locked",
        "-p",
        "lb-bench",
        "--bin",
        "lb-bench",
        "--",
    ])?;
    // The binary just built, also under a CARGO_TARGET_DIR (as the tests
    // and the demo get it).
    bench.arg("--out").arg(&out).env("LB_BIN", cmd::lb_bin());
    if args.quick {
        bench.arg("--quick");
    }
    for section in &args.only {
        bench.arg("--only").arg(section);
    }
    cmd::run(&mut bench)?;
    if args.update_readme {
        let report = fs::read_to_string(out.join("report.md")).context("reading the report")?;
        let path = cmd::repo_root().join("README.md");
        let readme = fs::read_to_string(&path).context("reading README.md")?;
        // A partial run replaces only its own sections.
        let updated = if args.only.is_empty() {
            splice(&readme, &report)?
        } else {
            splice_sections(&readme, &report)?
        };
        fs::write(&path, updated).context("writing README.md")?;
        println!(
            "README.md: performance section updated from {}",
            out.join("report.md").display()
        );
    }
    Ok(())
}

/// Puts `report` between the README's bench markers.
fn splice(readme: &str, report: &str) -> anyhow::Result<String> {
    let (Some(b), Some(e)) = (readme.find(BEGIN), readme.find(END)) else {
        bail!("README.md has no {BEGIN} ... {END} section");
    };
    if e < b {
        bail!("README.md: {END} comes before {BEGIN}");
    }
    Ok(format!(
        "{}{BEGIN}\n{}\n{}",
        &readme[..b],
        report.trim_end(),
        &readme[e..]
    ))
}

/// Replaces each `### Title` section of `report` in the README's bench
/// region (up to the next `### ` heading or the end marker), or adds it at
/// the end of the region when the README has no section of that title.
fn splice_sections(readme: &str, report: &str) -> anyhow::Result<String> {
    let (Some(b), Some(e)) = (readme.find(BEGIN), readme.find(END)) else {
        bail!("README.md has no {BEGIN} ... {END} section");
    };
    if e < b {
        bail!("README.md: {END} comes before {BEGIN}");
    }
    let mut region = readme[b..e].to_owned();
    for part in report.split("\n### ").skip(1) {
        let title = part.lines().next().unwrap_or_default();
        let section = format!("### {}\n", part.trim_end());
        let heading = format!("\n### {title}\n");
        match region.find(&heading) {
            Some(start) => {
                let start = start + 1;
                let end = region[start + 4..]
                    .find("\n### ")
                    .map_or(region.len(), |i| start + 4 + i + 1);
                region.replace_range(start..end, &format!("{section}\n"));
            }
            None => {
                let trimmed = region.trim_end().len();
                region.truncate(trimmed);
                region.push_str(&format!("\n\n{section}"));
            }
        }
    }
    let region = format!("{}\n", region.trim_end());
    Ok(format!("{}{region}{}", &readme[..b], &readme[e..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splice_replaces_only_the_section() {
        let readme = format!("# x\n{BEGIN}\nold\n{END}\ntail\n");
        let out = splice(&readme, "new table\n").unwrap();
        assert_eq!(out, format!("# x\n{BEGIN}\nnew table\n{END}\ntail\n"));
        assert_eq!(splice(&out, "new table\n").unwrap(), out, "idempotent");
    }

    #[test]
    fn splice_sections_replaces_or_adds_only_those_sections() {
        let readme =
            format!("# x\n{BEGIN}\nMachine: m\n\n### A\n\nold a\n\n### B\n\nold b\n{END}\ntail\n");
        let out = splice_sections(&readme, "Machine: m\n\n### B\n\nnew b\n").unwrap();
        assert_eq!(
            out,
            format!("# x\n{BEGIN}\nMachine: m\n\n### A\n\nold a\n\n### B\n\nnew b\n{END}\ntail\n")
        );
        let out = splice_sections(&out, "Machine: m\n\n### A\n\nnew a\n\n### C\n\nc\n").unwrap();
        assert_eq!(
            out,
            format!(
                "# x\n{BEGIN}\nMachine: m\n\n### A\n\nnew a\n\n### B\n\nnew b\n\n### C\n\nc\n{END}\ntail\n"
            )
        );
        assert_eq!(
            splice_sections(&out, "Machine: m\n\n### C\n\nc\n").unwrap(),
            out,
            "idempotent"
        );
    }

    #[test]
    fn splice_needs_both_markers() {
        assert!(splice("# no markers\n", "t").is_err());
        assert!(splice(&format!("{END}\n{BEGIN}\n"), "t").is_err());
    }
}
