//! Load through a VIP while something happens to the balancer, the engine
//! or the backends: HTTP requests one after another, each on a new
//! connection, and connections held open that echo a sequence number every
//! few milliseconds. The end-to-end tests assert on what it saw (no request
//! failed, no held connection broke); the benchmark's reliability section
//! counts the same.

use std::{
    collections::BTreeMap,
    net::SocketAddrV4,
    sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    thread,
    time::{Duration, Instant},
};

use crate::{clients::http_get_here, netns::Netns, stream::StreamConn};

/// The longest a load runs: a scenario that hangs ends its load, and the
/// report says so.
pub const LOAD_LIMIT: Duration = Duration::from_secs(180);
/// Pause after each request and each echo: a steady load that leaves CPU
/// to the engine and the daemon on a small machine.
const PAUSE: Duration = Duration::from_millis(5);
/// How long the load waits for answers before and after the action.
const ANSWER_WAIT: Duration = Duration::from_secs(10);
/// Answers wanted after the action before the load stops: the service
/// still answers once it is over.
const ANSWERS_AFTER: usize = 20;
/// Error messages kept.
const KEPT_ERRORS: usize = 10;

/// Where the load goes.
#[derive(Clone, Copy, Debug)]
pub struct Load {
    /// `GET /` here, answered `200` with the backend's name.
    pub http: SocketAddrV4,
    /// A stream service (a greeting with the backend's name, then echo)
    /// and how many connections to hold to it.
    pub held: Option<(SocketAddrV4, usize)>,
}

/// What the load saw.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    /// HTTP requests made.
    pub requests: usize,
    /// Those that failed (connect, read, timeout, not `200`).
    pub failed: usize,
    /// Answers by body (the backend's name).
    pub answered_by: BTreeMap<String, usize>,
    /// The first failures.
    pub errors: Vec<String>,
    /// The backend that greeted each held connection.
    pub held_by: Vec<String>,
    /// Held connections that broke (an echo failed or came back wrong).
    pub broken: usize,
    /// How the first of them broke.
    pub held_errors: Vec<String>,
    /// Sequence numbers echoed, over all held connections.
    pub echoes: u64,
    /// The load ran into [`LOAD_LIMIT`] before the action was over.
    pub timed_out: bool,
}

impl LoadReport {
    /// Requests answered.
    pub fn answered(&self) -> usize {
        self.answered_by.values().sum()
    }

    /// Requests answered by backend `name`.
    pub fn count(&self, name: &str) -> usize {
        self.answered_by.get(name).copied().unwrap_or(0)
    }

    /// Nothing failed: every request answered, every held connection
    /// whole, the time limit not reached.
    pub fn clean(&self) -> bool {
        self.failed == 0 && self.broken == 0 && !self.timed_out
    }
}

/// The action's view of the load while it runs.
#[derive(Debug)]
pub struct Running<'a> {
    answered: &'a AtomicUsize,
}

impl Running<'_> {
    /// Requests answered so far.
    pub fn answered(&self) -> usize {
        self.answered.load(Ordering::Relaxed)
    }

    /// Waits (up to 10 s) until `n` more requests than now have been
    /// answered; whether they were.
    pub fn wait_answers(&self, n: usize) -> bool {
        let want = self.answered() + n;
        let end = Instant::now() + ANSWER_WAIT;
        while Instant::now() < end {
            if self.answered() >= want {
                return true;
            }
            thread::sleep(Duration::from_millis(10));
        }
        false
    }
}

/// Sets the flag when dropped: an action that panics stops the load.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Runs `load` from inside `ns` around `action`: opens the held
/// connections, starts the requests, waits for a first answer, runs
/// `action`, waits for a few more answers, then stops and reports.
///
/// Panics if a held connection cannot be opened or nothing answers before
/// the action (the load never reached the service: nothing to measure).
pub fn around<T>(ns: &Netns, load: &Load, action: impl FnOnce(&Running) -> T) -> (T, LoadReport) {
    let held: Vec<StreamConn> = match load.held {
        Some((addr, n)) => (0..n)
            .map(|i| {
                StreamConn::connect(ns, addr)
                    .unwrap_or_else(|e| panic!("held connection {i} to {addr}: {e}"))
            })
            .collect(),
        None => Vec::new(),
    };
    let held_by = held.iter().map(|c| c.backend().to_owned()).collect();
    let stop = AtomicBool::new(false);
    let answered = AtomicUsize::new(0);
    let echoes = AtomicU64::new(0);
    let started = Instant::now();
    let (out, mut report, held_outcomes) = thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        let holders: Vec<_> = held
            .into_iter()
            .map(|conn| s.spawn(|| hold(conn, &stop, &echoes, started)))
            .collect();
        let requests = s.spawn(|| ns.run(|| requests(load.http, &stop, &answered, started)));
        let running = Running {
            answered: &answered,
        };
        assert!(
            running.wait_answers(1),
            "no request to {} answered within {ANSWER_WAIT:?}: nothing to measure",
            load.http
        );
        let out = action(&running);
        running.wait_answers(ANSWERS_AFTER);
        stop.store(true, Ordering::Relaxed);
        let report = requests.join().expect("the HTTP load panicked");
        let held: Vec<Result<(), String>> = holders
            .into_iter()
            .map(|h| h.join().expect("a held connection's thread panicked"))
            .collect();
        (out, report, held)
    });
    report.held_by = held_by;
    report.echoes = echoes.load(Ordering::Relaxed);
    for e in held_outcomes.into_iter().filter_map(Result::err) {
        report.broken += 1;
        if report.held_errors.len() < KEPT_ERRORS {
            report.held_errors.push(e);
        }
    }
    report.timed_out |= started.elapsed() >= LOAD_LIMIT;
    (out, report)
}

/// HTTP requests to `addr` one after another until `stop` or
/// [`LOAD_LIMIT`], counting answers in `answered` as they come.
fn requests(
    addr: SocketAddrV4,
    stop: &AtomicBool,
    answered: &AtomicUsize,
    started: Instant,
) -> LoadReport {
    let mut r = LoadReport::default();
    while !stop.load(Ordering::Relaxed) {
        if started.elapsed() >= LOAD_LIMIT {
            r.timed_out = true;
            break;
        }
        r.requests += 1;
        match http_get_here(addr) {
            Ok(body) => {
                *r.answered_by.entry(body.trim().to_owned()).or_default() += 1;
                answered.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                r.failed += 1;
                if r.errors.len() < KEPT_ERRORS {
                    r.errors.push(format!("request {}: {e}", r.requests));
                }
            }
        }
        thread::sleep(PAUSE);
    }
    r
}

/// Echoes 4-byte sequence numbers on `conn` until `stop` or
/// [`LOAD_LIMIT`], each read back before the next is sent; how it broke if
/// it did.
fn hold(
    mut conn: StreamConn,
    stop: &AtomicBool,
    echoes: &AtomicU64,
    started: Instant,
) -> Result<(), String> {
    let mut n: u32 = 0;
    while !stop.load(Ordering::Relaxed) && started.elapsed() < LOAD_LIMIT {
        conn.echo(&n.to_be_bytes()).map_err(|e| {
            format!(
                "held connection to {} broke at sequence number {n}: {e}",
                conn.backend()
            )
        })?;
        echoes.fetch_add(1, Ordering::Relaxed);
        n = n.wrapping_add(1);
        thread::sleep(PAUSE);
    }
    Ok(())
}
