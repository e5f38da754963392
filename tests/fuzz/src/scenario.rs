//! The maps the fuzzer runs over, and what it knows of them: services of
//! every kind the forward path tells apart (XDP-deliverable, skb-only with
//! and without MACs, no backend to take a flow, an empty table), two VIP
//! addresses, a backend address:port that serves two services (so a reply
//! is told apart by its flow), and a model of the flows the data path has
//! recorded, built from the packets it was seen to forward.

use std::collections::{HashMap, VecDeque};

use lb_common::{
    vip_filter_bit, FlowKey, BACKEND_ACTIVE, BACKEND_DOWN, BACKEND_DRAINING, BACKEND_F_MAC,
    BACKEND_F_PEER, BACKEND_F_XDP,
};
use lb_ebpf::hash::flow_hash;
use lb_harness::packets::{rig_table, Rig, BACKENDS, BACKEND_MACS, HOST_MAC, TABLE, VIP};

use crate::wire::{TCP, UDP};

/// The second VIP address.
pub const VIP_B: [u8; 4] = [198, 18, 101, 2];
/// Flow table entries: far fewer than a full run's flows, so the LRU
/// evicts, as a busy balancer's does.
pub const FLOW_TABLE: u32 = 1 << 16;

/// One backend entry of the scenario.
#[derive(Clone, Copy, Debug)]
pub struct BackendDef {
    /// Backend id (index in the backends map).
    pub id: u32,
    /// Fixture backend (address and MAC) it is.
    pub fixture: usize,
    /// Port.
    pub port: u16,
    /// `BACKEND_F_*`.
    pub flags: u32,
    /// `BACKEND_*` state.
    pub state: u32,
    /// Service id.
    pub service: u32,
}

impl BackendDef {
    /// Its address.
    pub fn addr(&self) -> [u8; 4] {
        BACKENDS[self.fixture]
    }

    /// The MACs a forwarded frame gets: (destination, source).
    pub fn macs(&self) -> ([u8; 6], [u8; 6]) {
        (BACKEND_MACS[self.fixture], HOST_MAC)
    }
}

/// One service of the scenario.
#[derive(Clone, Copy, Debug)]
pub struct ServiceDef {
    /// Service id.
    pub sid: u32,
    /// VIP address.
    pub vip: [u8; 4],
    /// VIP port.
    pub port: u16,
    /// [`TCP`] or [`UDP`].
    pub proto: u8,
    /// Backend ids in its table.
    pub members: &'static [u32],
}

/// How the forward path treats a service's packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// XDP rewrites and redirects them.
    Xdp,
    /// XDP passes them to the skb path, where TC rewrites and redirects.
    Skb,
    /// No backend takes a new flow: both programs drop them.
    NoBackend,
}

const XM: u32 = BACKEND_F_XDP | BACKEND_F_MAC;

const fn be(
    id: u32,
    fixture: usize,
    port: u16,
    flags: u32,
    state: u32,
    service: u32,
) -> BackendDef {
    BackendDef {
        id,
        fixture,
        port,
        flags,
        state,
        service,
    }
}

/// Every backend, by id.
pub const BACKEND_DEFS: [BackendDef; 10] = [
    be(0, 0, 8080, XM, BACKEND_ACTIVE, 0),
    be(1, 1, 8080, XM, BACKEND_ACTIVE, 0),
    be(2, 2, 8080, XM, BACKEND_ACTIVE, 0),
    be(
        3,
        0,
        9053,
        BACKEND_F_MAC | BACKEND_F_PEER,
        BACKEND_ACTIVE,
        1,
    ),
    be(
        4,
        1,
        9053,
        BACKEND_F_MAC | BACKEND_F_PEER,
        BACKEND_ACTIVE,
        1,
    ),
    be(5, 2, 8443, 0, BACKEND_ACTIVE, 2),
    be(6, 0, 7000, XM, BACKEND_DRAINING, 3),
    be(7, 1, 7000, XM, BACKEND_DOWN, 3),
    be(8, 2, 5000, XM, BACKEND_ACTIVE, 4),
    // The address and port of backend 0, in another service.
    be(9, 0, 8080, BACKEND_F_MAC, BACKEND_ACTIVE, 5),
];

/// Every service, by id.
pub const SERVICE_DEFS: [ServiceDef; 7] = [
    ServiceDef {
        sid: 0,
        vip: VIP,
        port: 80,
        proto: TCP,
        members: &[0, 1, 2],
    },
    ServiceDef {
        sid: 1,
        vip: VIP,
        port: 53,
        proto: UDP,
        members: &[3, 4],
    },
    ServiceDef {
        sid: 2,
        vip: VIP,
        port: 443,
        proto: TCP,
        members: &[5],
    },
    ServiceDef {
        sid: 3,
        vip: VIP,
        port: 8443,
        proto: TCP,
        members: &[6, 7],
    },
    ServiceDef {
        sid: 4,
        vip: VIP_B,
        port: 5000,
        proto: UDP,
        members: &[8],
    },
    ServiceDef {
        sid: 5,
        vip: VIP_B,
        port: 80,
        proto: TCP,
        members: &[9],
    },
    ServiceDef {
        sid: 6,
        vip: VIP_B,
        port: 81,
        proto: TCP,
        members: &[],
    },
];

/// Loads the data path and writes the scenario's backends and services
/// into its maps.
pub fn load() -> Rig {
    let mut rig = Rig::new(FLOW_TABLE);
    for b in &BACKEND_DEFS {
        rig.backend(b.id, b.service, b.fixture, b.port, b.flags, b.state);
    }
    for s in &SERVICE_DEFS {
        rig.service_at(s.sid, s.vip, s.port, s.proto, s.members);
    }
    rig
}

