//! The `[cluster]` section of the config file: read here, validated into a
//! [`ClusterSpec`] whose every value is usable as it is.

use std::{path::PathBuf, time::Duration};

use serde::Deserialize;

/// Default of `[cluster] prefix`.
pub const DEFAULT_PREFIX: &str = "/lb/";
/// Default of `[cluster] lease_ttl_secs`.
pub const DEFAULT_LEASE_TTL_SECS: u64 = 10;
/// Shortest lease: etcd refuses TTLs below its own minimum (about 1.5 times
/// its election timeout), and a keep-alive every third of it must fit.
const MIN_LEASE_TTL_SECS: u64 = 2;
/// Longest lease: a dead node's backends stay this long at most.
const MAX_LEASE_TTL_SECS: u64 = 3600;
/// Longest node name: a DNS label.
const MAX_NODE_LEN: usize = 63;

/// `[cluster]` as written in the file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCluster {
    etcd: Vec<String>,
    node: String,
    prefix: Option<String>,
    lease_ttl_secs: Option<u64>,
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
}

/// Cluster mode's settings, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterSpec {
    /// etcd's client URLs, `http://host:port` or `https://host:port`.
    pub endpoints: Vec<String>,
    /// This node's name, unique in the cluster.
    pub node: String,
    /// Every key lb writes starts with this; it begins and ends with `/`.
    pub prefix: String,
    /// How long a node's keys outlive its last keep-alive.
    pub lease_ttl: Duration,
    /// TLS files, for `https://` endpoints.
    pub tls: Option<TlsFiles>,
}

/// The files of a TLS connection to etcd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA that signed etcd's server certificate (PEM).
    pub ca: PathBuf,
    /// This node's client certificate and key (PEM), when etcd asks for one.
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// A field of `[cluster]` and what is wrong with it.
#[derive(Debug, PartialEq, Eq)]
pub struct Invalid {
    /// The field, e.g. `cluster.node`.
    pub field: &'static str,
    /// Why it is refused.
    pub reason: String,
}

fn invalid(field: &'static str, reason: String) -> Invalid {
    Invalid { field, reason }
}

impl RawCluster {
    /// Checks every field; the first problem found is the error.
    pub fn validate(self) -> Result<ClusterSpec, Invalid> {
        if self.etcd.is_empty() {
            return Err(invalid(
                "cluster.etcd",
                "empty: list etcd's client URLs, e.g. [\"http://198.18.0.1:2379\"]".into(),
            ));
        }
        let mut https = None;
        for url in &self.etcd {
            let secure = check_endpoint(url).map_err(|r| invalid("cluster.etcd", r))?;
            if https.is_some_and(|h| h != secure) {
                return Err(invalid(
                    "cluster.etcd",
                    "mixes http:// and https:// endpoints".into(),
                ));
            }
            https = Some(secure);
        }
        let https = https == Some(true);
        check_node(&self.node).map_err(|r| invalid("cluster.node", r))?;
        let prefix = match self.prefix {
            Some(p) => {
                check_prefix(&p).map_err(|r| invalid("cluster.prefix", r))?;
                p
            }
            None => DEFAULT_PREFIX.into(),
        };
        let ttl = self.lease_ttl_secs.unwrap_or(DEFAULT_LEASE_TTL_SECS);
        if !(MIN_LEASE_TTL_SECS..=MAX_LEASE_TTL_SECS).contains(&ttl) {
            return Err(invalid(
                "cluster.lease_ttl_secs",
                format!("{ttl} is outside {MIN_LEASE_TTL_SECS}..={MAX_LEASE_TTL_SECS}"),
            ));
        }
        let identity = match (self.cert_file, self.key_file) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            (Some(_), None) => {
                return Err(invalid(
                    "cluster.key_file",
                    "missing: cert_file needs its key_file".into(),
                ))
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "cluster.cert_file",
                    "missing: key_file needs its cert_file".into(),
                ))
            }
        };
        let tls = match (https, self.ca_file, identity) {
            (true, Some(ca), identity) => Some(TlsFiles { ca, identity }),
            (true, None, _) => {
                return Err(invalid(
                    "cluster.ca_file",
                    "missing: https:// endpoints need the CA of etcd's certificate".into(),
                ))
            }
            (false, None, None) => None,
            (false, _, _) => {
                return Err(invalid(
                    "cluster.etcd",
                    "TLS files are set but the endpoints are http://; use https://".into(),
                ))
            }
        };
        Ok(ClusterSpec {
            endpoints: self.etcd,
            node: self.node,
            prefix,
            lease_ttl: Duration::from_secs(ttl),
            tls,
        })
    }
}

