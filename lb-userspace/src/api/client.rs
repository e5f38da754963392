//! A client of the admin API over its Unix socket, for the CLI.

use std::{
    io,
    path::{Path, PathBuf},
};

use http_body_util::{BodyExt as _, Full};
use hyper::{
    body::{Bytes, Incoming},
    Method, StatusCode,
};
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

    /// An answer's whole body.
    async fn read_body(&self, body: Incoming) -> Result<Bytes, ClientError> {
        Ok(body
            .collect()
            .await
            .map_err(|e| self.protocol(e))?
            .to_bytes())
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

    /// `GET path` whose answer is a stream of lines (the events' NDJSON),
    /// read with [`Lines::next`] as they arrive.
    pub async fn lines(&self, path: &str) -> Result<Lines, ClientError> {
        let resp = self.send(Method::GET, path, None::<&()>).await?;
        Ok(Lines {
            body: resp.into_body(),
            buf: Vec::new(),
            client: self.clone(),
        })
    }

    /// Sends a request; an answer that is not a success becomes the
    /// daemon's one line.
    async fn send<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<hyper::Response<Incoming>, ClientError> {
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
        if status.is_success() {
            return Ok(resp);
        }
        let body = self.read_body(resp.into_body()).await?;
        let message = serde_json::from_slice::<ApiError>(&body)
            .map(|e| e.error)
            .unwrap_or_else(|_| format!("HTTP {status}"));
        Err(ClientError::Api {
            status: status.as_u16(),
            message,
        })
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let resp = self.send(method, path, body).await?;
        let status = resp.status();
        let body = self.read_body(resp.into_body()).await?;
        if status == StatusCode::NO_CONTENT {
            return serde_json::from_slice(b"null").map_err(|e| self.protocol(e));
        }
        serde_json::from_slice(&body).map_err(|e| self.protocol(format!("unexpected answer: {e}")))
    }
}

/// A streamed answer, line by line.
#[derive(Debug)]
pub struct Lines {
    body: Incoming,
    buf: Vec<u8>,
    client: Client,
}

impl Lines {
    /// The next non-empty line (empty ones are the stream's keep-alives),
    /// or `None` once the daemon has ended the stream.
    pub async fn next(&mut self) -> Result<Option<String>, ClientError> {
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                let line = String::from_utf8_lossy(&line[..end]).trim().to_owned();
                if line.is_empty() {
                    continue;
                }
                return Ok(Some(line));
            }
            match self.body.frame().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(self.client.protocol(e)),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}
