//! What lb keeps in etcd, under the configured prefix (`/lb/` by default):
//!
//! | key | value | lease |
//! |---|---|---|
//! | `{prefix}nodes/{node}/node` | [`NodeRecord`] (JSON) | the node's |
//! | `{prefix}nodes/{node}/backends/{service}/{ip}:{port}` | [`BackendRecord`] (JSON) | the node's |
//!
//! A node writes only keys under `{prefix}nodes/{node}/`, every one on its
//! own lease, so they all leave etcd together when the lease goes.
//! Values are JSON with a `version` field; a reader skips (and counts) a
//! value of another version or shape rather than guessing.

use std::net::SocketAddrV4;

use serde::{Deserialize, Serialize};

use crate::model::{check_name, one_line};

/// The version of the values this lb writes and reads.
pub const VERSION: u32 = 1;

/// Every key nodes publish starts with this.
pub fn nodes_prefix(prefix: &str) -> String {
    format!("{prefix}nodes/")
}

/// Every key `node` publishes starts with this.
pub fn node_prefix(prefix: &str, node: &str) -> String {
    format!("{prefix}nodes/{node}/")
}

/// The key of `node`'s own record.
pub fn node_key(prefix: &str, node: &str) -> String {
    format!("{prefix}nodes/{node}/node")
}

/// The key of backend `addr` of `service`, published by `node`.
pub fn backend_key(prefix: &str, node: &str, service: &str, addr: SocketAddrV4) -> String {
    format!("{prefix}nodes/{node}/backends/{service}/{addr}")
}

/// What a key under [`nodes_prefix`] names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeKey {
    /// A node's record.
    Node {
        /// The node.
        node: String,
    },
    /// A backend a node published.
    Backend {
        /// The node.
        node: String,
        /// The service.
        service: String,
        /// The backend's address.
        addr: SocketAddrV4,
    },
}

impl NodeKey {
    /// The node that published it.
    pub fn node(&self) -> &str {
        match self {
            NodeKey::Node { node } | NodeKey::Backend { node, .. } => node,
        }
    }
}

/// Reads a key under [`nodes_prefix`]`(prefix)`.
pub fn parse_key(prefix: &str, key: &[u8]) -> Result<NodeKey, DecodeError> {
    let bad = |why: &str| {
        DecodeError::Key(format!(
            "{}: {why}",
            one_line(&String::from_utf8_lossy(key))
        ))
    };
    let key = std::str::from_utf8(key).map_err(|_| bad("not UTF-8"))?;
    let rest = key
        .strip_prefix(&nodes_prefix(prefix))
        .ok_or_else(|| bad("not under the nodes' prefix"))?;
    let parts: Vec<&str> = rest.split('/').collect();
    let node = parts[0];
    crate::cluster::spec::check_node(node).map_err(|r| bad(&r))?;
    match parts[1..] {
        ["node"] => Ok(NodeKey::Node { node: node.into() }),
        ["backends", service, addr] => {
            check_name(service).map_err(|e| bad(&e.reason))?;
            let addr = addr
                .parse()
                .map_err(|_| bad("the last part is not ip:port"))?;
            Ok(NodeKey::Backend {
                node: node.into(),
                service: service.into(),
                addr,
            })
        }
        _ => Err(bad("not a key lb writes")),
    }
}

/// Longest container name a record may carry.
const MAX_CONTAINER_LEN: usize = 128;

/// One backend as its node publishes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendRecord {
    /// [`VERSION`].
    pub version: u32,
    /// Relative share of new flows (at least 1).
    pub weight: u32,
    /// Keeps its flows, takes no new ones (drained by the operator, or a
    /// container stopping, paused or failing its Docker health check).
    pub drained: bool,
    /// The container behind it, when Docker found it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
}

impl BackendRecord {
    /// The value written to etcd.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a record always serializes")
    }

    /// Reads a value written by [`BackendRecord::encode`], refusing what no
    /// node would write.
    pub fn decode(value: &[u8]) -> Result<Self, DecodeError> {
        let r: Self = serde_json::from_slice(value)
            .map_err(|e| DecodeError::Shape(one_line(&e.to_string())))?;
        if r.version != VERSION {
            return Err(DecodeError::Version(r.version));
        }
        if r.weight == 0 {
            return Err(DecodeError::Shape("weight 0".into()));
        }
        if let Some(c) = &r.container {
            if c.is_empty() || c.len() > MAX_CONTAINER_LEN || c.chars().any(char::is_control) {
                return Err(DecodeError::Shape(format!("container {:?}", one_line(c))));
            }
        }
        Ok(r)
    }
}

/// A node's record: that it is there, and which lb and lease it runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeRecord {
    /// [`VERSION`].
    pub version: u32,
    /// The lb release, e.g. `0.1.0`.
    pub lb: String,
    /// The lease its keys are attached to, in hex as `etcdctl` prints it.
    pub lease: String,
}

