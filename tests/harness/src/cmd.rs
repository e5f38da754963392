//! Running external commands (`ip`, `iptables`, `tc`, ...) with captured output.

use std::{
    io::Read,
    process::{Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

/// Runs `program args...` to completion with stdin closed and stdout/stderr
/// captured, and returns its output whatever its exit status.
///
/// Panics only if the program cannot be started at all (e.g. not installed).
pub fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{program} {}`: {e}", args.join(" ")))
}

/// Runs `program args...` and returns its stdout; panics with the command and
/// its stderr if it exits non-zero.
pub fn run_ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    if !out.status.success() {
        panic!(
            "`{program} {}` failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The stderr of `out`, lossily decoded and trimmed.
pub(crate) fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_owned()
}

/// Runs `cmd` with stdin closed and stdout/stderr captured, waiting at most
/// `timeout` for it to exit.
///
/// Panics (after killing it, with whatever it printed) if it is still running
/// at the deadline, or if it cannot be started.
pub fn output_with_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {shown}: {e}"));
    let drain = |mut pipe: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            // Bounded by the pipe's EOF; an error just ends the capture.
            let _ = pipe.read_to_end(&mut buf);
            buf
        })
    };
    let out_reader = drain(Box::new(child.stdout.take().expect("piped stdout")));
    let err_reader = drain(Box::new(child.stderr.take().expect("piped stderr")));

    let deadline = Instant::now() + timeout;
    let (status, timed_out) = loop {
        match child.try_wait() {
            Ok(Some(status)) => break (status, false),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                break (child.wait().expect("wait for killed child"), true);
            }
            Err(e) => panic!("waiting for {shown}: {e}"),
        }
    };
    let stdout = join_bounded(out_reader, Duration::from_secs(2));
    let stderr = join_bounded(err_reader, Duration::from_secs(2));
    if timed_out {
        panic!(
            "{shown} still running after {timeout:?}, killed it; stdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        );
    }
    Output {
        status,
        stdout,
        stderr,
    }
}

/// Joins a pipe-draining thread, giving up (and returning nothing) after
/// `limit`: a grandchild may keep the pipe open.
fn join_bounded(handle: thread::JoinHandle<Vec<u8>>, limit: Duration) -> Vec<u8> {
    let deadline = Instant::now() + limit;
    while !handle.is_finished() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
    }
    if handle.is_finished() {
        handle.join().unwrap_or_default()
    } else {
        Vec::new()
    }
}
