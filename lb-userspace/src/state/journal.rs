//! The state file's journal (`lb.state.journal` next to `lb.state.json`):
//! a commit appends the entries it changed, one JSON line each, so saving
//! costs the size of the change, not of the whole state. A change to a
//! service's backends is written as one line per backend that changed
//! (the whole service only when its other fields or its backends' order
//! changed), so one backend more for a service of a thousand is one short
//! line. The snapshot
//! (`lb.state.json`) is rewritten only once the journal has grown past it,
//! which keeps the cost per change constant on average and the journal short.
//!
//! Every line carries the sequence number of its commit; the snapshot
//! records the last one it includes, and loading skips lines at or below
//! it. So a crash between writing a new snapshot and emptying the journal
//! replays nothing twice.

use std::{
    collections::HashMap,
    fs,
    io::Write as _,
    net::SocketAddrV4,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::{Changes, Overlay, Override, StateError, StoredBackend, StoredService};

/// One change to the state: the new value of one entry, or its removal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum Entry {
    /// An API service, whole; `None`: removed.
    Service {
        /// The service's name.
        name: String,
        /// Its new value.
        value: Option<StoredService>,
    },
    /// The API's changes to a config service; `None`: none left.
    Changes {
        /// The config service's name.
        service: String,
        /// Its new value.
        value: Option<Changes>,
    },
    /// One backend of an API service; `None`: removed. A new one goes
    /// last.
    Backend {
        /// The API service's name.
        service: String,
        /// The backend's address.
        address: SocketAddrV4,
        /// Its new value.
        value: Option<StoredBackend>,
    },
    /// What the API changed of one backend of a config service; `None`:
    /// nothing (as the config file has it). An added one goes last.
    ConfigBackend {
        /// The config service's name.
        service: String,
        /// The backend's address.
        address: SocketAddrV4,
        /// Its new value.
        value: Option<Override>,
    },
}

/// A journal line: an entry and its commit's sequence number.
#[derive(Debug, Serialize, Deserialize)]
struct Line {
    seq: u64,
    #[serde(flatten)]
    entry: Entry,
}

/// The journal next to state file `state`.
pub(super) fn path_of(state: &Path) -> PathBuf {
    state.with_extension("journal")
}

/// Applies `entries` to `o` as the commits that wrote them changed it: a
/// service set in place keeps its position, a new one goes last.
pub(super) fn replay(o: &mut Overlay, entries: impl IntoIterator<Item = Entry>) {
    for entry in entries {
        match entry {
            Entry::Service { name, value } => {
                let at = o.services.iter().position(|s| s.name == name);
                match (at, value) {
                    (Some(i), Some(v)) => o.services[i] = v,
                    (None, Some(v)) => o.services.push(v),
                    (Some(i), None) => {
                        o.services.remove(i);
                    }
                    (None, None) => {}
                }
            }
            Entry::Changes { service, value } => match value {
                Some(v) => {
                    o.changes.insert(service, v);
                }
                None => {
                    o.changes.remove(&service);
                }
            },
            Entry::Backend {
                service,
                address,
                value,
            } => {
                if let Some(s) = o.services.iter_mut().find(|s| s.name == service) {
                    put(&mut s.backends, address, value, |b| b.address);
                }
            }
            Entry::ConfigBackend {
                service,
                address,
                value,
            } => o.changes.entry(service).or_default().put(address, value),
        }
    }
}

/// Sets the entry of `address` in `list` to `value` (`None`: removes it),
/// in its place, or last if it is new.
pub(super) fn put<T>(
    list: &mut Vec<T>,
    address: SocketAddrV4,
    value: Option<T>,
    key: impl Fn(&T) -> SocketAddrV4,
) {
    match (list.iter().position(|x| key(x) == address), value) {
        (Some(i), Some(v)) => list[i] = v,
        (Some(i), None) => {
            list.remove(i);
        }
        (None, Some(v)) => list.push(v),
        (None, None) => {}
    }
}

/// The entries of `after` that differ from `before` by address (`None`:
/// gone), the new ones last and in `after`'s order, if [`put`]ting them
/// into `before` rebuilds `after` in its order: `None` when `after` keeps
/// its earlier entries in another order or puts a new one before them.
pub(super) fn list_patch<'a, T: PartialEq>(
    before: &[T],
    after: &'a [T],
    key: impl Fn(&T) -> SocketAddrV4,
) -> Option<Vec<(SocketAddrV4, Option<&'a T>)>> {
    let old: HashMap<SocketAddrV4, &T> = before.iter().map(|x| (key(x), x)).collect();
    let new: HashMap<SocketAddrV4, &T> = after.iter().map(|x| (key(x), x)).collect();
    let kept_before = before.iter().map(&key).filter(|a| new.contains_key(a));
    let kept = after.iter().take_while(|x| old.contains_key(&key(x)));
    if !kept_before.eq(kept.map(&key)) {
        return None;
    }
    let mut patch: Vec<(SocketAddrV4, Option<&T>)> = (before.iter().map(&key))
        .filter(|a| !new.contains_key(a))
        .map(|a| (a, None))
        .collect();
    for x in after {
        if old.get(&key(x)) != Some(&x) {
            patch.push((key(x), Some(x)));
        }
    }
    Some(patch)
}

/// The lines of one commit.
pub(super) fn encode(seq: u64, entries: Vec<Entry>) -> Vec<u8> {
    let mut out = Vec::new();
    for entry in entries {
        serde_json::to_writer(&mut out, &Line { seq, entry }).expect("entries serialise");
        out.push(b'\n');
    }
    out
}

/// What [`read`] found.
#[derive(Debug, Default)]
pub(super) struct Read {
    /// Entries of commits after `after`, in order.
    pub entries: Vec<Entry>,
    /// The highest sequence number in the journal.
    pub last_seq: u64,
    /// The journal's length in bytes.
    pub len: u64,
    /// Whether the last line was cut short (a crash during an append).
    pub torn: bool,
}

/// Reads the journal at `path` (none: empty), keeping the entries of
/// commits after sequence number `after`. A last line cut short is the
/// append a crash interrupted, never acknowledged: it is dropped. Any other
/// line that does not parse makes the state corrupt.
pub(super) fn read(path: &Path, after: u64) -> Result<Read, StateError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Read::default()),
        Err(source) => {
            return Err(StateError::Io {
                path: path.to_owned(),
                source,
            })
        }
    };
    let mut read = Read {
        len: bytes.len() as u64,
        ..Read::default()
    };
    let mut lines = bytes
        .split_inclusive(|&b| b == b'\n')
        .enumerate()
        .peekable();
    while let Some((n, line)) = lines.next() {
        let complete = line.ends_with(b"\n");
        match serde_json::from_slice::<Line>(line) {
            Ok(l) => {
                read.last_seq = read.last_seq.max(l.seq);
                if l.seq > after {
                    read.entries.push(l.entry);
                }
            }
            Err(_) if !complete && lines.peek().is_none() => read.torn = true,
            Err(e) => {
                return Err(StateError::Corrupt {
                    path: path.to_owned(),
                    reason: format!("line {}: {e}", n + 1),
                })
            }
        }
    }
    Ok(read)
}

/// Appends `lines` to the journal and waits until they are on disk.
pub(super) fn append(path: &Path, lines: &[u8]) -> std::io::Result<()> {
    let mut f = fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(lines)?;
    f.sync_data()
}

/// Empties the journal once a snapshot holds everything in it.
pub(super) fn clear(path: &Path) -> std::io::Result<()> {
    match fs::OpenOptions::new().write(true).truncate(true).open(path) {
        Ok(f) => f.sync_all(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}
