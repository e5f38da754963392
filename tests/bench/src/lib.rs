//! The benchmark behind `cargo xtask bench` (run by the `lb-bench` binary):
//! the sections of its report. Each section module measures one thing and
//! returns a [`report::Section`]; the `--only` key of a section is its
//! [`report::Section::key`].

pub mod control_plane;
pub mod docker_churn;
pub mod e2e;
pub mod per_packet;
pub mod rate;
mod raw_bpf;
pub mod reliability;
pub mod report;
pub mod scale;

use std::{
    fs,
    path::{Path, PathBuf},
};

use aya::maps::{Map, MapData};

/// The pinned map `name` in the data path directory `dir`; panics if it
/// cannot be opened.
pub(crate) fn open_pinned(dir: &Path, name: &str) -> Map {
    let data = MapData::from_pin(dir.join(name))
        .unwrap_or_else(|e| panic!("opening pinned map {name}: {e}"));
    Map::from_map_data(data).unwrap_or_else(|e| panic!("pinned map {name}: {e}"))
}

/// The bpffs directory a section's daemon pins under; removed (with
/// anything left in it) when created and when dropped.
pub(crate) struct PinDir(PathBuf);

impl PinDir {
    /// `/sys/fs/bpf/lb-bench-{section}-{pid}`.
    pub(crate) fn new(section: &str) -> Self {
        let dir = Self(PathBuf::from(format!(
            "/sys/fs/bpf/lb-bench-{section}-{}",
            std::process::id()
        )));
        dir.remove();
        dir
    }

    /// The directory.
    pub(crate) fn path(&self) -> &std::path::Path {
        &self.0
    }

    fn remove(&self) {
        if self.0.exists() {
            if let Err(e) = fs::remove_dir_all(&self.0) {
                eprintln!("warning: removing {}: {e}", self.0.display());
            }
        }
    }

    /// The data path's directory inside (named after the map layout).
    pub(crate) fn datapath_dir(&self) -> PathBuf {
        fs::read_dir(&self.0)
            .unwrap_or_else(|e| panic!("reading {}: {e}", self.0.display()))
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("abi"))
            })
            .unwrap_or_else(|| panic!("no pinned data path under {}", self.0.display()))
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        self.remove();
    }
}
