//! The domain: services, backends and the checks every source of them
//! (config file, admin API, Docker) applies alike. Nothing here knows about
//! files, HTTP or maps; config, state, Docker, the controller and the
//! reconciler all speak these types.

use std::{
    fmt,
    net::{Ipv4Addr, SocketAddrV4},
    str::FromStr,
};

use lb_common::{defaults, IPPROTO_TCP, IPPROTO_UDP};
use serde::{Deserialize, Serialize};

use crate::maglev::is_prime;

/// Where a service was declared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// In the config file: removed by editing the file.
    Config,
    /// Through the admin API: kept in the state file.
    Api,
}

/// How a backend is checked.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// A TCP connection to the backend's port (the default).
    #[default]
    Tcp,
    /// An HTTP/1.1 `GET` of `path` that must answer `status` (TCP
    /// services).
    Http,
    /// A UDP datagram of `payload` that must get any answer (UDP services).
    Udp,
}

impl fmt::Display for CheckKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CheckKind::Tcp => "tcp",
            CheckKind::Http => "http",
            CheckKind::Udp => "udp",
        })
    }
}

/// The path an HTTP check asks for when none is given.
pub const DEFAULT_HTTP_PATH: &str = "/";
/// The status an HTTP check expects when none is given.
pub const DEFAULT_HTTP_STATUS: u16 = 200;
/// Largest UDP check payload, in bytes: a probe, not a request body.
pub const MAX_UDP_PAYLOAD: usize = 1024;
/// Longest HTTP check path, in bytes.
pub const MAX_HTTP_PATH: usize = 1024;

/// An active health check: a backend that fails `fall` checks in a row is
/// taken out, one that passes `rise` in a row is put back. Without `kind`
/// it is a TCP connect, as before there were kinds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// What a check does.
    #[serde(default)]
    pub kind: CheckKind,
    /// Milliseconds between checks of one backend.
    pub interval_ms: u64,
    /// Milliseconds one check may take (connection, request and answer).
    pub timeout_ms: u64,
    /// Successes in a row that bring a backend back.
    pub rise: u32,
    /// Failures in a row that take a backend out.
    pub fall: u32,
    /// HTTP: the path requested ([`DEFAULT_HTTP_PATH`] when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// HTTP: the status that passes ([`DEFAULT_HTTP_STATUS`] when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// UDP: what is sent, as its UTF-8 bytes (required for `udp`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
}

impl Default for HealthCheck {
    fn default() -> Self {
        Self {
            kind: CheckKind::Tcp,
            interval_ms: 1_000,
            timeout_ms: 500,
            rise: 2,
            fall: 3,
            path: None,
            status: None,
            payload: None,
        }
    }
}

