//! The `lb` daemon as a library: config, cluster mode, Maglev, the data path loader, host
//! queries, the reconcile loop, the admin API and CLI, health checks,
//! metrics, the change log and the dashboard. `main.rs` only parses the
//! command line and dispatches.
pub mod api;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod control;
pub mod daemon;
pub mod datapath;
pub mod docker;
pub mod events;
pub mod health;
pub mod host;
#[cfg(test)]
mod inputs;
pub mod maglev;
pub mod metrics;
pub mod model;
pub mod privileges;
pub mod reconcile;
pub mod state;
pub mod ui;
