//! CPU time from `/proc`: the host's busy time (`/proc/stat`) and every
//! process's own and reaped children's time (`/proc/PID/stat`), before and
//! after a run.

use std::{
    collections::{HashMap, HashSet},
    fs,
};

/// `PF_KTHREAD` in `/proc/PID/stat`'s flags: a kernel thread.
const PF_KTHREAD: u64 = 0x0020_0000;

/// One process's figures from `/proc/PID/stat`, in clock ticks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcStat {
    /// Parent pid.
    pub ppid: i32,
    /// Start time since boot (ticks): with the pid, names a process uniquely.
    pub start: u64,
    /// A kernel thread.
    pub kthread: bool,
    /// utime + stime (all threads).
    pub own: u64,
    /// cutime + cstime: children it reaped.
    pub children: u64,
    /// Its command name.
    pub comm: [u8; 16],
}

impl ProcStat {
    /// The command name as text.
    pub fn comm(&self) -> String {
        let end = self.comm.iter().position(|b| *b == 0).unwrap_or(16);
        String::from_utf8_lossy(&self.comm[..end]).into_owned()
    }
}

/// Parses the text of `/proc/PID/stat`.
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let name = text.get(open + 1..close)?;
    // Fields after the command name, starting at field 3 (state).
    let f: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok());
    let mut comm = [0u8; 16];
    for (d, s) in comm.iter_mut().zip(name.bytes()) {
        *d = s;
    }
    Some(ProcStat {
        ppid: f.get(1)?.parse().ok()?,
        kthread: num(6)? & PF_KTHREAD != 0,
        own: num(11)? + num(12)?,
        children: num(13)? + num(14)?,
        start: num(19)?,
        comm,
    })
}

/// `/proc/PID/stat` of one process, if it exists.
pub fn proc_stat(pid: i32) -> Option<ProcStat> {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|t| parse_stat(&t))
}

/// Every process's pid and stat (bounded by the number of processes).
pub fn all_procs() -> HashMap<i32, ProcStat> {
    let mut out = HashMap::new();
    let Ok(dir) = fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if let Some(s) = proc_stat(pid) {
            out.insert(pid, s);
        }
    }
    out
}

/// The pids of `parent`'s children (by `/proc`, not by the kernel's
/// `children` file, which needs `CONFIG_PROC_CHILDREN`).
pub fn children_of(parent: i32) -> Vec<(i32, ProcStat)> {
    let mut v: Vec<(i32, ProcStat)> = all_procs()
        .into_iter()
        .filter(|(_, s)| s.ppid == parent)
        .collect();
    v.sort_by_key(|(p, _)| *p);
    v
}

/// Host busy time from the first line of `/proc/stat`: user + nice +
/// system + irq + softirq (ticks; idle, iowait and steal excluded, guest is
/// already in user).
pub fn parse_host_busy(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|s| s.parse().unwrap_or(0))
        .collect();
    Some(f.first()? + f.get(1)? + f.get(2)? + f.get(5)? + f.get(6)?)
}

/// Clock ticks per second of `/proc` figures.
pub fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Ticks to milliseconds.
pub fn ticks_ms(ticks: u64) -> f64 {
    ticks as f64 * 1_000.0 / ticks_per_second()
}

/// Host busy time and every process, at one moment.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// Host busy ticks (all CPUs).
    pub host_busy: u64,
    /// Every process.
    pub procs: HashMap<i32, ProcStat>,
}

impl Snapshot {
    /// Takes one now.
    pub fn take() -> Snapshot {
        let stat = fs::read_to_string("/proc/stat").expect("read /proc/stat");
        let host_busy = parse_host_busy(&stat).expect("a cpu line in /proc/stat");
        Snapshot {
            host_busy,
            procs: all_procs(),
        }
    }
}

/// The same process in both snapshots (same pid and start time)?
fn same(before: &Snapshot, pid: i32, after: &ProcStat) -> Option<ProcStat> {
    before
        .procs
        .get(&pid)
        .filter(|b| b.start == after.start)
        .copied()
}

/// Ticks `pids` used themselves between the snapshots (a process that
/// started in between counts whole).
pub fn own_ticks(before: &Snapshot, after: &Snapshot, pids: &[i32]) -> u64 {
    pids.iter()
        .filter_map(|pid| {
            let a = after.procs.get(pid)?;
            Some(match same(before, *pid, a) {
                Some(b) => a.own.saturating_sub(b.own),
                None => a.own,
            })
        })
        .sum()
}

/// Ticks `pids` used themselves and through children they reaped.
pub fn tree_ticks(before: &Snapshot, after: &Snapshot, pids: &[i32]) -> u64 {
    pids.iter()
        .filter_map(|pid| {
            let a = after.procs.get(pid)?;
            Some(match same(before, *pid, a) {
                Some(b) => (a.own + a.children).saturating_sub(b.own + b.children),
                None => a.own + a.children,
            })
        })
        .sum()
}

/// Whether kernel thread `comm` does network work: softirqs deferred to
/// `ksoftirqd/N`, threaded NAPI polling (`napi/...`).
pub fn is_network_kthread(comm: &str) -> bool {
    comm.starts_with("ksoftirqd/") || comm.starts_with("napi/")
}

/// Ticks every other process used itself, except those in `excluded` and
/// the kernel threads that do network work ([`is_network_kthread`]: part of
/// the path between client and servers). Children they reaped are not
/// counted (a process reaping a long-lived child, a test binary ending,
/// would bring that child's whole life into the run), so a process that
/// both starts and ends within the run is missed.
pub fn other_ticks(before: &Snapshot, after: &Snapshot, excluded: &HashSet<i32>) -> u64 {
    let mut sum = 0;
    for (pid, a) in &after.procs {
        if excluded.contains(pid) || (a.kthread && is_network_kthread(&a.comm())) {
            continue;
        }
        sum += a
            .own
            .saturating_sub(same(before, *pid, a).map_or(0, |b| b.own));
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_stat_with_spaces_in_the_name() {
        let t = "25136 (nginx: worker) S 25134 25134 25134 0 -1 4194624 100 0 0 0 \
                 7 3 2 1 20 0 1 0 12345 1000 10 18446744073709551615";
        let s = parse_stat(t).expect("parses");
        assert_eq!(s.ppid, 25134);
        assert_eq!(s.own, 10);
        assert_eq!(s.children, 3);
        assert_eq!(s.start, 12345);
        assert!(!s.kthread);
        assert_eq!(s.comm(), "nginx: worker");
        let k = "15 (rcu_preempt) I 2 0 0 0 -1 2129984 0 0 0 0 0 200 0 0 20 0 1 0 9 0 0 0";
        assert!(parse_stat(k).expect("parses").kthread);
    }

    #[test]
    fn host_busy_leaves_out_idle_iowait_and_steal() {
        let t = "cpu  100 1 20 5000 7 3 4 9 0 0\ncpu0 1 1 1 1 1 1 1 1 0 0\n";
        assert_eq!(parse_host_busy(t), Some(100 + 1 + 20 + 3 + 4));
    }

    #[test]
    fn network_kernel_threads() {
        assert!(is_network_kthread("ksoftirqd/1"));
        assert!(is_network_kthread("napi/eth0-8193"));
        assert!(!is_network_kthread("kworker/0:1"));
        assert!(!is_network_kthread("kdamond.0"));
    }

    #[test]
    fn this_process_is_in_a_snapshot() {
        let s = Snapshot::take();
        assert!(s.procs.contains_key(&(std::process::id() as i32)));
        assert!(s.host_busy > 0);
    }
}
