//! Which backend a client's packet goes to, and which flow a backend's reply
//! belongs to: the decisions of the data path's lookup steps, apart from the
//! maps. The programs pass their map lookups in, so the host tests run the
//! same decisions on plain arrays.

use lb_common::{
    Backend, FlowKey, RevNat, ServiceKey, ServiceValue, BACKEND_ACTIVE, BACKEND_DOWN, NO_BACKEND,
    REV_NAT_MAX, SERVICE_F_DSR,
};

use crate::hash::flow_hash;

/// The [`lb_common::maps::SERVICES`] key of a client's packet: its
/// destination.
#[inline(always)]
pub fn service_key(key: &FlowKey) -> ServiceKey {
    ServiceKey {
        addr: key.dst_addr,
        port: key.dst_port,
        proto: key.proto,
        _pad: 0,
    }
}

/// The [`lb_common::maps::REV_NAT`] key of a packet that may be a backend's
/// reply: its source.
#[inline(always)]
pub fn rev_nat_key(key: &FlowKey) -> ServiceKey {
    ServiceKey {
        addr: key.src_addr,
        port: key.src_port,
        proto: key.proto,
        _pad: 0,
    }
}

/// What the flow table said about a packet's flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowState {
    /// Recorded, and its backend may keep it.
    Established,
    /// Not in the flow table.
    New,
    /// Recorded, but its backend went down or left the service: picked again.
    Rebalanced,
}

/// The outcome of [`select_backend`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Selection {
    /// The backend's id and entry; `None` when the flow needs a new backend
    /// and the service has none to give.
    pub backend: Option<(u32, Backend)>,
    /// What the flow table said.
    pub state: FlowState,
}

impl Selection {
    /// Whether the flow is to be recorded with its (new) backend.
    #[inline(always)]
    pub fn new_flow(&self) -> bool {
        self.state != FlowState::Established
    }
}

/// Whether a recorded flow stays with backend `b`: it is up (active or
/// draining) and still in the service.
#[inline(always)]
pub fn keeps_flow(b: &Backend, svc: &ServiceValue) -> bool {
    b.service_id == svc.id && b.state != BACKEND_DOWN
}

/// Whether backend `b` may take a new flow of the service: it is active and
/// in the service.
#[inline(always)]
pub fn takes_new_flow(b: &Backend, svc: &ServiceValue) -> bool {
    b.service_id == svc.id && b.state == BACKEND_ACTIVE
}

/// Whether `svc` forwards by direct server return: the packet keeps its
/// addresses and ports, only its MACs change.
#[inline(always)]
pub fn direct_return(svc: &ServiceValue) -> bool {
    svc.flags & SERVICE_F_DSR != 0
}

/// The [`lb_common::maps::MAGLEV`] slot of a new flow: its hash in the
/// service's active table; `None` for a service without one.
#[inline(always)]
pub fn maglev_slot(key: &FlowKey, svc: &ServiceValue) -> Option<u32> {
    if svc.table_size == 0 {
        return None;
    }
    Some(svc.table_base + flow_hash(key) % svc.table_size)
}