/// The backend of id `id`.
pub fn backend(id: u32) -> &'static BackendDef {
    &BACKEND_DEFS[id as usize]
}

/// The service at `vip`:`port`/`proto`.
pub fn service(vip: [u8; 4], port: u16, proto: u8) -> Option<&'static ServiceDef> {
    SERVICE_DEFS
        .iter()
        .find(|s| s.vip == vip && s.port == port && s.proto == proto)
}

/// How the forward path treats `s`'s packets. Every active member of a
/// service has the same flags, so the kind does not depend on the pick.
pub fn kind(s: &ServiceDef) -> Kind {
    let active: Vec<&BackendDef> = s
        .members
        .iter()
        .map(|&id| backend(id))
        .filter(|b| b.state == BACKEND_ACTIVE)
        .collect();
    if active.is_empty() {
        return Kind::NoBackend;
    }
    let xdp = |b: &&BackendDef| b.flags & XM == XM;
    assert!(
        active.iter().all(xdp) || !active.iter().any(xdp),
        "service {} mixes XDP and skb backends",
        s.sid
    );
    if active.iter().all(xdp) {
        Kind::Xdp
    } else {
        Kind::Skb
    }
}

/// The services whose backends listen on `addr`:`port`/`proto`, in the
/// order their reverse entry lists them (the order they were written).
pub fn served_by(
    addr: [u8; 4],
    port: u16,
    proto: u8,
) -> Vec<(&'static ServiceDef, &'static BackendDef)> {
    SERVICE_DEFS
        .iter()
        .filter(|s| s.proto == proto)
        .filter_map(|s| {
            s.members
                .iter()
                .map(|&id| backend(id))
                .find(|b| b.addr() == addr && b.port == port)
                .map(|b| (s, b))
        })
        .collect()
}

/// Whether a reply from `src`:`sport` to `dst`:`dport` (`proto`), found in
/// no flow entry, is still claimed by a service of its backend (see
/// `lb_ebpf::flow::stateless_reply_key`, modelled here on its own): it is
/// the backend's only service, or the client's flow to one of them hashes,
/// through that service's table, to this very backend.
pub fn claimed_without_flow(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, proto: u8) -> bool {
    let served = served_by(src, sport, proto);
    if served.len() == 1 {
        return true;
    }
    served.iter().any(|(s, b)| {
        let key = FlowKey {
            src_addr: u32::from_ne_bytes(dst),
            dst_addr: u32::from_ne_bytes(s.vip),
            src_port: dport.to_be(),
            dst_port: s.port.to_be(),
            proto,
            _pad1: 0,
            _pad2: 0,
        };
        let slot = flow_hash(&key) % TABLE;
        rig_table(s.members)[slot as usize] == b.id
    })
}

/// Whether the early filter lets a packet to `dst` through: its bit is
/// one of the VIPs' bits.
pub fn maybe_vip(dst: [u8; 4]) -> bool {
    let bit = vip_filter_bit(u32::from_ne_bytes(dst));
    [VIP, VIP_B]
        .iter()
        .any(|v| vip_filter_bit(u32::from_ne_bytes(*v)) == bit)
}

/// A client-side 5-tuple: source, destination, ports, protocol.
pub type Key = ([u8; 4], [u8; 4], u16, u16, u8);

/// What the model knows of one flow.
#[derive(Clone, Debug)]
pub struct FlowRecord {
    /// The backend it was forwarded to.
    pub backend: u32,
    /// The (destination, source) MACs of the frames that may have recorded
    /// it (the first, and any after an eviction), at most a few.
    pub macs: Vec<([u8; 6], [u8; 6])>,
    /// The frame that first opened it, to replay a failure with its flow.
    pub frame: Vec<u8>,
}

/// Most MAC pairs kept per flow.
const MACS_PER_FLOW: usize = 8;
/// Flows remembered for replies to be built to.
const RECENT: usize = 512;

/// The flows the data path may hold: every flow it was seen to forward.
/// It may have evicted some of them since, never held others.
#[derive(Default)]
pub struct Model {
    flows: HashMap<Key, FlowRecord>,
    recent: VecDeque<Key>,
}

impl Model {
    /// The flow of `key`, if it was ever forwarded.
    pub fn flow(&self, key: &Key) -> Option<&FlowRecord> {
        self.flows.get(key)
    }

    /// Notes that `frame`, of flow `key`, was forwarded to `backend`.
    pub fn forwarded(&mut self, key: Key, backend: u32, frame: &[u8]) {
        let macs = (
            frame[0..6].try_into().expect("6 bytes"),
            frame[6..12].try_into().expect("6 bytes"),
        );
        match self.flows.get_mut(&key) {
            Some(f) => {
                if !f.macs.contains(&macs) && f.macs.len() < MACS_PER_FLOW {
                    f.macs.push(macs);
                }
            }
            None => {
                self.flows.insert(
                    key,
                    FlowRecord {
                        backend,
                        macs: vec![macs],
                        frame: frame.to_vec(),
                    },
                );
                if self.recent.len() == RECENT {
                    self.recent.pop_front();
                }
                self.recent.push_back(key);
            }
        }
    }

    /// A recently opened flow, picked by `pick` (an index below `len`).
    pub fn recent(&self, pick: impl FnOnce(usize) -> usize) -> Option<(Key, &FlowRecord)> {
        if self.recent.is_empty() {
            return None;
        }
        let key = self.recent[pick(self.recent.len())];
        self.flows.get(&key).map(|f| (key, f))
    }
}
