//! The admin API: HTTP with JSON bodies over a Unix socket, as Docker's own
//! API is, so `curl --unix-socket /run/lb/lb.sock` works and the CLI is a
//! thin client of the same API.
pub mod client;
pub mod server;
pub mod types;

/// What kind of refusal a [`Failure`] is; decides the HTTP status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// The request itself is wrong (400).
    BadRequest,
    /// What it names does not exist (404).
    NotFound,
    /// It contradicts the current state (409).
    Conflict,
    /// The daemon failed to carry it out (500).
    Internal,
}

/// A refused or failed request: one line for the operator.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    /// Which kind.
    pub kind: FailureKind,
    /// One line.
    pub message: String,
}

impl Failure {
    /// A 400.
    pub fn bad_request(message: String) -> Self {
        Self {
            kind: FailureKind::BadRequest,
            message,
        }
    }

    /// A 404.
    pub fn not_found(message: String) -> Self {
        Self {
            kind: FailureKind::NotFound,
            message,
        }
    }

    /// A 409.
    pub fn conflict(message: String) -> Self {
        Self {
            kind: FailureKind::Conflict,
            message,
        }
    }

    /// A 500.
    pub fn internal(message: String) -> Self {
        Self {
            kind: FailureKind::Internal,
            message,
        }
    }
}
