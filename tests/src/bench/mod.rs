//! `cargo xtask bench`: the sections of the benchmark report. Each section
//! module measures one thing and returns a [`report::Section`].

pub mod per_packet;
pub mod report;
