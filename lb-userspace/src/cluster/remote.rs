//! What the other nodes published, as read from etcd, and how it is merged
//! into one set of remote backends per service.
//!
//! **One address reported by two nodes** (an address reused, or a stale
//! key): this node's own backend always wins, since it knows it first
//! hand; among other nodes the one that published it first wins (the
//! lowest create revision of the key; the node name breaks a tie). Each
//! such clash is logged once, when it appears.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddrV4,
};

use super::keys::{parse_key, BackendRecord, DecodeError, NodeKey, NodeRecord};
use crate::model::BackendSpec;

/// A backend another node published, as applied here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteBackend {
    /// The node that published it.
    pub node: String,
    /// The backend entry (reached by routing: no `via`).
    pub spec: BackendSpec,
    /// The container behind it, when its node's Docker found it.
    pub container: Option<String>,
}

/// Remote backends by service name.
pub type RemoteSet = BTreeMap<String, Vec<RemoteBackend>>;

/// One address published by several nodes for one service.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Clash {
    /// The service.
    pub service: String,
    /// The address.
    pub addr: SocketAddrV4,
    /// The node whose backend is used.
    pub winner: String,
    /// The others, by name.
    pub losers: Vec<String>,
}

impl std::fmt::Display for Clash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "backend {} of service {} is published by nodes {} and {}; using {}'s",
            self.addr,
            self.service,
            self.winner,
            self.losers.join(", "),
            self.winner
        )
    }
}

/// A backend key's value and when it was created.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    record: BackendRecord,
    created: i64,
}

/// Every node's keys as last read, this node's own included.
#[derive(Debug)]
pub struct View {
    prefix: String,
    own: String,
    /// By (service, address), then by node.
    backends: BTreeMap<(String, SocketAddrV4), BTreeMap<String, Entry>>,
}

impl View {
    /// An empty view of the keys under `prefix`, read by node `own`.
    pub fn new(prefix: &str, own: &str) -> Self {
        Self {
            prefix: prefix.into(),
            own: own.into(),
            backends: BTreeMap::new(),
        }
    }

    /// Forgets everything (before a full read).
    pub fn clear(&mut self) {
        self.backends.clear();
    }

    /// Takes in a key written (created at revision `created`); a key or
    /// value lb does not write is refused and changes nothing.
    pub fn put(&mut self, key: &[u8], value: &[u8], created: i64) -> Result<(), DecodeError> {
        match parse_key(&self.prefix, key)? {
            // Checked, so a foreign record is reported; nothing reads it yet.
            NodeKey::Node { .. } => {
                NodeRecord::decode(value)?;
            }
            NodeKey::Backend {
                node,
                service,
                addr,
            } => {
                let record = BackendRecord::decode(value)?;
                self.backends
                    .entry((service, addr))
                    .or_default()
                    .insert(node, Entry { record, created });
            }
        }
        Ok(())
    }

    /// Takes in a key deleted (or expired with its lease).
    pub fn delete(&mut self, key: &[u8]) {
        match parse_key(&self.prefix, key) {
            Ok(NodeKey::Backend {
                node,
                service,
                addr,
            }) => {
                let id = (service, addr);
                if let Some(by_node) = self.backends.get_mut(&id) {
                    by_node.remove(&node);
                    if by_node.is_empty() {
                        self.backends.remove(&id);
                    }
                }
            }
            // A node's record, or nothing that was taken in.
            Ok(NodeKey::Node { .. }) | Err(_) => {}
        }
    }

