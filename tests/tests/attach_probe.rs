//! Checks that [`lb_harness::attachments`], which the e2e tests use to prove
//! that nothing is left attached, does see the kinds of attachments `lb`
//! makes (an XDP link and a TC/TCX link), by attaching the real data path
//! through the `lb` library. Needs root and an `lb` built with its eBPF object.

use lb::datapath::{Datapath, MapSizes};
use lb_harness::{attachments, require_root, Topology};

#[test]
fn attachments_sees_lb_xdp_and_tc_links_and_their_removal() {
    require_root();
    let topo = Topology::new("lba1", 0);
    let ifname = topo.client_host_if();
    let ifindex: u32 = std::fs::read_to_string(format!("/sys/class/net/{ifname}/ifindex"))
        .expect("ifindex")
        .trim()
        .parse()
        .expect("numeric ifindex");
    assert!(attachments(&ifname).is_empty(), "{}", attachments(&ifname));
    {
        let sizes = MapSizes {
            max_services: 4,
            max_backends: 16,
            max_table_size: 251,
            flow_table_size: 1024,
        };
        let mut dp = Datapath::load(&sizes).expect("loading the data path");
        dp.attach_xdp(&ifname, ifindex, aya::programs::XdpMode::Skb)
            .expect("attaching XDP");
        let seen = attachments(&ifname);
        assert!(seen.has_xdp(), "XDP not seen:\n{seen}");
        assert!(!seen.is_empty());
        dp.attach_tc(&ifname, ifindex).expect("attaching TC");
        let seen = attachments(&ifname);
        let tc_seen = seen.tcx_ingress.as_ref().is_ok_and(|p| !p.is_empty())
            || !seen.tc_ingress.trim().is_empty();
        assert!(tc_seen, "TC program not seen:\n{seen}");
        eprintln!("{seen}");
    }
    let after = attachments(&ifname);
    assert!(
        after.is_empty(),
        "still attached after the data path was dropped:\n{after}"
    );
    topo.assert_client_side_pristine();
}
