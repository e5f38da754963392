//! Opening netlink sockets inside another network namespace.
//!
//! A netlink socket stays bound to the namespace it was created in, so a
//! short-lived thread enters the namespace (`setns` changes only the calling
//! thread's), opens the sockets there and exits; the sockets are then used
//! from the runtime like any other. No tokio worker ever changes namespace.

use std::{fs::File, io, path::Path};

use nix::sched::{setns, CloneFlags};

use super::HostError;

/// Runs `open` on a new thread inside the network namespace `netns`, with
/// the current tokio runtime entered (so it can create and spawn
/// connections), and returns what it opened.
pub(super) async fn in_netns<T, F>(netns: &Path, open: F) -> Result<T, HostError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, HostError> + Send + 'static,
{
    let err = |source| HostError::Namespace {
        path: netns.to_owned(),
        source,
    };
    let file = File::open(netns).map_err(err)?;
    let runtime = tokio::runtime::Handle::current();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("lb-netns".into())
        .spawn(move || {
            let opened = match setns(&file, CloneFlags::CLONE_NEWNET) {
                Ok(()) => {
                    let _runtime = runtime.enter();
                    Ok(open())
                }
                Err(e) => Err(io::Error::from(e)),
            };
            let _ = tx.send(opened);
        })
        .map_err(err)?;
    rx.await
        .unwrap_or_else(|_| Err(io::Error::other("the namespace thread panicked")))
        .map_err(err)?
}