/// Picks the backend of the flow `key` to service `svc`: the `recorded`
/// backend id from the flow table while [`keeps_flow`] holds, else a fresh
/// pick from the service's Maglev table, taken only if [`takes_new_flow`].
/// `backend` and `maglev` read the backends and Maglev maps.
///
/// A packet that `opens` a connection (a TCP SYN) is a new connection even
/// when its 5-tuple is recorded: clients reuse source ports, so the entry
/// may be an old connection's. It keeps the recorded backend only if that
/// backend takes new flows, never a draining or down one (Katran re-hashes
/// every SYN for the same reason). A retransmitted SYN of a connection
/// whose backend is still active stays where its first SYN went.
#[inline(always)]
pub fn select_backend<'a>(
    key: &FlowKey,
    svc: &ServiceValue,
    recorded: Option<u32>,
    opens: bool,
    backend: impl Fn(u32) -> Option<&'a Backend>,
    maglev: impl Fn(u32) -> Option<u32>,
) -> Selection {
    let state = match recorded {
        Some(id) => match backend(id) {
            Some(b) if keeps_flow(b, svc) && (!opens || takes_new_flow(b, svc)) => {
                return Selection {
                    backend: Some((id, *b)),
                    state: FlowState::Established,
                }
            }
            _ => FlowState::Rebalanced,
        },
        None => FlowState::New,
    };
    let picked = match maglev_slot(key, svc).and_then(maglev) {
        Some(id) if id != NO_BACKEND => match backend(id) {
            Some(b) if takes_new_flow(b, svc) => Some((id, *b)),
            _ => None,
        },
        _ => None,
    };
    Selection {
        backend: picked,
        state,
    }
}

/// The flow key the client used, rebuilt from a backend's `reply` and
/// service `i` of the backend's [`RevNat`] entry: the client's address and
/// port, to that service's VIP and port. `None` past the entry's valid
/// services.
#[inline(always)]
pub fn reply_flow_key(reply: &FlowKey, rev: &RevNat, i: usize) -> Option<FlowKey> {
    if i >= REV_NAT_MAX || i as u32 >= rev.count {
        return None;
    }
    Some(FlowKey {
        src_addr: reply.dst_addr,
        dst_addr: *rev.vip.get(i)?,
        src_port: reply.dst_port,
        dst_port: *rev.vport.get(i)?,
        proto: reply.proto,
        _pad1: 0,
        _pad2: 0,
    })
}

/// The client's flow key of a packet `reply` sent by a service's address
/// itself (a direct-server-return backend answering from the VIP): the
/// same 5-tuple, the other way round.
#[inline(always)]
pub fn client_key_of(reply: &FlowKey) -> FlowKey {
    FlowKey {
        src_addr: reply.dst_addr,
        dst_addr: reply.src_addr,
        src_port: reply.dst_port,
        dst_port: reply.src_port,
        proto: reply.proto,
        _pad1: 0,
        _pad2: 0,
    }
}

/// Whether `reply` comes from backend `b`: a flow found by
/// [`reply_flow_key`] is only the reply's while it is still given to the
/// very backend that sent it.
#[inline(always)]
pub fn is_reply_from(b: &Backend, reply: &FlowKey) -> bool {
    b.addr == reply.src_addr && b.port == reply.src_port
}

