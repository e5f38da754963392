//! Running `wrk` in a client namespace and reading its report, with the CPU
//! time it used (its own `rusage`, from `wait4`).

use std::{
    io::Read,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use super::procs::die_with_parent;

/// What one `wrk` run reported.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WrkReport {
    /// Requests completed.
    pub requests: u64,
    /// The run's length as wrk measured it, in seconds.
    pub seconds: f64,
    /// `Requests/sec`.
    pub rps: f64,
    /// Median latency, ms.
    pub p50_ms: f64,
    /// 99th percentile latency, ms.
    pub p99_ms: f64,
    /// Socket errors (connect + read + write + timeout).
    pub socket_errors: u64,
    /// Responses other than 2xx or 3xx.
    pub non_2xx: u64,
}

/// A finished `wrk` run.
#[derive(Clone, Debug)]
pub struct WrkRun {
    /// What it reported.
    pub report: WrkReport,
    /// CPU time wrk used (user + system, all its threads).
    pub cpu: Duration,
    /// Wall time from start to exit.
    pub wall: Duration,
    /// Its standard output, for messages.
    pub output: String,
}

/// A duration as wrk prints it (`111.00us`, `1.23ms`, `2.00s`, `1.00m`), in ms.
fn parse_time_ms(s: &str) -> Option<f64> {
    let s = s.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (num, unit) = s.split_at(split);
    let v: f64 = num.parse().ok()?;
    let factor = match unit {
        "us" => 0.001,
        "ms" => 1.0,
        "s" => 1_000.0,
        "m" => 60_000.0,
        "h" => 3_600_000.0,
        _ => return None,
    };
    Some(v * factor)
}

/// Reads wrk's text report (run with `--latency`).
pub fn parse(out: &str) -> Result<WrkReport, String> {
    let mut r = WrkReport::default();
    let (mut got_rps, mut got_total, mut got_p50, mut got_p99) = (false, false, false, false);
    for line in out.lines() {
        let t = line.trim();
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            r.rps = v
                .trim()
                .parse()
                .map_err(|e| format!("Requests/sec {v:?}: {e}"))?;
            got_rps = true;
        } else if let Some((count, rest)) = t.split_once(" requests in ") {
            r.requests = count
                .trim()
                .parse()
                .map_err(|e| format!("request count {count:?}: {e}"))?;
            let dur = rest.split(',').next().unwrap_or_default();
            r.seconds = parse_time_ms(dur).ok_or_else(|| format!("duration {dur:?}"))? / 1_000.0;
            got_total = true;
        } else if let Some(v) = t.strip_prefix("50%") {
            r.p50_ms = parse_time_ms(v).ok_or_else(|| format!("50% latency {v:?}"))?;
            got_p50 = true;
        } else if let Some(v) = t.strip_prefix("99%") {
            r.p99_ms = parse_time_ms(v).ok_or_else(|| format!("99% latency {v:?}"))?;
            got_p99 = true;
        } else if let Some(v) = t.strip_prefix("Socket errors:") {
            // "connect 0, read 12, write 0, timeout 0"
            for part in v.split(',') {
                let n = part.split_whitespace().nth(1).unwrap_or("0");
                r.socket_errors += n
                    .parse::<u64>()
                    .map_err(|e| format!("socket errors {part:?}: {e}"))?;
            }
        } else if let Some(v) = t.strip_prefix("Non-2xx or 3xx responses:") {
            r.non_2xx = v
                .trim()
                .parse()
                .map_err(|e| format!("non-2xx {v:?}: {e}"))?;
        }
    }
    match (got_rps, got_total, got_p50, got_p99) {
        (true, true, true, true) => Ok(r),
        _ => Err("no Requests/sec, request count or 50%/99% latency in wrk's output".into()),
    }
}

/// A spawned process that is killed and reaped if it is dropped before
/// [`Reaped::wait`] reaped it (so a panic never leaves wrk running).
struct Reaped {
    child: Child,
    done: bool,
}