/// Checks `http://host:port` or `https://host:port`; whether it is https.
fn check_endpoint(url: &str) -> Result<bool, String> {
    let (secure, rest) = if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else {
        return Err(format!(
            "{url:?}: use http://host:port or https://host:port"
        ));
    };
    let ok = rest.rsplit_once(':').is_some_and(|(host, port)| {
        !host.is_empty()
            && !host.contains(['/', '@', ' ', '?', '#'])
            && port.parse::<u16>().is_ok_and(|p| p != 0)
    });
    if ok {
        Ok(secure)
    } else {
        Err(format!(
            "{url:?}: use http://host:port or https://host:port"
        ))
    }
}

/// A node's name is a key segment: letters, digits, `.`, `_` and `-`.
pub fn check_node(node: &str) -> Result<(), String> {
    if node.is_empty() || node.len() > MAX_NODE_LEN {
        return Err(format!("{node:?}: 1 to {MAX_NODE_LEN} characters"));
    }
    if node == "." || node == ".." {
        return Err(format!("{node:?} is not a name"));
    }
    if !node
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(format!(
            "{node:?}: use letters, digits, '.', '_' and '-' only"
        ));
    }
    Ok(())
}

fn check_prefix(p: &str) -> Result<(), String> {
    if !p.starts_with('/') || !p.ends_with('/') {
        return Err(format!("{p:?}: must begin and end with '/', e.g. \"/lb/\""));
    }
    if p.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("{p:?}: no spaces or control characters"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ClusterSpec, Invalid> {
        toml::from_str::<RawCluster>(text).unwrap().validate()
    }

    #[test]
    fn defaults() {
        let spec = parse("etcd = [\"http://198.18.0.1:2379\"]\nnode = \"host-a\"").unwrap();
        assert_eq!(
            spec,
            ClusterSpec {
                endpoints: vec!["http://198.18.0.1:2379".into()],
                node: "host-a".into(),
                prefix: "/lb/".into(),
                lease_ttl: Duration::from_secs(10),
                tls: None,
            }
        );
    }

    #[test]
    fn tls_files() {
        let spec = parse(
            "etcd = [\"https://etcd-1:2379\", \"https://etcd-2:2379\"]\nnode = \"b\"\n\
             ca_file = \"/etc/lb/ca.pem\"\ncert_file = \"/etc/lb/b.pem\"\nkey_file = \"/etc/lb/b.key\"\n\
             prefix = \"/prod/lb/\"\nlease_ttl_secs = 5",
        )
        .unwrap();
        assert_eq!(spec.prefix, "/prod/lb/");
        assert_eq!(spec.lease_ttl, Duration::from_secs(5));
        assert_eq!(
            spec.tls,
            Some(TlsFiles {
                ca: "/etc/lb/ca.pem".into(),
                identity: Some(("/etc/lb/b.pem".into(), "/etc/lb/b.key".into())),
            })
        );
    }

    #[test]
    fn bad_values_name_their_field() {
        let cases = [
            ("etcd = []\nnode = \"a\"", "cluster.etcd"),
            ("etcd = [\"198.18.0.1:2379\"]\nnode = \"a\"", "cluster.etcd"),
            (
                "etcd = [\"http://198.18.0.1\"]\nnode = \"a\"",
                "cluster.etcd",
            ),
            ("etcd = [\"http://:2379\"]\nnode = \"a\"", "cluster.etcd"),
            ("etcd = [\"http://h:0\"]\nnode = \"a\"", "cluster.etcd"),
            (
                "etcd = [\"http://h:1\", \"https://h:2\"]\nnode = \"a\"\nca_file = \"/c\"",
                "cluster.etcd",
            ),
            (
                "etcd = [\"http://h:1\"]\nnode = \"a\"\nca_file = \"/c\"",
                "cluster.etcd",
            ),
            ("etcd = [\"https://h:1\"]\nnode = \"a\"", "cluster.ca_file"),
            (
                "etcd = [\"https://h:1\"]\nnode = \"a\"\nca_file = \"/c\"\ncert_file = \"/x\"",
                "cluster.key_file",
            ),
            ("etcd = [\"http://h:1\"]\nnode = \"\"", "cluster.node"),
            ("etcd = [\"http://h:1\"]\nnode = \"a/b\"", "cluster.node"),
            ("etcd = [\"http://h:1\"]\nnode = \"..\"", "cluster.node"),
            (
                "etcd = [\"http://h:1\"]\nnode = \"a\"\nprefix = \"lb/\"",
                "cluster.prefix",
            ),
            (
                "etcd = [\"http://h:1\"]\nnode = \"a\"\nprefix = \"/lb\"",
                "cluster.prefix",
            ),
            (
                "etcd = [\"http://h:1\"]\nnode = \"a\"\nlease_ttl_secs = 1",
                "cluster.lease_ttl_secs",
            ),
            (
                "etcd = [\"http://h:1\"]\nnode = \"a\"\nlease_ttl_secs = 7200",
                "cluster.lease_ttl_secs",
            ),
        ];
        for (text, field) in cases {
            let e = parse(text).expect_err(text);
            assert_eq!(e.field, field, "{text}: {}", e.reason);
            assert!(!e.reason.contains('\n'), "{text}: {}", e.reason);
        }
    }
}