impl HealthCheck {
    /// Checks the fields against each other and the service's protocol;
    /// the reason is one line. An HTTP check's path and status are filled
    /// in with their defaults, so what is stored and listed is what runs.
    fn validate(mut self, protocol: Protocol) -> Result<Self, String> {
        if self.interval_ms == 0 || self.timeout_ms == 0 || self.rise == 0 || self.fall == 0 {
            return Err("interval, timeout, rise and fall must all be at least 1".into());
        }
        if self.timeout_ms > self.interval_ms {
            return Err(format!(
                "timeout {} ms is longer than the interval {} ms",
                self.timeout_ms, self.interval_ms
            ));
        }
        let kind = self.kind;
        let only = |field: &str, with: CheckKind| {
            format!("{field} goes with kind = \"{with}\" only, not with kind = \"{kind}\"")
        };
        if kind != CheckKind::Http {
            if self.path.is_some() {
                return Err(only("path", CheckKind::Http));
            }
            if self.status.is_some() {
                return Err(only("status", CheckKind::Http));
            }
        }
        if kind != CheckKind::Udp && self.payload.is_some() {
            return Err(only("payload", CheckKind::Udp));
        }
        match (kind, protocol) {
            (CheckKind::Http, Protocol::Udp) => {
                return Err(
                    "an HTTP check needs a TCP service; a UDP service takes kind = \"udp\"".into(),
                )
            }
            (CheckKind::Udp, Protocol::Tcp) => return Err(
                "a UDP check needs a UDP service; a TCP service takes kind = \"tcp\" or \"http\""
                    .into(),
            ),
            _ => {}
        }
        match kind {
            CheckKind::Tcp => {}
            CheckKind::Http => {
                let path = self.path.get_or_insert_with(|| DEFAULT_HTTP_PATH.into());
                if path.is_empty() {
                    return Err("path is empty: give the path to ask for, e.g. \"/healthz\"".into());
                }
                // It goes into the request line as it is.
                if !path.starts_with('/')
                    || path.len() > MAX_HTTP_PATH
                    || !path.bytes().all(|b| b.is_ascii_graphic())
                {
                    return Err(format!(
                        "path {path:?} is not a path: it starts with '/', is at most {MAX_HTTP_PATH} bytes and has no spaces or control characters"
                    ));
                }
                let status = *self.status.get_or_insert(DEFAULT_HTTP_STATUS);
                if !(100..=599).contains(&status) {
                    return Err(format!("status {status} is not an HTTP status (100-599)"));
                }
            }
            CheckKind::Udp => match &self.payload {
                None => {
                    return Err(
                        "payload missing: a UDP check sends a payload (e.g. \"ping\") and waits for any answer"
                            .into(),
                    )
                }
                Some(p) if p.is_empty() || p.len() > MAX_UDP_PAYLOAD => {
                    return Err(format!(
                        "payload of {} bytes: a UDP check sends 1 to {MAX_UDP_PAYLOAD}",
                        p.len()
                    ))
                }
                Some(_) => {}
            },
        }
        Ok(self)
    }
}

/// A transport protocol a service balances.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    /// IANA protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => IPPROTO_TCP,
            Protocol::Udp => IPPROTO_UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// How a service's packets reach its backends.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Forwarding {
    /// Destination NAT: the balancer rewrites the VIP to the backend's
    /// address and port, and the replies back.
    #[default]
    Nat,
    /// Direct server return: only the frame's MACs change; each backend
    /// holds the VIP and answers the client directly, so replies never
    /// cross the balancer. Ports cannot change.
    Dsr,
}

impl fmt::Display for Forwarding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Forwarding::Nat => "nat",
            Forwarding::Dsr => "dsr",
        })
    }
}

/// A backend address with its weight, written `ip:port` or `ip:port@weight`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendSpec {
    /// Address and port.
    pub addr: SocketAddrV4,
    /// Relative share of new flows (at least 1).
    pub weight: u32,
    /// Drained by the operator: keeps its flows, gets no new ones.
    pub drained: bool,
    /// Where a container backend's interface is, when Docker told us.
    pub via: Option<Via>,
}

/// A container backend's side of its veth: the process whose network
/// namespace holds it and the interface's MAC. The reconciler finds the
/// host side of the veth from these instead of from the routing table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Via {
    /// A process in the container's network namespace (its main process).
    pub pid: u32,
    /// The container interface's MAC.
    pub mac: [u8; 6],
}

impl FromStr for BackendSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, weight) = match s.split_once('@') {
            Some((a, w)) => (
                a,
                w.parse::<u32>()
                    .map_err(|_| format!("weight {w:?} in {s:?} is not a whole number"))?,
            ),
            None => (s, 1),
        };
        if weight == 0 {
            return Err(format!(
                "weight 0 in {s:?}: weights start at 1 (use drain or remove the backend)"
            ));
        }
        let addr = parse_socket_addr(addr)?;
        Ok(Self {
            addr,
            weight,
            drained: false,
            via: None,
        })
    }
}

impl fmt::Display for BackendSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.weight == 1 {
            write!(f, "{}", self.addr)
        } else {
            write!(f, "{}@{}", self.addr, self.weight)
        }
    }
}

/// Parses `a.b.c.d:port` with a port from 1 to 65535.
pub fn parse_socket_addr(s: &str) -> Result<SocketAddrV4, String> {
    let (ip, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?} is not IPv4:port"))?;
    let ip: Ipv4Addr = ip
        .parse()
        .map_err(|_| format!("{ip:?} in {s:?} is not an IPv4 address"))?;
    let port: u32 = port
        .parse()
        .map_err(|_| format!("port {port:?} in {s:?} is not a number"))?;
    if port == 0 || port > 65535 {
        return Err(format!("port {port} in {s:?} is out of range 1-65535"));
    }
    Ok(SocketAddrV4::new(ip, port as u16))
}

