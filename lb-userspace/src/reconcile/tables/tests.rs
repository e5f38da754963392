//! The plan, against the in-memory store: unit tests of ids and keys, and
//! a property test of the write order.

use super::*;

#[test]
fn ids_are_reused_as_late_as_possible() {
    let now = Instant::now();
    let mut ids = Ids::new(3);
    assert_eq!(ids.alloc(now), Some(0));
    assert_eq!(ids.alloc(now), Some(1));
    ids.free(0, now);
    assert_eq!(ids.alloc(now), Some(2));
    // Only 0 is left, still cooling: taken anyway rather than refusing.
    assert_eq!(ids.alloc(now), Some(0));
    assert_eq!(ids.alloc(now), None);
}

#[test]
fn a_freed_id_cools_down_before_reuse() {
    let now = Instant::now();
    let mut ids = Ids::new(4);
    assert_eq!(ids.alloc(now), Some(0));
    ids.free(0, now);
    // 1, 2, 3 are free; 0 is cooling and wrapping round does not reach it.
    assert_eq!(ids.alloc(now), Some(1));
    ids.free(1, now);
    assert_eq!(ids.alloc(now), Some(2));
    assert_eq!(ids.alloc(now), Some(3));
    // Every free id cooling: the one that cooled longest.
    assert_eq!(ids.alloc(now + Duration::from_secs(1)), Some(0));
    // After the cool-down, an id is free again.
    ids.free(2, now);
    assert_eq!(ids.alloc(now + ID_COOL_DOWN), Some(1));
}

#[test]
fn maglev_keys_differ_by_port_and_address() {
    let a: SocketAddrV4 = "198.18.103.2:8080".parse().unwrap();
    let b: SocketAddrV4 = "198.18.103.2:8081".parse().unwrap();
    let c: SocketAddrV4 = "198.18.103.3:8080".parse().unwrap();
    assert_ne!(maglev_key(a), maglev_key(b));
    assert_ne!(maglev_key(a), maglev_key(c));
}

mod write_order {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::{
        model::Origin,
        reconcile::store::{self, MemStore},
    };

    const SIZES: MapSizes = MapSizes {
        max_services: 4,
        max_backends: 256,
        max_table_size: 13,
        flow_table_size: 1024,
    };

    fn delivery(ifindex: u32) -> Delivery {
        Delivery {
            ifindex,
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: Some([2, 0, 0, 0, 0, 2]),
            flags: BACKEND_F_MAC,
            reply_ifindex: ifindex,
        }
    }

    /// One backend in one desired state: (pool index, weight, drained,
    /// reachable).
    type BackendPick = (u8, u32, bool, bool);
    /// One service: (VIP choice, backends), or absent.
    type ServicePick = Option<(bool, Vec<BackendPick>)>;

