//! Host-wide locks between test processes: objects with fixed names or
//! addresses (a topology, the Docker engine) exist once per host, whatever
//! process made them.

use std::{
    fs::{File, OpenOptions},
    os::fd::AsRawFd,
    thread,
    time::{Duration, Instant},
};

/// An exclusive `flock` on a file, released when dropped (the file is
/// closed, also when the process dies).
#[derive(Debug)]
pub struct HostLock {
    _file: File,
}

impl HostLock {
    /// Takes the lock on `path`, waiting up to `wait` for its holder
    /// (`what`, for the messages). Panics if it is not free by then.
    pub fn acquire(path: &str, wait: Duration, what: &str) -> HostLock {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .unwrap_or_else(|e| panic!("opening {path}: {e}"));
        let deadline = Instant::now() + wait;
        let mut told = false;
        loop {
            // SAFETY: flock on a valid, open file descriptor.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc == 0 {
                return HostLock { _file: file };
            }
            assert!(
                Instant::now() < deadline,
                "{what} held {path} for more than {wait:?}"
            );
            if !told {
                eprintln!("waiting for {what} (lock {path}) to finish");
                told = true;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}