/// A bad field of one service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// The field: `name`, `vip`, `protocol`, `table_size`, `backends`, `health`.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

fn field_error(field: &'static str, reason: String) -> FieldError {
    FieldError { field, reason }
}

/// Checks a service name: 1-64 letters, digits, `-`, `_` or `.`.
pub fn check_name(name: &str) -> Result<(), FieldError> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(field_error(
            "name",
            format!("{name:?}: use 1-64 letters, digits, '-', '_' or '.'"),
        ));
    }
    Ok(())
}

/// Validates one service's own fields (not its backends, nor how it relates
/// to other services). The config file and the admin API both use it, so
/// both refuse the same inputs with the same words.
pub fn service_spec(
    name: &str,
    vip: &str,
    protocol: Option<&str>,
    table_size: Option<u32>,
    health: Option<HealthCheck>,
    forwarding: Option<Forwarding>,
    max_table_size: u32,
) -> Result<ServiceSpec, FieldError> {
    check_name(name)?;
    let protocol = match protocol {
        None | Some("tcp") => Protocol::Tcp,
        Some("udp") => Protocol::Udp,
        Some(p) => {
            return Err(field_error(
                "protocol",
                format!("{p:?} is neither \"tcp\" nor \"udp\""),
            ))
        }
    };
    let vip = parse_socket_addr(vip).map_err(|r| field_error("vip", r))?;
    let table_size = table_size.unwrap_or(defaults::TABLE_SIZE.min(max_table_size));
    if !is_prime(table_size) {
        return Err(field_error(
            "table_size",
            format!("{table_size} is not prime"),
        ));
    }
    if table_size > max_table_size {
        return Err(field_error(
            "table_size",
            format!("{table_size} is larger than datapath.max_table_size {max_table_size}"),
        ));
    }
    let health = health
        .map(|h| h.validate(protocol))
        .transpose()
        .map_err(|r| field_error("health", r))?;
    Ok(ServiceSpec {
        name: name.to_owned(),
        vip,
        protocol,
        table_size,
        backends: Vec::new(),
        origin: Origin::Config,
        health,
        image: None,
        forwarding: forwarding.unwrap_or_default(),
    })
}

/// A service, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    /// Unique name.
    pub name: String,
    /// Virtual address and port.
    pub vip: SocketAddrV4,
    /// Protocol.
    pub protocol: Protocol,
    /// Maglev table size (prime).
    pub table_size: u32,
    /// Static backends, unique by address.
    pub backends: Vec<BackendSpec>,
    /// Where the service was declared.
    pub origin: Origin,
    /// Active health check of the backends.
    pub health: Option<HealthCheck>,
    /// Docker containers of this image join the service.
    pub image: Option<ImageRule>,
    /// How packets reach the backends.
    pub forwarding: Forwarding,
}

impl ServiceSpec {
    /// Why backend `addr` cannot serve this service, if it cannot: direct
    /// server return delivers the packet as the client sent it, so a
    /// backend must listen on the VIP's own port.
    pub fn refuses_backend(&self, addr: SocketAddrV4) -> Option<String> {
        (self.forwarding == Forwarding::Dsr && addr.port() != self.vip.port()).then(|| {
            format!(
                "service {}: direct server return cannot change the port, but backend {addr} listens on {} and the VIP on {}",
                self.name,
                addr.port(),
                self.vip.port()
            )
        })
    }

    /// Why the image rule cannot serve this service, if it cannot: as for
    /// [`ServiceSpec::refuses_backend`], its containers' port must be the
    /// VIP's under direct server return.
    pub fn refuses_image(&self) -> Option<String> {
        let rule = self.image.as_ref()?;
        (self.forwarding == Forwarding::Dsr && rule.target_port != self.vip.port()).then(|| {
            format!(
                "service {}: direct server return cannot change the port, but target_port is {} and the VIP's port {}",
                self.name,
                rule.target_port,
                self.vip.port()
            )
        })
    }
}

