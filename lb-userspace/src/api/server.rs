//! The admin API server: routes to [`Request`]s for the control task.
//!
//! | method | path | body | answer |
//! |---|---|---|---|
//! | GET | `/v1/services` | | `[ServiceInfo]` |
//! | POST | `/v1/services` | `NewService` | `ServiceInfo` (201) |
//! | DELETE | `/v1/services/{name}` | | `{}` |
//! | GET | `/v1/services/{name}/backends` | | `[BackendInfo]` |
//! | POST | `/v1/services/{name}/backends` | `NewBackend` or `[NewBackend]` | `{}` (201) |
//! | PUT | `/v1/services/{name}/backends` | `[NewBackend]` | `{}` |
//! | DELETE | `/v1/services/{name}/backends/{address}` | | `{}` |
//! | POST | `/v1/services/{name}/backends/{address}/drain` | | `{}` |
//! | POST | `/v1/services/{name}/backends/{address}/undrain` | | `{}` |
//! | PUT | `/v1/services/{name}/backends/{address}/weight` | `Weight` | `{}` |
//! | GET | `/v1/stats[?service=NAME]` | | `Stats` |
//! | GET | `/v1/status` | | `Status` |
//!
//! Errors are `{"error": "one line"}` with 400, 404, 409 or 500. A list
//! of backends is taken all or none: one refused backend refuses the call.

use std::{
    future::Future,
    io,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use axum::{
    body::Bytes,
    extract::{Path as UrlPath, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response as HttpResponse},
    routing::{get, post},
    Json, Router,
};
use serde::{de::DeserializeOwned, Deserialize};
use tokio::net::{UnixListener, UnixStream};

use super::types::{ApiError, NewBackend, Weight};
use crate::control::{Handle, Request, Response};
use crate::model::{Refusal, RefusalKind};

/// Default path of the admin socket.
pub const DEFAULT_SOCKET: &str = "/run/lb/lb.sock";

/// Errors of setting up the socket.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Another daemon answers on the socket.
    #[error("another lb daemon is already listening on {0}")]
    InUse(PathBuf),
    /// The socket could not be created.
    #[error("creating the admin socket {path}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: io::Error,
    },
}

/// Binds the admin socket: its directory made if needed, a stale socket
/// from a dead daemon replaced, mode 0600 so only root can connect.
pub async fn bind(path: &Path) -> Result<UnixListener, ServerError> {
    let io = |source| ServerError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(ServerError::InUse(path.to_owned()));
        }
        std::fs::remove_file(path).map_err(io)?;
    }
    // Created with a umask that leaves no window where others could connect.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let listener = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = listener.map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    Ok(listener)
}

/// Serves the API on `listener` until `shutdown` completes.
pub async fn serve(
    listener: UnixListener,
    handle: Handle,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    axum::serve(listener, router(handle))
        .with_graceful_shutdown(shutdown)
        .await
}

/// The routes.
pub fn router(handle: Handle) -> Router {
    Router::new()
        .route("/v1/services", get(list_services).post(add_service))
        .route("/v1/services/{name}", axum::routing::delete(remove_service))
        .route(
            "/v1/services/{name}/backends",
            get(list_backends).post(add_backends).put(set_backends),
        )
        .route(
            "/v1/services/{name}/backends/{address}",
            axum::routing::delete(remove_backend),
        )
        .route(
            "/v1/services/{name}/backends/{address}/drain",
            post(drain_backend),
        )
        .route(
            "/v1/services/{name}/backends/{address}/undrain",
            post(undrain_backend),
        )
        .route(
            "/v1/services/{name}/backends/{address}/weight",
            axum::routing::put(set_weight),
        )
        .route("/v1/stats", get(stats))
        .route("/v1/status", get(status))
        .fallback(|| async {
            failure(Refusal::not_found(
                "no such API path (see lb --help)".into(),
            ))
        })
        .with_state(handle)
}

