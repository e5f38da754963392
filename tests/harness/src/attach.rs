//! What BPF programs are attached to a host interface.

use std::fmt;

use aya::programs::{tc::TcAttachType, SchedClassifier};

use crate::cmd::run;

/// Everything attached to one interface of the calling thread's namespace,
/// as seen by `ip link`, `tc filter`, `bpftool net` and a TCX query.
#[derive(Clone, Debug)]
pub struct Attachments {
    /// The interface.
    pub ifname: String,
    /// `ip link show dev IF` (mentions `xdp` when an XDP program is attached).
    pub ip_link: String,
    /// `tc filter show dev IF ingress` (classic tc filters).
    pub tc_ingress: String,
    /// `tc filter show dev IF egress`.
    pub tc_egress: String,
    /// `bpftool net show dev IF`, section headers removed.
    pub bpftool: Vec<String>,
    /// Names (or ids) of TCX ingress programs, or the query's error.
    pub tcx_ingress: Result<Vec<String>, String>,
    /// Names (or ids) of TCX egress programs, or the query's error.
    pub tcx_egress: Result<Vec<String>, String>,
}

impl Attachments {
    /// Whether an XDP program is attached (`ip link` says `xdp...`).
    pub fn has_xdp(&self) -> bool {
        self.ip_link.contains("xdp")
    }

    /// Whether nothing at all is attached (a failed TCX query counts as
    /// "something", since nothing can be said).
    pub fn is_empty(&self) -> bool {
        !self.has_xdp()
            && self.tc_ingress.trim().is_empty()
            && self.tc_egress.trim().is_empty()
            && self.bpftool.is_empty()
            && self.tcx_ingress.as_ref().is_ok_and(Vec::is_empty)
            && self.tcx_egress.as_ref().is_ok_and(Vec::is_empty)
    }
}

impl fmt::Display for Attachments {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "attachments of {}:", self.ifname)?;
        writeln!(f, "  ip link: {}", self.ip_link.trim())?;
        writeln!(f, "  tc ingress filters: {}", self.tc_ingress.trim())?;
        writeln!(f, "  tc egress filters: {}", self.tc_egress.trim())?;
        writeln!(f, "  bpftool net: {:?}", self.bpftool)?;
        writeln!(f, "  tcx ingress: {:?}", self.tcx_ingress)?;
        write!(f, "  tcx egress: {:?}", self.tcx_egress)
    }
}

fn stdout_of(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        text.push_str(&format!(
            " [{program} failed: {}]",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    text
}

fn tcx(ifname: &str, attach: TcAttachType) -> Result<Vec<String>, String> {
    let (_revision, programs) =
        SchedClassifier::query_tcx(ifname, attach).map_err(|e| format!("{e:?}"))?;
    Ok(programs
        .iter()
        .map(|p| {
            p.name_as_str()
                .map_or_else(|| format!("id {}", p.id()), str::to_owned)
        })
        .collect())
}

/// Reads what is attached to `ifname` (in the calling thread's namespace;
/// the `ip`/`tc`/`bpftool` commands run in the process's namespace, so call
/// it from the host's).
pub fn attachments(ifname: &str) -> Attachments {
    let bpftool = stdout_of("bpftool", &["net", "show", "dev", ifname])
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.ends_with(':'))
        .map(str::to_owned)
        .collect();
    Attachments {
        ifname: ifname.to_owned(),
        ip_link: stdout_of("ip", &["link", "show", "dev", ifname]),
        tc_ingress: stdout_of("tc", &["filter", "show", "dev", ifname, "ingress"]),
        tc_egress: stdout_of("tc", &["filter", "show", "dev", ifname, "egress"]),
        bpftool,
        tcx_ingress: tcx(ifname, TcAttachType::Ingress),
        tcx_egress: tcx(ifname, TcAttachType::Egress),
    }
}
