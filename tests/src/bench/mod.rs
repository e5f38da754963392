//! `cargo xtask bench`: the sections of the benchmark report. Each section
//! module measures one thing and returns a [`report::Section`].

pub mod control;
pub mod e2e;
pub mod per_packet;
pub mod rate;
pub mod report;
pub mod scale;