fn failure(f: Refusal) -> HttpResponse {
    let code = match f.kind {
        RefusalKind::Invalid => StatusCode::BAD_REQUEST,
        RefusalKind::NotFound => StatusCode::NOT_FOUND,
        RefusalKind::Conflict => StatusCode::CONFLICT,
        RefusalKind::Failed => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (code, Json(ApiError { error: f.message })).into_response()
}

fn json_body<T: DeserializeOwned>(body: &Bytes) -> Result<T, Refusal> {
    serde_json::from_slice(body).map_err(|e| Refusal::invalid(format!("request body: {e}")))
}

async fn answer(handle: &Handle, req: Request, created: bool) -> HttpResponse {
    match handle.call(req).await {
        Err(f) => failure(f),
        Ok(r) => {
            let code = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            match r {
                Response::Services(v) => (code, Json(v)).into_response(),
                Response::Service(v) => (code, Json(v)).into_response(),
                Response::Backends(v) => (code, Json(v)).into_response(),
                Response::Stats(v) => (code, Json(v)).into_response(),
                Response::Status(v) => (code, Json(v)).into_response(),
                Response::Done => (code, Json(serde_json::json!({}))).into_response(),
            }
        }
    }
}

async fn list_services(State(h): State<Handle>) -> HttpResponse {
    answer(&h, Request::ListServices, false).await
}

async fn add_service(State(h): State<Handle>, body: Bytes) -> HttpResponse {
    match json_body(&body) {
        Ok(new) => answer(&h, Request::AddService(new), true).await,
        Err(f) => failure(f),
    }
}

async fn remove_service(State(h): State<Handle>, UrlPath(name): UrlPath<String>) -> HttpResponse {
    answer(&h, Request::RemoveService(name), false).await
}

async fn list_backends(State(h): State<Handle>, UrlPath(name): UrlPath<String>) -> HttpResponse {
    answer(&h, Request::ListBackends(name), false).await
}

/// `POST …/backends` takes one backend object or an array of them.
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(NewBackend),
    Many(Vec<NewBackend>),
}

async fn add_backends(
    State(h): State<Handle>,
    UrlPath(name): UrlPath<String>,
    body: Bytes,
) -> HttpResponse {
    match json_body::<OneOrMany>(&body) {
        Ok(OneOrMany::One(new)) => answer(&h, Request::AddBackends(name, vec![new]), true).await,
        Ok(OneOrMany::Many(new)) => answer(&h, Request::AddBackends(name, new), true).await,
        Err(_) => failure(Refusal::invalid(
            "request body: expected a backend {\"address\": \"ip:port\", \"weight\": n} or an array of them".into(),
        )),
    }
}

async fn set_backends(
    State(h): State<Handle>,
    UrlPath(name): UrlPath<String>,
    body: Bytes,
) -> HttpResponse {
    match json_body(&body) {
        Ok(new) => answer(&h, Request::SetBackends(name, new), false).await,
        Err(f) => failure(f),
    }
}

async fn remove_backend(
    State(h): State<Handle>,
    UrlPath((name, address)): UrlPath<(String, String)>,
) -> HttpResponse {
    answer(&h, Request::RemoveBackend(name, address), false).await
}

async fn drain_backend(
    State(h): State<Handle>,
    UrlPath((name, address)): UrlPath<(String, String)>,
) -> HttpResponse {
    answer(&h, Request::DrainBackend(name, address), false).await
}

async fn undrain_backend(
    State(h): State<Handle>,
    UrlPath((name, address)): UrlPath<(String, String)>,
) -> HttpResponse {
    answer(&h, Request::UndrainBackend(name, address), false).await
}

async fn set_weight(
    State(h): State<Handle>,
    UrlPath((name, address)): UrlPath<(String, String)>,
    body: Bytes,
) -> HttpResponse {
    match json_body::<Weight>(&body) {
        Ok(w) => answer(&h, Request::SetWeight(name, address, w.weight), false).await,
        Err(f) => failure(f),
    }
}

#[derive(Deserialize)]
struct StatsQuery {
    service: Option<String>,
}

async fn stats(State(h): State<Handle>, Query(q): Query<StatsQuery>) -> HttpResponse {
    answer(&h, Request::Stats(q.service), false).await
}

async fn status(State(h): State<Handle>) -> HttpResponse {
    answer(&h, Request::Status, false).await
}
