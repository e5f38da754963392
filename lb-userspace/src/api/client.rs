//! A client of the admin API over its Unix socket, for the CLI.

use std::{
    io,
    path::{Path, PathBuf},
};

use http_body_util::{BodyExt as _, Full};
use hyper::{body::Bytes, Method, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{de::DeserializeOwned, Serialize};
use tokio::net::UnixStream;

use super::types::ApiError;

/// Why a call failed. Each renders as one line for the operator.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the socket.
    #[error("no lb daemon is listening on {0} (start one with `lb run`, or pass --socket)")]
    NoDaemon(PathBuf),
    /// The socket is not ours to use.
    #[error("permission denied on {0}: the admin socket is root's (mode 0600); run as root")]
    Permission(PathBuf),
    /// The daemon refused or failed the request.
    #[error("{message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// The daemon's one line.
        message: String,
    },
    /// The connection broke or the answer was not what the API promises.
    #[error("talking to the daemon on {path}: {reason}")]
    Protocol {
        /// The socket.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

/// An admin API client.
#[derive(Clone, Debug)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    /// A client of the daemon listening on `socket`.
    pub fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_owned(),
        }
    }

    fn protocol(&self, reason: impl ToString) -> ClientError {
        ClientError::Protocol {
            path: self.socket.clone(),
            reason: reason.to_string(),
        }
    }

    /// `GET path`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::GET, path, None::<&()>).await
    }

    /// `POST path` with a JSON body.
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.call(Method::POST, path, Some(body)).await
    }

    /// `PUT path` with a JSON body.
    pub async fn put<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.call(Method::PUT, path, Some(body)).await
    }

    /// `DELETE path`.
    pub async fn delete(&self, path: &str) -> Result<(), ClientError> {
        self.call::<(), serde_json::Value>(Method::DELETE, path, None)
            .await
            .map(|_| ())
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|e| match e.kind() {
                io::ErrorKind::PermissionDenied => ClientError::Permission(self.socket.clone()),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                    ClientError::NoDaemon(self.socket.clone())
                }
                _ => self.protocol(e),
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.protocol(e))?;
        tokio::spawn(conn);
        let bytes = match body {
            Some(b) => serde_json::to_vec(b).map_err(|e| self.protocol(e))?,
            None => Vec::new(),
        };
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "lb")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| self.protocol(e))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| self.protocol(e))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| self.protocol(e))?
            .to_bytes();
        if !status.is_success() {
            let message = serde_json::from_slice::<ApiError>(&body)
                .map(|e| e.error)
                .unwrap_or_else(|_| format!("HTTP {status}"));
            return Err(ClientError::Api {
                status: status.as_u16(),
                message,
            });
        }
        if status == StatusCode::NO_CONTENT {
            return serde_json::from_slice(b"null").map_err(|e| self.protocol(e));
        }
        serde_json::from_slice(&body).map_err(|e| self.protocol(format!("unexpected answer: {e}")))
    }
}