    /// The backends to apply here, by service, and the clashes (see the
    /// [module docs](self)).
    pub fn merge(&self) -> (RemoteSet, BTreeSet<Clash>) {
        let mut set = RemoteSet::new();
        let mut clashes = BTreeSet::new();
        for ((service, addr), by_node) in &self.backends {
            let winner = if by_node.contains_key(&self.own) {
                Some(self.own.as_str())
            } else {
                by_node
                    .iter()
                    .min_by_key(|(node, e)| (e.created, *node))
                    .map(|(node, _)| node.as_str())
            };
            let Some(winner) = winner else { continue };
            if by_node.len() > 1 {
                clashes.insert(Clash {
                    service: service.clone(),
                    addr: *addr,
                    winner: winner.into(),
                    losers: by_node.keys().filter(|n| *n != winner).cloned().collect(),
                });
            }
            if winner == self.own {
                continue;
            }
            let e = &by_node[winner];
            set.entry(service.clone()).or_default().push(RemoteBackend {
                node: winner.into(),
                spec: BackendSpec {
                    addr: *addr,
                    weight: e.record.weight,
                    drained: e.record.drained,
                    via: None,
                },
                container: e.record.container.clone(),
            });
        }
        (set, clashes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::keys::{backend_key, node_key, VERSION};

    fn record(weight: u32, drained: bool, container: Option<&str>) -> Vec<u8> {
        BackendRecord {
            version: VERSION,
            weight,
            drained,
            container: container.map(String::from),
        }
        .encode()
    }

    fn addr(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    fn put(v: &mut View, node: &str, service: &str, a: &str, value: &[u8], created: i64) {
        let key = backend_key("/lb/", node, service, addr(a));
        v.put(key.as_bytes(), value, created).unwrap();
    }

    #[test]
    fn other_nodes_backends_are_applied_and_own_are_not() {
        let mut v = View::new("/lb/", "a");
        put(
            &mut v,
            "a",
            "web",
            "198.18.142.10:80",
            &record(1, false, None),
            5,
        );
        put(
            &mut v,
            "b",
            "web",
            "198.18.142.11:80",
            &record(2, true, Some("web-1")),
            6,
        );
        put(
            &mut v,
            "c",
            "api",
            "198.18.142.12:80",
            &record(1, false, None),
            7,
        );
        v.put(
            node_key("/lb/", "b").as_bytes(),
            &NodeRecord::new(1).encode(),
            2,
        )
        .unwrap();
        let (set, clashes) = v.merge();
        assert!(clashes.is_empty());
        assert_eq!(
            set["web"],
            [RemoteBackend {
                node: "b".into(),
                spec: BackendSpec {
                    addr: addr("198.18.142.11:80"),
                    weight: 2,
                    drained: true,
                    via: None
                },
                container: Some("web-1".into()),
            }]
        );
        assert_eq!(set["api"][0].node, "c");

        // Its lease gone, b's backend leaves.
        v.delete(backend_key("/lb/", "b", "web", addr("198.18.142.11:80")).as_bytes());
        let (set, _) = v.merge();
        assert!(!set.contains_key("web"));
    }

    #[test]
    fn one_address_from_two_nodes_goes_to_the_first_publisher_and_own_wins() {
        let mut v = View::new("/lb/", "a");
        put(
            &mut v,
            "c",
            "web",
            "198.18.142.20:80",
            &record(3, false, None),
            9,
        );
        put(
            &mut v,
            "b",
            "web",
            "198.18.142.20:80",
            &record(1, false, None),
            4,
        );
        let (set, clashes) = v.merge();
        assert_eq!(set["web"].len(), 1);
        assert_eq!(set["web"][0].node, "b", "b published first");
        let clash = clashes.first().unwrap();
        assert_eq!(
            clash.to_string(),
            "backend 198.18.142.20:80 of service web is published by nodes b and c; using b's"
        );

        // The same address published here too: this node's own wins.
        put(
            &mut v,
            "a",
            "web",
            "198.18.142.20:80",
            &record(1, false, None),
            12,
        );
        let (set, clashes) = v.merge();
        assert!(!set.contains_key("web"), "{set:?}");
        assert_eq!(clashes.first().unwrap().winner, "a");

        // The first publisher goes: the next one takes over.
        v.delete(backend_key("/lb/", "a", "web", addr("198.18.142.20:80")).as_bytes());
        v.delete(backend_key("/lb/", "b", "web", addr("198.18.142.20:80")).as_bytes());
        let (set, clashes) = v.merge();
        assert_eq!(set["web"][0].node, "c");
        assert_eq!(set["web"][0].spec.weight, 3);
        assert!(clashes.is_empty());
    }

    #[test]
    fn foreign_keys_and_values_change_nothing() {
        let mut v = View::new("/lb/", "a");
        put(
            &mut v,
            "b",
            "web",
            "198.18.142.11:80",
            &record(1, false, None),
            3,
        );
        let before = v.merge();
        assert!(v
            .put(b"/lb/nodes/b/backends/web/nope", &record(1, false, None), 4)
            .is_err());
        assert!(v
            .put(
                backend_key("/lb/", "b", "web", addr("198.18.142.11:80")).as_bytes(),
                b"{\"weight\":1}",
                5
            )
            .is_err());
        v.delete(b"/lb/nodes/b/junk");
        assert_eq!(v.merge(), before);
    }
}