/// The client's flow key of a backend's `reply` that no flow entry holds,
/// found without state, so a reply restores its VIP on whichever balancer
/// node it reaches (replies may come back through another node than the
/// one that forwarded the request: an ECMP or anycast gateway, or a node
/// that died). Service `i` of `rev` is the reply's when
///
/// - it is the backend's only service (`rev.count == 1`): a reply from that
///   address and port can belong to nothing else; or
/// - the client's flow to it, hashed through the service's Maglev table,
///   names this very backend: every node builds the same table, so this is
///   the backend any node picked for that flow while the backend set was
///   unchanged.
///
/// `service`, `backend` and `maglev` read the services, backends and
/// Maglev maps. `None` when no service claims the reply.
#[inline(always)]
pub fn stateless_reply_key<'a>(
    reply: &FlowKey,
    rev: &RevNat,
    service: impl Fn(&ServiceKey) -> Option<&'a ServiceValue>,
    backend: impl Fn(u32) -> Option<&'a Backend>,
    maglev: impl Fn(u32) -> Option<u32>,
) -> Option<FlowKey> {
    let only = rev.count == 1;
    for i in 0..REV_NAT_MAX {
        let key = reply_flow_key(reply, rev, i)?;
        let Some(svc) = service(&service_key(&key)) else {
            continue;
        };
        if only {
            return Some(key);
        }
        let named = maglev_slot(&key, svc)
            .and_then(&maglev)
            .filter(|&id| id != NO_BACKEND)
            .and_then(&backend)
            .is_some_and(|b| b.service_id == svc.id && is_reply_from(b, reply));
        if named {
            return Some(key);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use lb_common::{BACKEND_DRAINING, IPPROTO_TCP};

    use super::*;

    const SVC: ServiceValue = ServiceValue {
        id: 3,
        table_base: 100,
        table_size: 7,
        flags: 0,
    };

    fn be(last: u8, service_id: u32, state: u32) -> Backend {
        Backend {
            addr: u32::from_ne_bytes([198, 18, 103, last]),
            port: 8080u16.to_be(),
            service_id,
            state,
            ..Backend::default()
        }
    }

    fn key(src_port: u16) -> FlowKey {
        FlowKey {
            src_addr: u32::from_ne_bytes([198, 18, 100, 2]),
            dst_addr: u32::from_ne_bytes([198, 18, 101, 1]),
            src_port: src_port.to_be(),
            dst_port: 80u16.to_be(),
            proto: IPPROTO_TCP,
            _pad1: 0,
            _pad2: 0,
        }
    }

    /// Backend 198.18.103.1:8080's reply to the client of [`key`]`(40000)`.
    fn reply_to_client() -> FlowKey {
        FlowKey {
            src_addr: u32::from_ne_bytes([198, 18, 103, 1]),
            dst_addr: u32::from_ne_bytes([198, 18, 100, 2]),
            src_port: 8080u16.to_be(),
            dst_port: 40000u16.to_be(),
            proto: IPPROTO_TCP,
            _pad1: 0,
            _pad2: 0,
        }
    }

    /// Runs [`select_backend`] on `backends` (by id) and a Maglev table of
    /// the service whose every slot holds `slot`.
    fn select(backends: &[Backend], recorded: Option<u32>, slot: u32) -> Selection {
        select_opening(backends, recorded, slot, false)
    }

    /// [`select`] of a packet that does or does not open a connection.
    fn select_opening(
        backends: &[Backend],
        recorded: Option<u32>,
        slot: u32,
        opens: bool,
    ) -> Selection {
        select_backend(
            &key(40000),
            &SVC,
            recorded,
            opens,
            |id| backends.get(id as usize),
            |s| {
                (SVC.table_base..SVC.table_base + SVC.table_size)
                    .contains(&s)
                    .then_some(slot)
            },
        )
    }

    #[test]
    fn keys_are_the_destination_and_the_source() {
        let k = key(40000);
        assert_eq!(
            service_key(&k),
            ServiceKey::new([198, 18, 101, 1], 80, IPPROTO_TCP)
        );
        assert_eq!(
            rev_nat_key(&k),
            ServiceKey::new([198, 18, 100, 2], 40000, IPPROTO_TCP)
        );
    }

    #[test]
    fn a_recorded_flow_stays_while_its_backend_is_up() {
        for state in [BACKEND_ACTIVE, BACKEND_DRAINING] {
            let backends = [be(1, 3, state), be(2, 3, BACKEND_ACTIVE)];
            let s = select(&backends, Some(0), 1);
            assert_eq!(s.state, FlowState::Established, "state {state}");
            assert_eq!(s.backend, Some((0, backends[0])));
            assert!(!s.new_flow());
        }
    }

    #[test]
    fn a_flow_moves_when_its_backend_is_down_gone_or_in_another_service() {
        for stale in [be(1, 3, BACKEND_DOWN), be(1, 4, BACKEND_ACTIVE)] {
            let backends = [stale, be(2, 3, BACKEND_ACTIVE)];
            let s = select(&backends, Some(0), 1);
            assert_eq!(s.state, FlowState::Rebalanced);
            assert_eq!(s.backend, Some((1, backends[1])));
            assert!(s.new_flow());
        }
        // A recorded id past the backends array.
        let backends = [be(2, 3, BACKEND_ACTIVE)];
        let s = select(&backends, Some(9), 0);
        assert_eq!(s.state, FlowState::Rebalanced);
        assert_eq!(s.backend, Some((0, backends[0])));
    }

    #[test]
    fn a_syn_on_a_recorded_flow_goes_only_to_a_backend_that_takes_new_flows() {
        // The recorded backend drains: the rest of the old connection stays,
        // a SYN reusing its ports is balanced afresh.
        let backends = [be(1, 3, BACKEND_DRAINING), be(2, 3, BACKEND_ACTIVE)];
        let rest = select_opening(&backends, Some(0), 1, false);
        assert_eq!(
            (rest.state, rest.backend),
            (FlowState::Established, Some((0, backends[0])))
        );
        let syn = select_opening(&backends, Some(0), 1, true);
        assert_eq!(
            (syn.state, syn.backend),
            (FlowState::Rebalanced, Some((1, backends[1])))
        );
        assert!(syn.new_flow(), "the new connection is recorded");
        // An active recorded backend keeps a (retransmitted) SYN, whatever
        // the table says now.
        let backends = [be(1, 3, BACKEND_ACTIVE), be(2, 3, BACKEND_ACTIVE)];
        let syn = select_opening(&backends, Some(0), 1, true);
        assert_eq!(
            (syn.state, syn.backend),
            (FlowState::Established, Some((0, backends[0])))
        );
    }

    #[test]
    fn a_new_flow_takes_only_an_active_backend_of_the_service() {
        let backends = [
            be(1, 3, BACKEND_ACTIVE),
            be(2, 3, BACKEND_DRAINING),
            be(3, 3, BACKEND_DOWN),
            be(4, 4, BACKEND_ACTIVE),
        ];
        let s = select(&backends, None, 0);
        assert_eq!(s.state, FlowState::New);
        assert_eq!(s.backend, Some((0, backends[0])));
        for slot in [1, 2, 3, 4, NO_BACKEND] {
            let s = select(&backends, None, slot);
            assert_eq!(s.backend, None, "slot holds {slot}");
            assert_eq!(s.state, FlowState::New);
        }
        // A stale flow with nowhere to go is still a rebalance.
        let s = select(&backends, Some(2), NO_BACKEND);
        assert_eq!((s.backend, s.state), (None, FlowState::Rebalanced));
    }

    #[test]
    fn a_reply_from_the_vip_names_its_clients_flow() {
        let client = key(40000);
        let reply = FlowKey {
            src_addr: client.dst_addr,
            dst_addr: client.src_addr,
            src_port: client.dst_port,
            dst_port: client.src_port,
            proto: client.proto,
            _pad1: 0,
            _pad2: 0,
        };
        assert_eq!(client_key_of(&reply), client);
        assert_eq!(client_key_of(&client_key_of(&reply)), reply);
    }

    #[test]
    fn only_the_dsr_flag_means_direct_return() {
        assert!(!direct_return(&SVC));
        assert!(direct_return(&ServiceValue {
            flags: SERVICE_F_DSR,
            ..SVC
        }));
        assert!(!direct_return(&ServiceValue { flags: 2, ..SVC }));
    }

    #[test]
    fn maglev_slots_stay_in_the_active_table() {
        let empty = ServiceValue {
            table_size: 0,
            ..SVC
        };
        assert_eq!(maglev_slot(&key(1), &empty), None);
        for p in 0..1000 {
            let slot = maglev_slot(&key(p), &SVC).unwrap();
            assert!((SVC.table_base..SVC.table_base + SVC.table_size).contains(&slot));
            assert_eq!(slot, SVC.table_base + flow_hash(&key(p)) % SVC.table_size);
        }
    }

    #[test]
    fn reply_keys_are_the_clients_flow_to_each_service() {
        let vip = |last| u32::from_ne_bytes([198, 18, 101, last]);
        let rev = RevNat {
            vip: [vip(1), vip(2), vip(3), vip(4)],
            vport: [80u16.to_be(), 81u16.to_be(), 82u16.to_be(), 83u16.to_be()],
            count: 2,
        };
        let reply = reply_to_client();
        assert_eq!(reply_flow_key(&reply, &rev, 0), Some(key(40000)));
        let second = reply_flow_key(&reply, &rev, 1).unwrap();
        assert_eq!(
            (second.dst_addr, u16::from_be(second.dst_port)),
            (vip(2), 81)
        );
        assert_eq!(reply_flow_key(&reply, &rev, 2), None, "past count");
        let full = RevNat { count: 9, ..rev };
        assert!(reply_flow_key(&reply, &full, 3).is_some());
        assert_eq!(reply_flow_key(&reply, &full, REV_NAT_MAX), None);

        assert!(is_reply_from(&be(1, 3, BACKEND_ACTIVE), &reply));
        assert!(!is_reply_from(&be(2, 3, BACKEND_ACTIVE), &reply));
        let other_port = Backend {
            port: 8081u16.to_be(),
            ..be(1, 3, BACKEND_ACTIVE)
        };
        assert!(!is_reply_from(&other_port, &reply));
    }

    #[test]
    fn a_reply_without_a_flow_is_claimed_by_the_service_whose_table_names_its_backend() {
        let vip = |last| u32::from_ne_bytes([198, 18, 101, last]);
        // Service 3 is VIP .1:80 (the client's key(40000)), service 4 is .2:81.
        let other = ServiceValue { id: 4, ..SVC };
        let services = [
            (ServiceKey::new([198, 18, 101, 1], 80, IPPROTO_TCP), SVC),
            (ServiceKey::new([198, 18, 101, 2], 81, IPPROTO_TCP), other),
        ];
        let service = |k: &ServiceKey| services.iter().find(|(sk, _)| sk == k).map(|(_, v)| v);
        // Backend 0 is the reply's sender, 198.18.103.1:8080, in service 3;
        // backend 1 is another one of service 3; backend 2 is the sender's
        // entry in service 4.
        let backends = [
            be(1, 3, BACKEND_ACTIVE),
            be(2, 3, BACKEND_ACTIVE),
            be(1, 4, BACKEND_ACTIVE),
        ];
        let reply = reply_to_client();
        let both = RevNat {
            vip: [vip(1), vip(2), 0, 0],
            vport: [80u16.to_be(), 81u16.to_be(), 0, 0],
            count: 2,
        };
        // Every slot of every table holds `slots[service id - 3]`.
        let run = |rev: &RevNat, slots: [u32; 2]| {
            stateless_reply_key(
                &reply,
                rev,
                service,
                |id| backends.get(id as usize),
                |s| {
                    let table = s.checked_sub(SVC.table_base)?;
                    (table < SVC.table_size).then_some(slots[0])
                },
            )
            .map(|k| (k.dst_addr, u16::from_be(k.dst_port)))
        };
        // Both services share one table range here, so both name slots[0].
        assert_eq!(run(&both, [0, 0]), Some((vip(1), 80)), "names the sender");
        assert_eq!(run(&both, [1, 1]), None, "names another backend");
        assert_eq!(run(&both, [NO_BACKEND, 0]), None, "an empty slot");
        assert_eq!(
            run(&both, [2, 2]),
            Some((vip(2), 81)),
            "the sender in service 4"
        );

        // The backend's only service claims every reply from it, whatever
        // the table says (it may have changed since the flow began).
        let only = RevNat { count: 1, ..both };
        assert_eq!(run(&only, [1, 1]), Some((vip(1), 80)));
        // Unless that service is gone.
        let gone = RevNat {
            vip: [vip(9), 0, 0, 0],
            ..only
        };
        assert_eq!(run(&gone, [0, 0]), None);
        let none = RevNat { count: 0, ..both };
        assert_eq!(run(&none, [0, 0]), None);
    }
}
