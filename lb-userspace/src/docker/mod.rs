//! Docker: the engine client ([`engine`]) reports containers; the
//! membership policy ([`membership`]) decides which of them serve which
//! service. Only the controller joins the two: the engine never sees
//! services, and the policy never talks to the engine.

pub mod engine;
pub mod membership;

pub use engine::{open, watch, DockerSink, DockerUpdate, Session, WatchError};
pub use membership::{Container, Endpoint, Health, Tracker};
