//! The dashboard: `lb run --ui ADDR` serves one read-only page, embedded in
//! the binary (`ui/index.html`: HTML, CSS and hand-written JS in one file,
//! nothing fetched from anywhere else), and the two feeds it reads:
//!
//! | path | answer |
//! |---|---|
//! | `/` | the page |
//! | `/snapshot` | [`Snapshot`]: services, counters, status, the last event's number |
//! | `/events[?since=SEQ][&service=NAME]` | the change log as NDJSON, as `GET /v1/events` |
//!
//! Only `GET` is routed: nothing on this listener changes anything. The
//! page polls `/snapshot` every 2 s (and soon after each change event)
//! for counters, from which it works out the rates and keeps the last five
//! minutes of them for its charts; it follows `/events` from the last 500
//! events before the snapshot's `last_seq`, so its log starts with recent
//! history and no change falls between the two. With 1,000 backends it
//! draws one page of 100 table rows at a time.
//!
//! A listener on loopback only answers requests whose `Host` is a
//! loopback name, so a web page elsewhere cannot read it through a DNS
//! name rebound to 127.0.0.1.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    time::{SystemTime, UNIX_EPOCH},
};

use axum::{
    extract::{Query, Request, State},
    http::{header, StatusCode},
    middleware::{self, Next},
    response::{Html, IntoResponse, Response as HttpResponse},
    routing::get,
    Json, Router,
};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tracing::warn;

use crate::{
    api::{
        server::{EventStreams, EventsQuery},
        types::{ApiError, ServiceInfo, Stats, Status},
    },
    control::{Handle, Request as Call, Response},
    events::EventLog,
};

/// The page.
const PAGE: &str = include_str!("ui/index.html");

/// Event streams the page listener serves at once (browser tabs).
pub const UI_STREAMS: usize = 16;

/// What the page draws, `GET /snapshot`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// When it was taken, milliseconds since the Unix epoch.
    pub unix_ms: u64,
    /// Every service, as `GET /v1/services` lists them.
    pub services: Vec<ServiceInfo>,
    /// Counters, as `GET /v1/stats`.
    pub stats: Stats,
    /// The daemon, as `GET /v1/status`.
    pub status: Status,
    /// The last event published before the snapshot was asked for: the
    /// page follows `/events?since=last_seq`.
    pub last_seq: u64,
}

/// Binds the page's listener. Anyone who can reach it sees the services,
/// backends and traffic, so a non-loopback address gets a warning.
pub async fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    if !addr.ip().is_loopback() {
        warn!(%addr, "dashboard served on a non-loopback address: anyone who can reach it sees services, backends and traffic");
    }
    TcpListener::bind(addr).await
}

/// Serves the page and its feeds on a listener from [`bind`] until
/// `shutdown` completes. Event streams end when the controller closes
/// `events`.
pub async fn serve_on(
    listener: TcpListener,
    handle: Handle,
    events: EventLog,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let loopback = listener.local_addr()?.ip().is_loopback();
    axum::serve(listener, router(handle, events, loopback))
        .with_graceful_shutdown(shutdown)
        .await
}

#[derive(Clone)]
struct Ui {
    handle: Handle,
    events: EventStreams,
    log: EventLog,
}

/// The routes; `loopback_only` refuses requests for other host names.
pub fn router(handle: Handle, log: EventLog, loopback_only: bool) -> Router {
    let ui = Ui {
        handle,
        events: EventStreams::new(log.clone(), UI_STREAMS),
        log,
    };
    let app = Router::new()
        .route("/", get(page))
        .route("/snapshot", get(snapshot))
        .route("/events", get(events))
        .with_state(ui);
    let app = if loopback_only {
        app.layer(middleware::from_fn(loopback_host))
    } else {
        app
    };
    app.layer(middleware::map_response(secure_headers))
}

/// Whether a `Host` header names this machine's loopback: `localhost`,
/// `127.x.y.z` or `[::1]`, with any port.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

async fn loopback_host(req: Request, next: Next) -> HttpResponse {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if !is_loopback_host(host) {
        return (
            StatusCode::MISDIRECTED_REQUEST,
            Json(ApiError {
                error: format!("the dashboard answers loopback host names only, not {host:?}"),
            }),
        )
            .into_response();
    }
    next.run(req).await
}

/// Nothing from elsewhere: no script, style, image or connection but this
/// origin's own (and the page's inline script and style), no framing.
async fn secure_headers(mut res: HttpResponse) -> HttpResponse {
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        header::HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
             frame-ancestors 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        header::HeaderValue::from_static("no-referrer"),
    );
    res
}

async fn page() -> HttpResponse {
    ([(header::CACHE_CONTROL, "no-store")], Html(PAGE)).into_response()
}

fn unavailable(error: String) -> HttpResponse {
    (StatusCode::SERVICE_UNAVAILABLE, Json(ApiError { error })).into_response()
}

async fn snapshot(State(ui): State<Ui>) -> HttpResponse {
    let last_seq = ui.log.last_seq();
    let services = match ui.handle.call(Call::ListServices).await {
        Ok(Response::Services(s)) => s,
        Ok(other) => return unavailable(format!("unexpected answer: {other:?}")),
        Err(f) => return unavailable(f.message),
    };
    let stats = match ui.handle.call(Call::Stats(None)).await {
        Ok(Response::Stats(s)) => s,
        Ok(other) => return unavailable(format!("unexpected answer: {other:?}")),
        Err(f) => return unavailable(f.message),
    };
    let status = match ui.handle.call(Call::Status).await {
        Ok(Response::Status(s)) => *s,
        Ok(other) => return unavailable(format!("unexpected answer: {other:?}")),
        Err(f) => return unavailable(f.message),
    };
    let unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    (
        [(header::CACHE_CONTROL, "no-store")],
        Json(Snapshot {
            unix_ms,
            services,
            stats,
            status,
            last_seq,
        }),
    )
        .into_response()
}

async fn events(State(ui): State<Ui>, Query(q): Query<EventsQuery>) -> HttpResponse {
    ui.events.answer(q)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_host_names_pass() {
        for ok in [
            "127.0.0.1:9107",
            "127.0.0.1",
            "localhost:9107",
            "LOCALHOST",
            "[::1]:9107",
            "127.1.2.3:80",
        ] {
            assert!(is_loopback_host(ok), "{ok}");
        }
        for bad in [
            "evil.example:9107",
            "198.18.0.1:9107",
            "",
            "localhost.evil.example",
            "[2001:2::1]:9107",
        ] {
            assert!(!is_loopback_host(bad), "{bad}");
        }
    }

    #[test]
    fn the_page_fetches_nothing_from_elsewhere() {
        for far in ["http://", "https://", "//cdn", "@import", "<link", "src="] {
            assert!(!PAGE.contains(far), "the page must not load {far}");
        }
    }
}