/// Why a value read from etcd was skipped. Renders as one line.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Not JSON of the expected shape.
    #[error("not a record lb reads: {0}")]
    Shape(String),
    /// A key lb does not write.
    #[error("key {0}")]
    Key(String),
    /// Written by another version of lb.
    #[error("version {0} (this lb reads {VERSION})")]
    Version(u32),
}

impl NodeRecord {
    /// This node's record on `lease`.
    pub fn new(lease: i64) -> Self {
        Self {
            version: VERSION,
            lb: env!("CARGO_PKG_VERSION").into(),
            lease: format!("{lease:x}"),
        }
    }

    /// The value written to etcd.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a record always serializes")
    }

    /// Reads a value written by [`NodeRecord::encode`].
    pub fn decode(value: &[u8]) -> Result<Self, DecodeError> {
        let r: Self = serde_json::from_slice(value)
            .map_err(|e| DecodeError::Shape(one_line(&e.to_string())))?;
        if r.version != VERSION {
            return Err(DecodeError::Version(r.version));
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_record_round_trips() {
        assert_eq!(node_key("/lb/", "host-a"), "/lb/nodes/host-a/node");
        let r = NodeRecord::new(0x694d_7a1c_22f0_0b13);
        assert_eq!(r.lease, "694d7a1c22f00b13");
        assert_eq!(NodeRecord::decode(&r.encode()).unwrap(), r);
    }

    #[test]
    fn backend_keys_and_records_round_trip() {
        let addr: SocketAddrV4 = "198.18.142.10:8080".parse().unwrap();
        let key = backend_key("/lb/", "host-b", "web", addr);
        assert_eq!(key, "/lb/nodes/host-b/backends/web/198.18.142.10:8080");
        assert_eq!(
            parse_key("/lb/", key.as_bytes()).unwrap(),
            NodeKey::Backend {
                node: "host-b".into(),
                service: "web".into(),
                addr
            }
        );
        assert_eq!(
            parse_key("/lb/", node_key("/lb/", "a").as_bytes()).unwrap(),
            NodeKey::Node { node: "a".into() }
        );
        let r = BackendRecord {
            version: VERSION,
            weight: 2,
            drained: true,
            container: Some("web-1".into()),
        };
        assert_eq!(
            String::from_utf8(r.encode()).unwrap(),
            r#"{"version":1,"weight":2,"drained":true,"container":"web-1"}"#
        );
        assert_eq!(BackendRecord::decode(&r.encode()).unwrap(), r);
        let plain = BackendRecord::decode(br#"{"version":1,"weight":1,"drained":false}"#).unwrap();
        assert_eq!(plain.container, None);
    }

    #[test]
    fn foreign_keys_are_refused_in_one_line() {
        for bad in [
            &b"/lb/nodes/"[..],
            b"/lb/nodes/a",
            b"/lb/nodes/a/other",
            b"/lb/nodes/a b/node",
            b"/lb/nodes/a/backends/web",
            b"/lb/nodes/a/backends/web/198.18.0.1",
            b"/lb/nodes/a/backends/web/198.18.0.1:0x",
            b"/lb/nodes/a/backends/w\neb/198.18.0.1:80",
            b"/lb/nodes/a/backends/web/198.18.0.1:80/x",
            b"/other/nodes/a/node",
            b"/lb/nodes/\xff/node",
        ] {
            let e = parse_key("/lb/", bad).unwrap_err().to_string();
            assert!(!e.is_empty() && !e.contains('\n'), "{bad:?}: {e:?}");
        }
        for bad in [
            &br#"{"version":1,"weight":0,"drained":false}"#[..],
            br#"{"version":1,"weight":1}"#,
            br#"{"version":1,"weight":1,"drained":false,"container":""}"#,
            br#"{"version":1,"weight":1,"drained":false,"container":"a\nb"}"#,
            br#"{"version":9,"weight":1,"drained":false}"#,
            br#"{"version":1,"weight":-1,"drained":false}"#,
        ] {
            let e = BackendRecord::decode(bad).unwrap_err().to_string();
            assert!(!e.is_empty() && !e.contains('\n'), "{bad:?}: {e:?}");
        }
    }

    #[test]
    fn foreign_values_are_refused_in_one_line() {
        for bad in [
            &b""[..],
            b"{}",
            b"\xff\xfe",
            b"{\"version\":1,\"lb\":\"0.1.0\",\"lease\":\"1\",\"x\":1}",
            b"{\"version\":2,\"lb\":\"0.2.0\",\"lease\":\"1\"}",
            b"[1,\n2]",
        ] {
            let e = NodeRecord::decode(bad).unwrap_err().to_string();
            assert!(!e.is_empty() && !e.contains('\n'), "{bad:?}: {e:?}");
        }
    }
}