impl Reaped {
    /// Waits up to `limit` (then SIGKILLs it) and returns its exit code
    /// (`None` if killed by a signal), its CPU time and whether it timed out.
    fn wait(&mut self, limit: Duration) -> (Option<i32>, Duration, bool) {
        let pid = self.child.id() as libc::pid_t;
        let deadline = Instant::now() + limit;
        let mut timed_out = false;
        loop {
            let mut status = 0;
            // SAFETY: all-zero is a valid rusage.
            let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
            let flags = if timed_out { 0 } else { libc::WNOHANG };
            // SAFETY: wait4 on our own unreaped child with valid out-pointers.
            let r = unsafe { libc::wait4(pid, &mut status, flags, &mut ru) };
            if r == pid {
                self.done = true;
                let tv = |t: libc::timeval| {
                    Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
                };
                let cpu = tv(ru.ru_utime) + tv(ru.ru_stime);
                let code = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
                return (code, cpu, timed_out);
            }
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                panic!("wait4({pid}): {e}");
            }
            if Instant::now() >= deadline && !timed_out {
                let _ = self.child.kill();
                timed_out = true;
                continue;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `wrk -t1 -c{connections} -d{secs}s --latency [-H 'Connection:
/// close'] url` in namespace `ns` and returns its report and CPU time.
/// Panics, with its output, if it fails or its report cannot be read.
pub fn run(ns: &str, url: &str, connections: u32, close: bool, secs: u32) -> WrkRun {
    let conns = format!("-c{connections}");
    let dur = format!("-d{secs}s");
    let mut args = vec!["netns", "exec", ns, "wrk", "-t1", &conns, &dur, "--latency"];
    if close {
        args.extend(["-H", "Connection: close"]);
    }
    args.push(url);
    let shown = format!("ip {}", args.join(" "));
    let mut cmd = Command::new("ip");
    cmd.args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    die_with_parent(&mut cmd);
    let start = Instant::now();
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{shown}`: {e}"));
    let mut proc = Reaped { child, done: false };
    let drain = |mut pipe: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            // Bounded by the pipe's EOF (wrk exiting).
            let _ = pipe.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = drain(Box::new(proc.child.stdout.take().expect("piped stdout")));
    let err = drain(Box::new(proc.child.stderr.take().expect("piped stderr")));
    let (code, cpu, timed_out) = proc.wait(Duration::from_secs(u64::from(secs) + 20));
    let wall = start.elapsed();
    let output = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    if timed_out || code != Some(0) {
        panic!(
            "`{shown}` {} (exit {code:?}); stdout:\n{output}\nstderr:\n{stderr}",
            if timed_out { "timed out" } else { "failed" }
        );
    }
    let report = parse(&output)
        .unwrap_or_else(|e| panic!("`{shown}`: {e}; its output:\n{output}\n{stderr}"));
    WrkRun {
        report,
        cpu,
        wall,
        output,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEEPALIVE: &str = "Running 2s test @ http://127.0.0.1:80/
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   110.09us  130.51us   4.29ms   99.39%
    Req/Sec   210.70k     5.26k  217.03k    57.14%
  Latency Distribution
     50%  111.00us
     75%  135.00us
     90%  144.00us
     99%    1.90ms
  439716 requests in 2.10s, 62.90MB read
  Socket errors: connect 0, read 12, write 1, timeout 2
  Non-2xx or 3xx responses: 7
Requests/sec: 209390.86
Transfer/sec:     29.95MB
";

    #[test]
    fn parses_a_report() {
        let r = parse(KEEPALIVE).expect("parses");
        assert_eq!(r.requests, 439_716);
        assert!((r.seconds - 2.10).abs() < 1e-9);
        assert!((r.rps - 209_390.86).abs() < 1e-6);
        assert!((r.p50_ms - 0.111).abs() < 1e-9);
        assert!((r.p99_ms - 1.9).abs() < 1e-9);
        assert_eq!(r.socket_errors, 15);
        assert_eq!(r.non_2xx, 7);
    }

    #[test]
    fn refuses_a_report_without_figures() {
        assert!(parse("unable to connect to 198.18.101.1:80 Connection refused\n").is_err());
    }

    #[test]
    fn time_units() {
        assert_eq!(parse_time_ms("2.00s"), Some(2_000.0));
        assert_eq!(parse_time_ms("1.00m"), Some(60_000.0));
        assert_eq!(parse_time_ms("3.5ms"), Some(3.5));
        assert_eq!(parse_time_ms("12"), None);
        assert_eq!(parse_time_ms("1.0xs"), None);
    }
}