    fn addr(i: u8) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 1 + i), 80)
    }

    /// The desired services of one step, and which backends are reachable.
    fn desired(step: &[ServicePick]) -> (Vec<ServiceSpec>, BTreeMap<(String, SocketAddrV4), bool>) {
        let mut reach = BTreeMap::new();
        let mut out = Vec::new();
        for (s, pick) in step.iter().enumerate() {
            let Some((other_vip, backends)) = pick else {
                continue;
            };
            let name = format!("svc{s}");
            let vip = SocketAddrV4::new(
                Ipv4Addr::new(198, 19, 0, 1 + s as u8 + if *other_vip { 10 } else { 0 }),
                80,
            );
            let mut specs: Vec<BackendSpec> = Vec::new();
            for &(i, weight, drained, reachable) in backends {
                if specs.iter().any(|b| b.addr == addr(i)) {
                    continue;
                }
                specs.push(BackendSpec {
                    addr: addr(i),
                    weight,
                    drained,
                    via: None,
                });
                reach.insert((name.clone(), addr(i)), reachable);
            }
            out.push(ServiceSpec {
                name,
                vip,
                protocol: Protocol::Tcp,
                table_size: if s % 2 == 0 { 13 } else { 7 },
                origin: Origin::Api,
                health: None,
                image: None,
                // Service 1 switches between NAT and direct server return
                // as its backend count changes parity: the mode changes
                // under the same VIP.
                forwarding: if s == 1 && specs.len() % 2 == 1 {
                    Forwarding::Dsr
                } else {
                    Forwarding::Nat
                },
                backends: specs,
            });
        }
        (out, reach)
    }

    fn service_pick() -> impl Strategy<Value = ServicePick> {
        proptest::option::of((
            any::<bool>(),
            proptest::collection::vec(
                (
                    0u8..6,
                    1u32..4,
                    proptest::bool::weighted(0.2),
                    proptest::bool::weighted(0.85),
                ),
                0..6,
            ),
        ))
    }

    /// Applies one step to the tables and the store; returns the plan.
    fn step(
        tables: &mut Tables,
        store: &mut MemStore,
        services: &[ServiceSpec],
        reach: &BTreeMap<(String, SocketAddrV4), bool>,
        now: Instant,
    ) -> Vec<MapOp> {
        let resolved: Resolved = tables
            .to_resolve(services)
            .into_iter()
            .map(|w| {
                let ok = reach
                    .get(&(w.service.clone(), w.addr))
                    .copied()
                    .unwrap_or(true);
                ((w.service, w.addr), ok.then(|| delivery(7)))
            })
            .collect();
        // As the daemon does: only the services that changed are planned.
        let gone: Vec<String> = (tables.services.keys())
            .filter(|n| !services.iter().any(|s| &s.name == *n))
            .cloned()
            .collect();
        let changes: Vec<(&str, Option<&ServiceSpec>)> = (gone.iter())
            .map(|n| (n.as_str(), None))
            .chain(
                services
                    .iter()
                    .filter(|s| tables.services.get(&s.name).is_none_or(|st| st.spec != **s))
                    .map(|s| (s.name.as_str(), Some(s))),
            )
            .collect();
        let mut ops = Vec::new();
        tables
            .plan_changes(&changes, &resolved, now, &mut ops)
            .expect("within the limits");
        store::apply(store, &ops).expect("the memory store takes everything");
        ops
    }

    /// After a step: the maps hold exactly the desired state.
    fn check_end_state(tables: &Tables, store: &MemStore, services: &[ServiceSpec]) {
        assert_eq!(store.services.len(), services.len(), "service entries");
        for spec in services {
            let st = &tables.services[&spec.name];
            let key = service_key(spec);
            let entry = store.services.get(&key).expect("service entry");
            assert_eq!(entry.id, st.id);
            assert_eq!(entry.flags, service_flags(spec), "{} flags", spec.name);
            // Replies of a NAT service are recognised; a DSR service's never
            // come back, so its VIP is in no reverse entry.
            let reverse_names_vip = store.rev_nat.values().any(|r| {
                (0..r.count as usize).any(|i| r.vip[i] == key.addr && r.vport[i] == key.port)
            });
            assert_eq!(
                reverse_names_vip,
                spec.forwarding == Forwarding::Nat && !spec.backends.is_empty(),
                "{}: reverse entries",
                spec.name
            );
            let in_table: BTreeSet<u32> = (0..entry.table_size)
                .map(|i| store.slots[(entry.table_base + i) as usize])
                .filter(|id| *id != NO_BACKEND)
                .collect();
            let active: BTreeSet<u32> = st
                .backends
                .values()
                .filter(|m| m.state() == BACKEND_ACTIVE)
                .map(|m| m.id)
                .collect();
            // Every slot names an active member (a light backend may get no
            // slot of a small table), and a service with members has a table.
            assert!(
                in_table.is_subset(&active),
                "{}: {in_table:?} in the table, {active:?} active",
                spec.name
            );
            assert_eq!(in_table.is_empty(), active.is_empty(), "{}", spec.name);
            for (a, m) in &st.backends {
                let b = store.backends[&m.id];
                assert_eq!(b.state, m.state(), "{} {a}", spec.name);
                assert_eq!(b.addr, u32::from_ne_bytes(a.ip().octets()));
            }
        }
        // A removed backend is down.
        let live: BTreeSet<u32> = tables
            .services
            .values()
            .flat_map(|s| s.backends.values().map(|m| m.id))
            .collect();
        for (id, b) in &store.backends {
            if !live.contains(id) {
                assert_eq!(b.state, BACKEND_DOWN, "removed backend {id}");
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// For random sequences of desired states (services and backends
        /// added, removed, drained, reweighted, unreachable, failing
        /// health checks, VIPs moved), every intermediate state of the
        /// maps is one a packet can meet safely, and the end of every step
        /// is exactly the desired state.
        #[test]
        fn every_intermediate_state_is_consistent(
            steps in proptest::collection::vec(proptest::collection::vec(service_pick(), 3), 1..8),
            health in proptest::collection::vec((0usize..3, 0u8..6, any::<bool>()), 0..8),
        ) {
            let now = Instant::now();
            let mut tables = Tables::new(SIZES);
            let mut store = MemStore::new(SIZES.maglev_slots());
            let mut owner: BTreeMap<u32, (String, SocketAddrV4)> = BTreeMap::new();
            for (k, picks) in steps.iter().enumerate() {
                let (services, reach) = desired(picks);
                step(&mut tables, &mut store, &services, &reach, now);
                if let Some(&(s, i, healthy)) = health.get(k) {
                    let mut ops = Vec::new();
                    tables.set_health(&format!("svc{s}"), addr(i), healthy, &mut ops).unwrap();
                    store::apply(&mut store, &ops).unwrap();
                }
                prop_assert!(store.broken.is_none(), "step {k}: {}", store.broken.as_deref().unwrap_or(""));
                check_end_state(&tables, &store, &services);
                // No id changes hands while time stands still: a flow that
                // still names it cannot follow it to another backend.
                for (name, st) in &tables.services {
                    for (a, m) in &st.backends {
                        let who = (name.clone(), *a);
                        let before = owner.entry(m.id).or_insert_with(|| who.clone());
                        prop_assert_eq!(&*before, &who, "backend id {} reused", m.id);
                    }
                }
            }
        }
    }

    #[test]
    fn a_new_backend_is_written_before_the_flip_that_uses_it() {
        let mut tables = Tables::new(SIZES);
        let mut store = MemStore::new(SIZES.maglev_slots());
        let (services, reach) = desired(&[Some((false, vec![(0, 1, false, true)]))]);
        let ops = step(&mut tables, &mut store, &services, &reach, Instant::now());
        let mut kinds: Vec<&str> = ops
            .iter()
            .map(|op| match op {
                MapOp::VipFilter { .. } => "vip_filter",
                MapOp::RevNat { .. } => "rev_nat",
                MapOp::Backend { .. } => "backend",
                MapOp::ZeroCounters(_) => "zero_counters",
                MapOp::Slots(_) => "slots",
                MapOp::Service { .. } => "service",
                MapOp::RemoveService(_) => "remove_service",
                MapOp::RemoveRevNat(_) => "remove_rev_nat",
            })
            .collect();
        // The first write of the filter writes every word.
        kinds.dedup();
        assert_eq!(
            kinds,
            [
                "vip_filter",
                "rev_nat",
                "zero_counters",
                "backend",
                "slots",
                "service"
            ]
        );
        assert!(store.broken.is_none(), "{:?}", store.broken);
    }

    #[test]
    fn another_process_at_a_backends_address_is_a_new_backend_with_zero_counters() {
        let mut tables = Tables::new(SIZES);
        let mut store = MemStore::new(SIZES.maglev_slots());
        let (mut services, reach) = desired(&[Some((
            false,
            vec![(0, 1, false, true), (1, 1, false, true)],
        ))]);
        let via = |pid| {
            Some(Via {
                pid,
                mac: [2, 0, 0, 0, 0, 9],
            })
        };
        services[0].backends[0].via = via(100);
        let now = Instant::now();
        step(&mut tables, &mut store, &services, &reach, now);
        let id = |t: &Tables, i: u8| t.services["svc0"].backends[&addr(i)].id;
        let (old, other) = (id(&tables, 0), id(&tables, 1));
        assert_eq!(store.zeroed, [old, other]);
        store.zeroed.clear();

        // The container died and another took its address in one batch.
        services[0].backends[0].via = via(200);
        step(&mut tables, &mut store, &services, &reach, now);
        let new = id(&tables, 0);
        assert_ne!(new, old, "the new container got the dead one's id");
        assert_eq!(id(&tables, 1), other, "the other backend kept its id");
        assert_eq!(store.zeroed, [new], "only the new id is zeroed");
        assert_eq!(store.backends[&old].state, BACKEND_DOWN);
        assert_eq!(store.backends[&new].state, BACKEND_ACTIVE);
        assert!(store.broken.is_none(), "{:?}", store.broken);
        // Its replies are still recognised: the address is still a backend.
        assert_eq!(store.rev_nat.len(), 2);
        check_end_state(&tables, &store, &services);

        // The same process with another interface keeps its backend.
        services[0].backends[0].via = Some(Via {
            pid: 200,
            mac: [2, 0, 0, 0, 0, 8],
        });
        store.zeroed.clear();
        step(&mut tables, &mut store, &services, &reach, now);
        assert_eq!(id(&tables, 0), new);
        assert!(store.zeroed.is_empty());
    }

    #[test]
    fn an_unchanged_state_writes_nothing() {
        let mut tables = Tables::new(SIZES);
        let mut store = MemStore::new(SIZES.maglev_slots());
        let (services, reach) = desired(&[Some((
            false,
            vec![(0, 1, false, true), (1, 2, false, true)],
        ))]);
        let now = Instant::now();
        step(&mut tables, &mut store, &services, &reach, now);
        assert_eq!(step(&mut tables, &mut store, &services, &reach, now), []);
    }

    #[test]
    fn after_a_failed_write_the_next_plan_writes_everything_again() {
        let mut tables = Tables::new(SIZES);
        let mut store = MemStore::new(SIZES.maglev_slots());
        let (services, reach) = desired(&[Some((
            false,
            vec![(0, 1, false, true), (1, 2, false, true)],
        ))]);
        let now = Instant::now();
        step(&mut tables, &mut store, &services, &reach, now);
        // The maps lost their contents behind the planner's back.
        let mut wiped = MemStore::new(SIZES.maglev_slots());
        wiped.services = store.services.clone();
        tables.forget_written(&wiped);
        // As the daemon does after a failed apply: the whole state.
        let mut ops = Vec::new();
        tables
            .plan(&services, &Resolved::new(), now, &mut ops)
            .unwrap();
        store::apply(&mut wiped, &ops).unwrap();
        check_end_state(&tables, &wiped, &services);
        assert_eq!(wiped.rev_nat.len(), 2);
    }
    #[test]
    fn adopted_backends_behind_a_gone_interface_are_found_and_rewritten() {
        let now = Instant::now();
        let (services, _) = desired(&[Some((
            false,
            vec![(0, 1, false, true), (1, 1, false, true)],
        ))]);
        // An earlier daemon delivered backend 0 through interface 7 and
        // backend 1 through interface 8.
        let mut earlier = Tables::new(SIZES);
        let mut store = MemStore::new(SIZES.maglev_slots());
        let resolved: Resolved = [(0, 7), (1, 8)]
            .into_iter()
            .map(|(i, ifindex)| (("svc0".to_owned(), addr(i)), Some(delivery(ifindex))))
            .collect();
        let mut ops = Vec::new();
        earlier
            .plan(&services, &resolved, now, &mut ops)
            .expect("within the limits");
        store::apply(&mut store, &ops).expect("the memory store takes everything");

        // Interface 8 went while no daemon ran.
        let mut tables = Tables::new(SIZES);
        let mut ops = Vec::new();
        tables
            .adopt(&store, &services, &mut ops)
            .expect("adoptable");
        store::apply(&mut store, &ops).expect("the memory store takes everything");
        let gone = BTreeSet::from([8]);
        let through: Vec<(String, SocketAddrV4)> = (tables.backends_through(&gone).into_iter())
            .map(|w| (w.service, w.addr))
            .collect();
        assert_eq!(through, [("svc0".to_owned(), addr(1))]);
        // Resolved again: a new interface under the same name.
        assert!(tables.set_delivery("svc0", addr(1), Some(delivery(9))));
        let mut ops = Vec::new();
        tables
            .plan(&services, &Resolved::new(), now, &mut ops)
            .expect("within the limits");
        store::apply(&mut store, &ops).expect("the memory store takes everything");
        assert_eq!(tables.used_ifindexes(), BTreeSet::from([7, 9]));
        let in_maps: BTreeSet<u32> = store.backends.values().map(|b| b.ifindex).collect();
        assert_eq!(in_maps, BTreeSet::from([7, 9]));
        assert!(store.broken.is_none(), "{:?}", store.broken);
        check_end_state(&tables, &store, &services);
    }
}