/// An image rule: every running container of `image` is a backend on
/// `target_port`, without a label on the container.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ImageRule {
    /// Image reference as `docker run` takes it, e.g. `web:1`.
    pub image: String,
    /// The containers' port.
    pub target_port: u16,
}

/// Validates an image rule's two fields, which come together or not at all.
pub fn image_rule(
    image: Option<&str>,
    target_port: Option<u16>,
) -> Result<Option<ImageRule>, FieldError> {
    match (image, target_port) {
        (None, None) => Ok(None),
        (Some(_), None) => Err(field_error(
            "target_port",
            "missing: an image rule needs the containers' port".into(),
        )),
        (None, Some(_)) => Err(field_error(
            "image",
            "missing: target_port only goes with an image rule".into(),
        )),
        (Some(_), Some(0)) => Err(field_error(
            "target_port",
            "0 is out of range 1-65535".into(),
        )),
        (Some(i), Some(port)) => {
            let ok = !i.is_empty()
                && i.len() <= 255
                && i.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-/:@".contains(&b));
            if !ok {
                return Err(field_error(
                    "image",
                    format!("{i:?} is not an image reference (e.g. \"web:1\")"),
                ));
            }
            Ok(Some(ImageRule {
                image: i.to_owned(),
                target_port: port,
            }))
        }
    }
}

/// What kind of refusal a [`Refusal`] is. The admin API maps each to an
/// HTTP status; nothing else here knows about HTTP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefusalKind {
    /// The request itself is wrong.
    Invalid,
    /// What it names does not exist.
    NotFound,
    /// It contradicts the current state.
    Conflict,
    /// The daemon failed to carry it out.
    Failed,
}

/// `text` on one line: every control character (line breaks first of
/// all) and Unicode line or paragraph separator written as its escape
/// (`\n`, `\u{2028}`). Errors quote what a request, a config file or a
/// container's labels said, and third-party parsers (serde_json, toml)
/// quote it unescaped: through this, no such text can break an error or a
/// log line in two.
pub fn one_line(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() || c == '\u{2028}' || c == '\u{2029}' {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    out
}

/// A refused or failed change: one line for the operator. Nothing was
/// changed when a change is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    /// Which kind.
    pub kind: RefusalKind,
    /// One line.
    pub message: String,
}

impl Refusal {
    /// The request is wrong.
    pub fn invalid(message: String) -> Self {
        Self {
            kind: RefusalKind::Invalid,
            message: one_line(&message),
        }
    }

    /// What it names does not exist.
    pub fn not_found(message: String) -> Self {
        Self {
            kind: RefusalKind::NotFound,
            message: one_line(&message),
        }
    }

    /// It contradicts the current state.
    pub fn conflict(message: String) -> Self {
        Self {
            kind: RefusalKind::Conflict,
            message: one_line(&message),
        }
    }

    /// The daemon failed to carry it out.
    pub fn failed(message: String) -> Self {
        Self {
            kind: RefusalKind::Failed,
            message: one_line(&message),
        }
    }
}

#[cfg(test)]
mod one_line_tests {
    use super::*;

    #[test]
    fn line_breaks_are_escaped_and_the_rest_kept() {
        assert_eq!(one_line("plain: é, ✓"), "plain: é, ✓");
        assert_eq!(one_line("a\nb\rc\u{2028}d\u{0}"), r"a\nb\rc\u{2028}d\0");
        assert_eq!(one_line(""), "");
    }

    #[test]
    fn every_refusal_is_one_line() {
        for r in [
            Refusal::invalid("unknown variant `\n`".into()),
            Refusal::not_found("no service a\rb".into()),
            Refusal::conflict("x\u{2029}".into()),
            Refusal::failed("disk\nfull".into()),
        ] {
            assert!(
                !r.message.contains(['\n', '\r', '\u{2028}', '\u{2029}']),
                "{r:?}"
            );
        }
        assert_eq!(
            Refusal::invalid("unknown variant `\n`".into()).message,
            r"unknown variant `\n`"
        );
    }
}
