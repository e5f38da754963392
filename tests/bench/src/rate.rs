//! Packet rate through the real path: a generator namespace blasts small UDP
//! frames at the VIP through the external veth, and the backends count what
//! arrives.
//!
//! Contenders, measured alternately round by round (A B C … A B C …):
//!
//! - `lb` (`lb run` with `mode = "xdp"` on the external veth, so XDP
//!   forwards straight into the backends' veths);
//! - iptables DNAT rules with the `statistic` match over the same backends,
//!   as kube-proxy makes them (`ip_forward = 1`, FORWARD policy ACCEPT);
//! - plain kernel forwarding to one backend (frames addressed to the backend
//!   itself, no NAT): the limit of the kernel path;
//! - `lb` and iptables again with an XDP program dropping every frame on the
//!   backends' `eth0`: the forwarding alone, without the backends' receive
//!   stack;
//! - the generator alone (an XDP program on the host side drops every frame):
//!   what the generator itself costs, and the most it can send.
//!
//! **The generator.** An XDP program, loaded with a raw `bpf()` call, writes
//! one of [`FLOWS`] flows' frames (picked at random per frame) over the packet
//! and returns `XDP_TX`. It is run by `BPF_PROG_TEST_RUN` in live-frames mode
//! from inside the client namespace with the client's `eth0` as the ingress
//! interface: live-frames mode turns `XDP_TX` into a redirect out of that same
//! interface, so a run sends `repeat` frames out of the client's veth to its
//! peer on the host (the external interface), where they arrive as a NIC's
//! frames would: complete checksums, one packet each. The program must write
//! the frame itself: the kernel copies the input frame into a page only when
//! the page is new and recycles pages as they come back, so a frame rewritten
//! downstream (by lb, by IP forwarding) would otherwise go out again as
//! rewritten, and be dropped as addressed to another host. The host side must
//! have GRO on or an XDP program to take XDP frames (docs/HOST-FACTS.md), so GRO is
//! on there for every contender. The frames are received on the generator's
//! own core (a veth's NAPI runs where it was scheduled), so the whole path,
//! generator included, runs on one core: the delivered rate is a one-core
//! figure.
//!
//! **Timing.** Every live-frames run spends tens of milliseconds asleep in its
//! setup and teardown whatever its length (seen: 16 to 32 ms on this kernel),
//! so rates are not taken from a run's wall time: each measurement is one long
//! run, and the counters are read twice while it is still going, [`LEAD`]
//! after it starts and a window later (a window the run did not outlast is
//! measured again with more frames).
//!
//! **Delivered** is counted in the backends' own UDP statistics
//! (`/proc/net/snmp` in each backend namespace): datagrams that reached the
//! UDP socket bound on the backend port, whether read (`InDatagrams`) or
//! dropped because its buffer was full (`RcvbufErrors`). The sockets are not
//! read during a run (no userspace work competes with the path) and are
//! drained after it; the kernel verifies the UDP checksum of every datagram
//! it hands to a reader, and `InCsumErrors` must stay 0. When the backends
//! drop in XDP, delivered is what their `eth0` received.

use std::{
    ffi::CString,
    fs::File,
    io::{ErrorKind, Read, Seek, SeekFrom},
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    os::fd::{AsRawFd, OwnedFd},
    path::Path,
    thread,
    time::{Duration, Instant},
};

use lb_harness::{
    attach::attachments,
    cmd::{self, run_ok},
    config_files::{render_config, ServiceConfig},
    forward::forward_policy,
    lb_process::{Daemon, READY_MARKER},
    netns::Netns,
    packets::{frame, L4},
    tempdir::TempDir,
    topology::Topology,
};

use crate::{
    raw_bpf::{insn, return_program, ProgType, Program},
    report::{median, Column, Row, Section, Target},
};

/// The UDP service's port on the VIP.
pub const VIP_PORT: u16 = 7000;
/// The backends' UDP port.
pub const BACKEND_PORT: u16 = 7001;
/// Frame length without the FCS: 64 bytes on the wire with it.
pub const FRAME_LEN: usize = 60;
/// Ethernet, IPv4 and UDP headers: the payload is the rest of the frame.
const HEADERS: usize = 14 + 20 + 8;
/// Flows (source ports) the generator picks from at random, frame by frame.
pub const FLOWS: u16 = 12;
/// The first flow's source port; flow `i` uses `FIRST_SRC_PORT + i`.
pub const FIRST_SRC_PORT: u16 = 40000;
/// Frames per live-frames batch (the kernel's default; at most 256).
pub const BATCH: u32 = 64;
/// Backends in the rig.
pub const BACKENDS: usize = 3;
/// Topology prefix of the benchmark's namespaces and veths.
pub const PREFIX: &str = "lbrt";
/// bpffs directory of the benchmark's `lb run` (never the default one).
pub const PIN_PATH: &str = "/sys/fs/bpf/lb-bench-rate";
/// The iptables nat chain holding the DNAT rules.
pub const CHAIN: &str = "LB-BENCH-RATE";
/// How long `lb run` may take to be ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Frames of the run before each measurement (neighbours, conntrack
/// entries, flow table, caches), not counted.
const WARMUP_FRAMES: u32 = 20_000;
/// How far into a run its measuring window starts.
pub const LEAD: Duration = Duration::from_millis(30);
/// Wait after a run before counters are read (queues drain, neighbours
/// resolve after the warm-up).
const SETTLE: Duration = Duration::from_millis(100);

/// `XDP_DROP`.
pub const XDP_DROP: u32 = 1;
/// `XDP_TX`.
pub const XDP_TX: u32 = 3;

/// How a frame of `len` bytes is written with stores: `(offset, size)` of
/// 4-byte words, then a 2-byte and a 1-byte tail.
fn chunks(len: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut k = 0;
    while k < len {
        let n = match len - k {
            4.. => 4,
            2..=3 => 2,
            _ => 1,
        };
        out.push((k, n));
        k += n;
    }
    out
}

/// `*(size *)(r2 + k) = frame[k..k + size]`.
fn store(frame: &[u8], k: usize, n: usize) -> u64 {
    // BPF_ST | BPF_MEM | size: W 0x62, H 0x6a, B 0x72.
    let code = match n {
        4 => 0x62,
        2 => 0x6a,
        _ => 0x72,
    };
    let mut word = [0u8; 4];
    word[..n].copy_from_slice(&frame[k..k + n]);
    let off = i16::try_from(k).expect("frame offset fits i16");
    insn(code, 2, 0, off, i32::from_ne_bytes(word))
}

/// The generator: an XDP program that writes one of `frames` (all of one
/// length), picked at random for each packet, over the packet and returns
/// `action`. A packet of another length is dropped untouched.
///
/// ```text
///     r6 = r1; r0 = bpf_get_prandom_u32(); w0 %= frames.len()
///     r2 = ctx->data; r3 = ctx->data_end; r4 = r2 + len
///     if r4 > r3 goto drop
///     *(u32 *)(r2 + k) = frames[0][k..k + 4] ...   (u16, u8 for a tail)
///     if r0 != 1 goto +n1; the words where frames[1] differs ...
///     if r0 != 2 goto +n2; ...
///     r0 = action; exit
/// drop:
///     r0 = XDP_DROP; exit
/// ```
fn generator_program(frames: &[Vec<u8>], action: u32) -> Vec<u64> {
    let first = frames.first().expect("at least one frame");
    let len = first.len();
    assert!(
        frames.iter().all(|f| f.len() == len),
        "frames of one length"
    );
    let n = i32::try_from(frames.len()).expect("few frames");
    let chunks = chunks(len);
    let mut body: Vec<u64> = chunks.iter().map(|&(k, c)| store(first, k, c)).collect();
    for (i, f) in frames.iter().enumerate().skip(1) {
        let diff: Vec<u64> = chunks
            .iter()
            .filter(|&&(k, c)| f[k..k + c] != first[k..k + c])
            .map(|&(k, c)| store(f, k, c))
            .collect();
        let skip = i16::try_from(diff.len()).expect("short program");
        // BPF_JMP | BPF_JNE | BPF_K.
        body.push(insn(
            0x55,
            0,
            0,
            skip,
            i32::try_from(i).expect("few frames"),
        ));
        body.extend(diff);
    }
    let to_drop = i16::try_from(body.len() + 2).expect("short program");
    let mut p = vec![
        insn(0xbf, 6, 1, 0, 0), // BPF_ALU64 | BPF_MOV | BPF_X: r6 = ctx
        insn(0x85, 0, 0, 0, 7), // BPF_JMP | BPF_CALL: bpf_get_prandom_u32
        insn(0x94, 0, 0, 0, n), // BPF_ALU | BPF_MOD | BPF_K: w0 %= n
        insn(0x61, 2, 6, 0, 0), // BPF_LDX | BPF_MEM | BPF_W: r2 = data
        insn(0x61, 3, 6, 4, 0), // r3 = data_end
        insn(0xbf, 4, 2, 0, 0), // r4 = r2
        insn(0x07, 4, 0, 0, i32::try_from(len).expect("short frame")), // r4 += len
        insn(0x2d, 4, 3, to_drop, 0), // BPF_JMP | BPF_JGT | BPF_X: if r4 > r3
    ];
    p.extend(body);
    p.extend(return_program(action));
    p.extend(return_program(XDP_DROP));
    p
}

/// Loads the generator: an `XDP_TX` program that writes one of `frames`,
/// picked at random, over each packet. (Live-frames mode copies the input
/// frame into a page only when the page is new and recycles pages as they
/// come back, so a frame rewritten downstream, by lb or by IP forwarding,
/// would otherwise be sent again as rewritten.)
fn load_generator(frames: &[Vec<u8>]) -> Result<Program, String> {
    Program::load(
        ProgType::Xdp,
        &generator_program(frames, XDP_TX),
        "lb_bench_gen",
    )
}

/// A 60-byte (64 with FCS) UDP frame with complete IPv4 and UDP checksums,
/// `macs` being (destination, source); the payload is zeroes.
pub fn udp_frame(macs: ([u8; 6], [u8; 6]), src: SocketAddrV4, dst: SocketAddrV4) -> Vec<u8> {
    frame(
        macs,
        None,
        src.ip().octets(),
        dst.ip().octets(),
        L4::Udp {
            src: src.port(),
            dst: dst.port(),
        },
        &[],
        &[0u8; FRAME_LEN - HEADERS],
    )
}

/// `ifindex` of `ifname` in the calling thread's namespace.
fn ifindex(ifname: &str) -> u32 {
    let name = CString::new(ifname).expect("interface name without NUL");
    // SAFETY: a valid NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert!(
        i != 0,
        "if_nametoindex({ifname}): {}",
        std::io::Error::last_os_error()
    );
    i
}

/// A MAC address from `ip`/sysfs text; the daemon's own parser, panicking
/// with the text on failure.
fn parse_mac(text: &str) -> [u8; 6] {
    lb::host::parse_mac(text.trim()).unwrap_or_else(|e| panic!("{e}"))
}

/// The MAC of `ifname` in `ns`.
fn netns_mac(ns: &Netns, ifname: &str) -> [u8; 6] {
    let json = ns.ip(&["-j", "link", "show", "dev", ifname]);
    let links: serde_json::Value = serde_json::from_str(&json)
        .unwrap_or_else(|e| panic!("`ip -j link show {ifname}` in {}: {e}: {json}", ns.name()));
    parse_mac(
        links[0]["address"]
            .as_str()
            .unwrap_or_else(|| panic!("no MAC for {ifname} in {}: {json}", ns.name())),
    )
}

/// Fields of a `/proc/net/snmp` protocol (`Udp`, `Ip`, …) by name.
fn snmp_fields(snmp: &str, proto: &str) -> Vec<(String, u64)> {
    let prefix = format!("{proto}:");
    let mut lines = snmp.lines().filter(|l| l.starts_with(&prefix));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return Vec::new();
    };
    names
        .split_whitespace()
        .skip(1)
        .zip(values.split_whitespace().skip(1))
        .filter_map(|(n, v)| Some((n.to_owned(), v.parse().ok()?)))
        .collect()
}

/// `rx packets` of `ifname` in a `/proc/net/dev` listing.
fn dev_rx_packets(dev: &str, ifname: &str) -> Option<u64> {
    dev.lines().find_map(|l| {
        let (name, rest) = l.split_once(':')?;
        if name.trim() != ifname {
            return None;
        }
        // bytes packets errs drop fifo frame compressed multicast | tx …
        rest.split_whitespace().nth(1)?.parse().ok()
    })
}

/// One backend's counters at one moment.
#[derive(Clone, Copy, Debug, Default)]
struct BackendCounters {
    in_datagrams: u64,
    rcvbuf_errors: u64,
    no_ports: u64,
    csum_errors: u64,
    eth0_rx: u64,
}

/// A namespace's `/proc/net/snmp` and `/proc/net/dev`, opened from inside
/// it: a `/proc/net` file keeps the namespace it was opened in, so reading it
/// again later, from any thread, needs no `setns` (snapshots stay fast).
#[derive(Debug)]
struct NetProc {
    snmp: File,
    dev: File,
}

impl NetProc {
    /// Opens the calling thread's namespace's files.
    fn open_here() -> NetProc {
        let open = |path: &str| File::open(path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
        NetProc {
            snmp: open("/proc/thread-self/net/snmp"),
            dev: open("/proc/thread-self/net/dev"),
        }
    }

    fn read(mut f: &File) -> String {
        let mut s = String::new();
        f.seek(SeekFrom::Start(0))
            .and_then(|_| f.read_to_string(&mut s))
            .unwrap_or_else(|e| panic!("reading a /proc/net file: {e}"));
        s
    }

    /// The namespace's counters now.
    fn counters(&self) -> BackendCounters {
        let snmp = NetProc::read(&self.snmp);
        let dev = NetProc::read(&self.dev);
        let udp = snmp_fields(&snmp, "Udp");
        let get = |name: &str| {
            udp.iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| *v)
                .unwrap_or_else(|| panic!("no Udp {name} in /proc/net/snmp:\n{snmp}"))
        };
        BackendCounters {
            in_datagrams: get("InDatagrams"),
            rcvbuf_errors: get("RcvbufErrors"),
            no_ports: get("NoPorts"),
            csum_errors: get("InCsumErrors"),
            eth0_rx: dev_rx_packets(&dev, "eth0")
                .unwrap_or_else(|| panic!("no eth0 in /proc/net/dev:\n{dev}")),
        }
    }
}

impl BackendCounters {
    /// Datagrams that reached the UDP socket: read, or dropped for a full
    /// buffer.
    fn delivered(&self) -> u64 {
        self.in_datagrams + self.rcvbuf_errors
    }

    fn minus(&self, before: &BackendCounters) -> BackendCounters {
        BackendCounters {
            in_datagrams: self.in_datagrams - before.in_datagrams,
            rcvbuf_errors: self.rcvbuf_errors - before.rcvbuf_errors,
            no_ports: self.no_ports - before.no_ports,
            csum_errors: self.csum_errors - before.csum_errors,
            eth0_rx: self.eth0_rx - before.eth0_rx,
        }
    }
}

/// Host-wide CPU time from `/proc/stat` (all CPUs), in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CpuTime {
    /// Everything but idle and iowait: user, nice, system, irq, softirq, steal.
    pub busy_ms: f64,
    /// Softirq time alone (the receive path, mostly).
    pub softirq_ms: f64,
}

impl CpuTime {
    /// Parses line `cpu` (all CPUs, `core` = `None`) or `cpuN` of
    /// `/proc/stat`; `ticks_per_s` is `USER_HZ`.
    pub fn parse(stat: &str, core: Option<usize>, ticks_per_s: f64) -> Option<CpuTime> {
        let name = core.map_or_else(|| "cpu".to_owned(), |c| format!("cpu{c}"));
        let line = stat
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name.as_str()))?;
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|x| x.parse().ok())
            .collect::<Option<_>>()?;
        // user nice system idle iowait irq softirq steal [guest guest_nice]
        // (guest time is already in user).
        if v.len() < 8 {
            return None;
        }
        let busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7];
        let ms = 1000.0 / ticks_per_s;
        Some(CpuTime {
            busy_ms: busy as f64 * ms,
            softirq_ms: v[6] as f64 * ms,
        })
    }

    /// All CPUs' time now, and CPU `core`'s.
    pub fn now(core: usize) -> (CpuTime, CpuTime) {
        let stat = std::fs::read_to_string("/proc/stat").expect("reading /proc/stat");
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        let hz = if hz > 0 { hz as f64 } else { 100.0 };
        let get = |c| {
            CpuTime::parse(&stat, c, hz)
                .unwrap_or_else(|| panic!("no line for CPU {c:?} in /proc/stat:\n{stat}"))
        };
        (get(None), get(Some(core)))
    }

    fn minus(&self, before: &CpuTime) -> CpuTime {
        CpuTime {
            busy_ms: self.busy_ms - before.busy_ms,
            softirq_ms: self.softirq_ms - before.softirq_ms,
        }
    }
}

/// Sets a sysctl file to `value` while it lives; restores what it found.
#[derive(Debug)]
struct Sysctl {
    path: &'static str,
    saved: String,
}

impl Sysctl {
    fn set(path: &'static str, value: &str) -> Sysctl {
        let saved = std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("reading {path}: {e}"))
            .trim()
            .to_owned();
        let guard = Sysctl { path, saved };
        std::fs::write(path, value).unwrap_or_else(|e| panic!("writing {value} to {path}: {e}"));
        guard
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(self.path, &self.saved) {
            eprintln!(
                "warning: could not restore {} to {}: {e}",
                self.path, self.saved
            );
        }
    }
}

/// Sets the iptables FORWARD policy to ACCEPT while it lives; restores the
/// policy it found.
#[derive(Debug)]
struct ForwardAccept {
    saved: String,
}

impl ForwardAccept {
    fn new() -> ForwardAccept {
        let guard = ForwardAccept {
            saved: forward_policy(),
        };
        run_ok("iptables", &["-P", "FORWARD", "ACCEPT"]);
        guard
    }
}

impl Drop for ForwardAccept {
    fn drop(&mut self) {
        let out = cmd::run("iptables", &["-P", "FORWARD", &self.saved]);
        if !out.status.success() {
            eprintln!(
                "warning: could not restore the FORWARD policy {}: {}",
                self.saved,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
}

/// The kube-proxy style DNAT rules: a jump from nat PREROUTING for
/// VIP:port/udp to [`CHAIN`], where `statistic --mode nth` rules spread new
/// flows evenly over the backends. Removed when dropped.
#[derive(Debug)]
struct DnatRules {
    /// Whether adding the rules created the nat table: an empty nat table
    /// left behind keeps conntrack on for every later contender.
    created_table: bool,
}

impl DnatRules {
    fn jump(vip: Ipv4Addr) -> Vec<String> {
        [
            "PREROUTING",
            "-d",
            &format!("{vip}/32"),
            "-p",
            "udp",
            "--dport",
            &VIP_PORT.to_string(),
            "-m",
            "comment",
            "--comment",
            "lb-bench-rate",
            "-j",
            CHAIN,
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
    }

    /// Removes the jump and the chain, whatever is left of them (bounded).
    fn remove(vip: Ipv4Addr) {
        let jump = DnatRules::jump(vip);
        let mut args = vec!["-t", "nat", "-D"];
        args.extend(jump.iter().map(String::as_str));
        for _ in 0..16 {
            if !cmd::run("iptables", &args).status.success() {
                break;
            }
        }
        let _ = cmd::run("iptables", &["-t", "nat", "-F", CHAIN]);
        let _ = cmd::run("iptables", &["-t", "nat", "-X", CHAIN]);
    }

    fn new(vip: Ipv4Addr, backends: &[Ipv4Addr]) -> DnatRules {
        DnatRules::remove(vip);
        let guard = DnatRules {
            created_table: crate::e2e::host::nft_table_exists("nat") == Some(false),
        };
        run_ok("iptables", &["-t", "nat", "-N", CHAIN]);
        let n = backends.len();
        for (i, b) in backends.iter().enumerate() {
            let to = format!("{b}:{BACKEND_PORT}");
            let every = (n - i).to_string();
            let mut args = vec!["-t", "nat", "-A", CHAIN, "-p", "udp"];
            if i + 1 < n {
                args.extend([
                    "-m",
                    "statistic",
                    "--mode",
                    "nth",
                    "--every",
                    &every,
                    "--packet",
                    "0",
                ]);
            }
            args.extend(["-j", "DNAT", "--to-destination", &to]);
            run_ok("iptables", &args);
        }
        let jump = DnatRules::jump(vip);
        let mut args = vec!["-t", "nat", "-A"];
        args.extend(jump.iter().map(String::as_str));
        run_ok("iptables", &args);
        guard
    }
}

impl Drop for DnatRules {
    fn drop(&mut self) {
        DnatRules::remove(lb_harness::topology::VIP);
        if self.created_table {
            let _ = cmd::run("nft", &["delete", "table", "ip", "nat"]);
        }
    }
}

/// Removes the benchmark's bpffs directory on creation (a crashed run's)
/// and when dropped (`lb run` removes its pins when stopped; this is for a
/// daemon that was killed).
#[derive(Debug)]
struct PinGuard;

impl PinGuard {
    fn new() -> PinGuard {
        PinGuard::remove();
        PinGuard
    }

    fn remove() {
        if Path::new(PIN_PATH).exists() {
            if let Err(e) = std::fs::remove_dir_all(PIN_PATH) {
                eprintln!("warning: removing {PIN_PATH}: {e}");
            }
        }
    }
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        PinGuard::remove();
    }
}

/// Deletes the conntrack entries of the client's flows (so every round's
/// flows are new to netfilter), if the `conntrack` tool is installed.
fn forget_conntrack(client: Ipv4Addr) {
    match std::process::Command::new("conntrack")
        .args(["-D", "-s", &client.to_string()])
        .stdin(std::process::Stdio::null())
        .output()
    {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {
            static ONCE: std::sync::Once = std::sync::Once::new();
            ONCE.call_once(|| {
                eprintln!(
                    "note: no `conntrack` tool (Debian package conntrack): conntrack entries \
                     are left to expire"
                )
            });
        }
        Err(e) => eprintln!("warning: `conntrack -D`: {e}"),
    }
}

/// What is measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Contender {
    /// `lb run` with `mode = "xdp"`.
    Lb,
    /// iptables DNAT with the `statistic` match.
    Iptables,
    /// Kernel forwarding to backend 0, no NAT.
    Kernel,
    /// `lb`, with an XDP program dropping every frame on the backends'
    /// `eth0`: the forwarding alone, without the backends' receive stack.
    LbToXdp,
    /// iptables DNAT, with the backends dropping in XDP likewise.
    IptablesToXdp,
    /// The generator alone: an XDP program on the host side drops every
    /// frame.
    Generator,
}

impl Contender {
    /// In measuring order.
    pub const ALL: [Contender; 6] = [
        Contender::Lb,
        Contender::Iptables,
        Contender::Kernel,
        Contender::LbToXdp,
        Contender::IptablesToXdp,
        Contender::Generator,
    ];

    /// The row name.
    pub fn name(self) -> &'static str {
        match self {
            Contender::Lb => "lb (XDP, mode = \"xdp\")",
            Contender::Iptables => "iptables DNAT (statistic nth)",
            Contender::Kernel => "kernel forwarding, no NAT (one backend)",
            Contender::LbToXdp => "lb, backends drop in XDP (forwarding alone)",
            Contender::IptablesToXdp => "iptables DNAT, backends drop in XDP",
            Contender::Generator => "generator alone (host side drops in XDP)",
        }
    }

    /// Whether `lb` runs.
    pub fn runs_lb(self) -> bool {
        matches!(self, Contender::Lb | Contender::LbToXdp)
    }

    /// Whether the DNAT rules exist.
    pub fn has_dnat(self) -> bool {
        matches!(self, Contender::Iptables | Contender::IptablesToXdp)
    }

    /// Whether the backends drop every frame in XDP (then "delivered" is
    /// what reached their `eth0`, not their sockets).
    pub fn backends_drop(self) -> bool {
        matches!(self, Contender::LbToXdp | Contender::IptablesToXdp)
    }

    /// The contender its ratio is taken against.
    pub fn baseline(self) -> Option<Contender> {
        match self {
            Contender::Lb | Contender::Iptables | Contender::Kernel => Some(Contender::Iptables),
            Contender::LbToXdp | Contender::IptablesToXdp => Some(Contender::IptablesToXdp),
            Contender::Generator => None,
        }
    }
}

/// What the backends' sockets held after a blast.
#[derive(Clone, Debug, Default)]
pub struct Drained {
    /// Datagrams read (each checksum-verified by the kernel on the way).
    pub read: u64,
    /// Datagrams whose payload was not the generator's.
    pub bad_payloads: u64,
    /// Their distinct sources, sorted.
    pub sources: Vec<SocketAddrV4>,
}

/// Every counter the benchmark reads, at one moment.
#[derive(Clone, Debug)]
struct Snapshot {
    at: Instant,
    host_rx: u64,
    backends: Vec<BackendCounters>,
    cpu: CpuTime,
    core_cpu: CpuTime,
}

/// Steady-state figures, taken while the generator runs.
#[derive(Clone, Debug, Default)]
pub struct Window {
    /// Its length.
    pub elapsed: Duration,
    /// Frames the host's external veth received in it.
    pub host_rx: u64,
    /// Datagrams that reached a backend socket in it.
    pub delivered: u64,
    /// Host CPU time (all CPUs) in it.
    pub cpu: CpuTime,
    /// The generator's CPU's time in it (the whole path runs there).
    pub core_cpu: CpuTime,
}

impl Window {
    /// Delivered packets per second, in millions.
    pub fn delivered_mpps(&self) -> f64 {
        self.delivered as f64 / self.elapsed.as_secs_f64() / 1e6
    }

    /// Frames per second into the host's external veth, in millions.
    pub fn rx_mpps(&self) -> f64 {
        self.host_rx as f64 / self.elapsed.as_secs_f64() / 1e6
    }
}

/// One blast's figures: totals over the whole blast, and a steady-state
/// window when one was asked for.
#[derive(Clone, Debug, Default)]
pub struct Measurement {
    /// Frames the generator ran (`repeat`).
    pub sent: u64,
    /// Frames the host's external veth received.
    pub host_rx: u64,
    /// Datagrams that reached a backend's UDP socket, summed (frames that
    /// reached a backend's `eth0` when the backends drop in XDP).
    pub delivered: u64,
    /// The same per backend.
    pub per_backend: Vec<u64>,
    /// What was read back from the backends' sockets after the blast.
    pub drained: Drained,
    /// Packets the backends' `eth0`s received, summed.
    pub backend_rx: u64,
    /// UDP checksum errors in the backends (must be 0).
    pub csum_errors: u64,
    /// Datagrams to a closed port in the backends (must be 0).
    pub no_ports: u64,
    /// Wall time of the generator's `BPF_PROG_TEST_RUN` call, including its
    /// fixed setup and teardown (tens of milliseconds).
    pub call: Duration,
    /// The steady-state window, if one was asked for and the blast outlasted
    /// it.
    pub window: Option<Window>,
}

/// How one contender is measured.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    /// Frames the generator sends (one live-frames run).
    pub frames: u32,
    /// The steady-state window to read counters over, if any: it starts
    /// [`LEAD`] after the run and must end before it does.
    pub window: Option<Duration>,
}

/// The benchmark's world: a topology (client = generator, [`BACKENDS`]
/// backends) with a UDP socket on [`BACKEND_PORT`] in every backend, GRO on
/// in the backends and on the host side of the client's veth,
/// `ip_forward = 1` and FORWARD policy ACCEPT. Dropping it undoes all of it.
#[derive(Debug)]
pub struct RateRig {
    /// The backends' sockets (closed before their namespaces go).
    sinks: Vec<UdpSocket>,
    /// The backends' counters.
    procs: Vec<NetProc>,
    /// Flows' frames to the VIP, and their generator.
    to_vip: (Vec<Vec<u8>>, Program),
    /// Flows' frames straight to backend 0, and their generator.
    to_backend: (Vec<Vec<u8>>, Program),
    dropper: Program,
    dir: TempDir,
    _pins: PinGuard,
    _forward: ForwardAccept,
    _ip_forward: Sysctl,
    host_if: String,
    client_ifindex: u32,
    /// The namespaces and veths (dropped last).
    pub topo: Topology,
}

impl RateRig {
    /// Builds the rig with `flows` flows (source ports [`FIRST_SRC_PORT`]
    /// on); `rcvbuf` forces the sockets' receive buffer (bytes) when given,
    /// so that a test can read every datagram back.
    pub fn new(flows: u16, rcvbuf: Option<usize>) -> RateRig {
        assert!(flows >= 1, "at least one flow");
        let topo = Topology::new(PREFIX, BACKENDS);
        let host_if = topo.client_host_if();
        // XDP frames into a veth are only taken when the peer has GRO on
        // (or an XDP program): the host side for the kernel contenders, the
        // backends for lb (lb would turn it on itself; doing it here gives
        // every contender the same backends).
        run_ok("ethtool", &["-K", &host_if, "gro", "on"]);
        for ns in &topo.backends {
            ns.exec_ok(&["ethtool", "-K", "eth0", "gro", "on"]);
        }
        let sinks = (0..BACKENDS)
            .map(|i| {
                let addr = SocketAddrV4::new(topo.backend_addr(i), BACKEND_PORT);
                topo.backends[i].run(|| {
                    let s = UdpSocket::bind(addr)
                        .unwrap_or_else(|e| panic!("binding {addr} in backend {i}: {e}"));
                    s.set_nonblocking(true).expect("non-blocking socket");
                    if let Some(bytes) = rcvbuf {
                        force_rcvbuf(&s, bytes);
                    }
                    s
                })
            })
            .collect();
        let procs = topo
            .backends
            .iter()
            .map(|ns| ns.run(NetProc::open_here))
            .collect();
        let host_mac = parse_mac(
            &std::fs::read_to_string(format!("/sys/class/net/{host_if}/address"))
                .unwrap_or_else(|e| panic!("MAC of {host_if}: {e}")),
        );
        let client_mac = netns_mac(&topo.client, "eth0");
        let client_ifindex = topo.client.run(|| ifindex("eth0"));
        // A crashed run's DNAT rules.
        DnatRules::remove(topo.vip());
        let client = topo.client_addr();
        let generator = |dst: SocketAddrV4| {
            let frames: Vec<Vec<u8>> = (0..flows)
                .map(|i| {
                    let src = SocketAddrV4::new(client, FIRST_SRC_PORT + i);
                    udp_frame((host_mac, client_mac), src, dst)
                })
                .collect();
            let program = load_generator(&frames).unwrap_or_else(|e| panic!("{e}"));
            (frames, program)
        };
        RateRig {
            sinks,
            procs,
            to_vip: generator(SocketAddrV4::new(topo.vip(), VIP_PORT)),
            to_backend: generator(SocketAddrV4::new(topo.backend_addr(0), BACKEND_PORT)),
            dropper: Program::returning(ProgType::Xdp, XDP_DROP, "lb_bench_drop")
                .expect("drop program"),
            dir: TempDir::new("bench-rate"),
            _pins: PinGuard::new(),
            _forward: ForwardAccept::new(),
            _ip_forward: Sysctl::set("/proc/sys/net/ipv4/ip_forward", "1"),
            host_if,
            client_ifindex,
            topo,
        }
    }

    /// Reads every datagram queued on the backends' sockets.
    fn drain(&self) -> Drained {
        let mut d = Drained::default();
        let mut buf = [0u8; 2048];
        for s in &self.sinks {
            // Bounded: a socket holds at most its buffer's worth.
            for _ in 0..10_000_000 {
                match s.recv_from(&mut buf) {
                    Ok((n, from)) => {
                        d.read += 1;
                        if n != FRAME_LEN - HEADERS || buf[..n].iter().any(|b| *b != 0) {
                            d.bad_payloads += 1;
                        }
                        if let std::net::SocketAddr::V4(v4) = from {
                            if !d.sources.contains(&v4) {
                                d.sources.push(v4);
                            }
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => panic!("reading a backend socket: {e}"),
                }
            }
        }
        d.sources.sort();
        d
    }

    fn snapshot(&self, core: usize) -> Snapshot {
        let path = format!("/sys/class/net/{}/statistics/rx_packets", self.host_if);
        let before = Instant::now();
        let (cpu, core_cpu) = CpuTime::now(core);
        let host_rx = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {path}: {e}"))
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        let backends = self.procs.iter().map(NetProc::counters).collect();
        // The counters were read over a moment: date them halfway.
        let at = before + before.elapsed() / 2;
        Snapshot {
            at,
            host_rx,
            backends,
            cpu,
            core_cpu,
        }
    }

    /// One live-frames run of `frames` frames from the client namespace on
    /// a thread pinned to one CPU. With a window, the counters are read
    /// [`LEAD`] after the run starts and again `window` later; `None` if the
    /// run ended before the window did. Returns the run's wall time too.
    fn blast(
        &self,
        generator: &Program,
        frame_len: usize,
        frames: u32,
        window: Option<Duration>,
    ) -> (Duration, Option<(Snapshot, Snapshot)>) {
        let ifindex = self.client_ifindex;
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let input = vec![0u8; frame_len];
        thread::scope(|scope| {
            let runner = scope.spawn(|| {
                self.topo.client.run(|| {
                    let core = pin_to_this_cpu();
                    let _ = started_tx.send(core);
                    let elapsed = generator
                        .run_live(&input, ifindex, frames, BATCH)
                        .unwrap_or_else(|e| panic!("generator: {e}"));
                    (elapsed, Instant::now())
                })
            });
            let window = window.and_then(|w| {
                let core = started_rx.recv_timeout(Duration::from_secs(10)).ok()?;
                thread::sleep(LEAD);
                let first = self.snapshot(core);
                thread::sleep(w.saturating_sub(first.at.elapsed()));
                let second = self.snapshot(core);
                Some((first, second))
            });
            let (elapsed, ended) = match runner.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            };
            // The window only counts if the run was still going at its end.
            (elapsed, window.filter(|(_, second)| ended > second.at))
        })
    }

    /// `lb run` on the external veth with one UDP service VIP:[`VIP_PORT`]
    /// over the backends.
    fn start_lb(&self) -> Daemon {
        let config = render_config(
            &[&self.host_if],
            &[ServiceConfig::new(
                "rate",
                &SocketAddrV4::new(self.topo.vip(), VIP_PORT).to_string(),
                "udp",
                &self.topo.backend_endpoints(BACKEND_PORT),
            )],
        )
        .replacen(
            "[datapath]\n",
            &format!("[datapath]\nmode = \"xdp\"\npin_path = \"{PIN_PATH}\"\n"),
            1,
        );
        let path = self.dir.write("lb.toml", &config);
        let _ = std::fs::remove_file(self.dir.path().join("lb.state.json"));
        let _ = std::fs::remove_file(self.dir.path().join("lb.state.journal"));
        let socket = self.dir.path().join("lb.sock");
        let args = [
            "run",
            "--config",
            path.to_str().expect("UTF-8 path"),
            "--socket",
            socket.to_str().expect("UTF-8 path"),
        ];
        let daemon = Daemon::start(&args, READY_MARKER, READY_TIMEOUT);
        let attached = attachments(&self.host_if);
        assert!(
            attached.has_xdp(),
            "lb runs with mode = \"xdp\" but no XDP program is on {}:\n{attached}",
            self.host_if
        );
        daemon
    }

    /// Measures `contender` as `plan` says: sets up what it needs (starts
    /// `lb`, adds the DNAT rules, attaches the drop program), warms the path
    /// up, blasts, and removes what it set up before returning.
    pub fn measure(&self, contender: Contender, plan: Plan) -> Measurement {
        // Whatever a contender needs lives exactly as long as its run (and
        // the daemon stops first).
        let _backend_links: Vec<OwnedFd> = if contender.backends_drop() {
            self.topo
                .backends
                .iter()
                .map(|ns| {
                    ns.run(|| self.dropper.attach_xdp(ifindex("eth0")))
                        .unwrap_or_else(|e| panic!("attaching the drop program in a backend: {e}"))
                })
                .collect()
        } else {
            Vec::new()
        };
        let _daemon = contender.runs_lb().then(|| self.start_lb());
        let _rules = contender.has_dnat().then(|| {
            let backends: Vec<Ipv4Addr> =
                (0..BACKENDS).map(|i| self.topo.backend_addr(i)).collect();
            DnatRules::new(self.topo.vip(), &backends)
        });
        let _link = (contender == Contender::Generator).then(|| {
            self.dropper
                .attach_xdp(ifindex(&self.host_if))
                .unwrap_or_else(|e| panic!("attaching the drop program: {e}"))
        });
        if !contender.runs_lb() && contender != Contender::Generator {
            let attached = attachments(&self.host_if);
            assert!(
                !attached.has_xdp(),
                "{} must run with no XDP program on {}:\n{attached}",
                contender.name(),
                self.host_if
            );
            forget_conntrack(self.topo.client_addr());
        }
        let (frames, generator) = match contender {
            Contender::Kernel => &self.to_backend,
            _ => &self.to_vip,
        };
        let frame_len = frames[0].len();
        // Warm-up: neighbours, conntrack entries, flow table, caches.
        self.blast(generator, frame_len, WARMUP_FRAMES, None);
        thread::sleep(SETTLE);
        self.drain();
        let before = self.snapshot(0);
        let (call, window) = self.blast(generator, frame_len, plan.frames, plan.window);
        thread::sleep(SETTLE);
        let drained = self.drain();
        let after = self.snapshot(0);
        let deltas = |a: &Snapshot, b: &Snapshot| -> Vec<BackendCounters> {
            b.backends
                .iter()
                .zip(&a.backends)
                .map(|(b, a)| b.minus(a))
                .collect()
        };
        let delivered = |c: &BackendCounters| {
            if contender.backends_drop() {
                c.eth0_rx
            } else {
                c.delivered()
            }
        };
        let totals = deltas(&before, &after);
        let window = window.map(|(a, b)| Window {
            elapsed: b.at - a.at,
            host_rx: b.host_rx - a.host_rx,
            delivered: deltas(&a, &b).iter().map(delivered).sum(),
            cpu: b.cpu.minus(&a.cpu),
            core_cpu: b.core_cpu.minus(&a.core_cpu),
        });
        Measurement {
            sent: u64::from(plan.frames),
            host_rx: after.host_rx - before.host_rx,
            delivered: totals.iter().map(delivered).sum(),
            per_backend: totals.iter().map(delivered).collect(),
            drained,
            backend_rx: totals.iter().map(|d| d.eth0_rx).sum(),
            csum_errors: totals.iter().map(|d| d.csum_errors).sum(),
            no_ports: totals.iter().map(|d| d.no_ports).sum(),
            call,
            window,
        }
    }
}

/// Pins the calling thread to the CPU it runs on, and returns that CPU: a
/// blast then stays on one core, and that core's time can be read.
fn pin_to_this_cpu() -> usize {
    // SAFETY: no preconditions.
    let cpu = unsafe { libc::sched_getcpu() };
    let cpu = usize::try_from(cpu)
        .unwrap_or_else(|_| panic!("sched_getcpu: {}", std::io::Error::last_os_error()));
    // SAFETY: `cpu_set_t` is plain data; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is below CPU_SETSIZE (it is a CPU of this machine); the
    // set is valid for its size; pid 0 is the calling thread.
    let r = unsafe {
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    assert_eq!(
        r,
        0,
        "sched_setaffinity: {}",
        std::io::Error::last_os_error()
    );
    cpu
}

/// Sets `SO_RCVBUFFORCE` (root may exceed `rmem_max`).
fn force_rcvbuf(s: &UdpSocket, bytes: usize) {
    let v = libc::c_int::try_from(bytes).expect("buffer size fits c_int");
    // SAFETY: a valid socket and a valid c_int option value.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(
        r,
        0,
        "SO_RCVBUFFORCE {bytes}: {}",
        std::io::Error::last_os_error()
    );
}

/// Frames for a run that must outlast `window` (plus [`LEAD`]) at `mpps`,
/// with a margin.
fn frames_for(mpps: f64, window: Duration) -> u32 {
    let secs = (LEAD + window).as_secs_f64() * 1.5 + 0.05;
    (mpps * 1e6 * secs).clamp(100_000.0, 1e9) as u32
}

/// Runs the section: `quick` takes 3 rounds with a 0.25 s window, else 11
/// rounds with a 1 s window (after one calibration round that is not
/// counted).
pub fn run(quick: bool) -> Section {
    let (rounds, window) = if quick {
        (3, Duration::from_millis(250))
    } else {
        (11, Duration::from_secs(1))
    };
    let rig = RateRig::new(FLOWS, None);
    let n = Contender::ALL.len();
    // Calibration: each contender's rate from a short run (whose fixed setup
    // makes it an underestimate), so that every measured run outlasts its
    // window without running for long after it.
    let calibration_frames = if quick { 400_000 } else { 1_000_000 };
    let mut mpps: Vec<f64> = Contender::ALL
        .iter()
        .map(|c| {
            let m = rig.measure(
                *c,
                Plan {
                    frames: calibration_frames,
                    window: None,
                },
            );
            let rate = m.host_rx as f64 / m.call.as_secs_f64() / 1e6;
            eprintln!(
                "rate: calibration {}: {} frames in {:?} ({rate:.2} Mpps with the run's setup)",
                c.name(),
                m.sent,
                m.call
            );
            rate
        })
        .collect();
    let mut samples: Vec<Vec<Measurement>> = vec![Vec::new(); n];
    for round in 0..rounds {
        for (i, c) in Contender::ALL.iter().enumerate() {
            // Bounded: a window the run did not outlast is retried with
            // twice the frames, at most 3 times.
            let mut frames = frames_for(mpps[i], window);
            let m = (0..4)
                .find_map(|_| {
                    let m = rig.measure(
                        *c,
                        Plan {
                            frames,
                            window: Some(window),
                        },
                    );
                    if m.window.is_none() {
                        eprintln!(
                            "rate: {} ended before its window: {frames} frames in {:?}; again \
                             with twice as many",
                            c.name(),
                            m.call
                        );
                        frames = frames.saturating_mul(2);
                    }
                    m.window.is_some().then_some(m)
                })
                .unwrap_or_else(|| panic!("{}: no run outlasted the window", c.name()));
            let w = m.window.as_ref().expect("checked");
            mpps[i] = w.rx_mpps();
            eprintln!(
                "rate: round {}/{rounds} {}: window {:.0} ms: {:.3} Mpps into the host, {:.3} \
                 Mpps delivered, CPU {:.0} ms (softirq {:.0}; generator's core {:.0}, softirq \
                 {:.0}); whole run: sent {}, host rx {}, delivered {} {:?} in {:.0} ms",
                round + 1,
                c.name(),
                w.elapsed.as_secs_f64() * 1e3,
                w.rx_mpps(),
                w.delivered_mpps(),
                w.cpu.busy_ms,
                w.cpu.softirq_ms,
                w.core_cpu.busy_ms,
                w.core_cpu.softirq_ms,
                m.sent,
                m.host_rx,
                m.delivered,
                m.per_backend,
                m.call.as_secs_f64() * 1e3,
            );
            assert_eq!(
                m.csum_errors,
                0,
                "{}: UDP checksum errors in the backends",
                c.name()
            );
            assert_eq!(m.drained.bad_payloads, 0, "{}: payloads changed", c.name());
            samples[i].push(m);
        }
    }
    drop(rig);
    section(rounds, window, &samples)
}

/// Builds the report section from every round's measurements, per
/// contender in [`Contender::ALL`] order.
fn section(rounds: usize, window: Duration, samples: &[Vec<Measurement>]) -> Section {
    let pos = |c: Contender| Contender::ALL.iter().position(|x| *x == c).expect("listed");
    let med = |c: Contender, f: &dyn Fn(&Measurement, &Window) -> f64| -> f64 {
        median(
            &samples[pos(c)]
                .iter()
                .filter_map(|m| Some(f(m, m.window.as_ref()?)))
                .collect::<Vec<_>>(),
        )
    };
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let mut rows = Vec::new();
    for &c in &Contender::ALL {
        let mut row = Row::new(c.name());
        // Per million packets delivered; for the generator alone (nothing
        // reaches a backend), per million frames into the host.
        let per_m = |ms: f64, w: &Window| {
            let packets = if c == Contender::Generator {
                w.host_rx
            } else {
                w.delivered
            };
            ms / (packets.max(1) as f64 / 1e6)
        };
        if c != Contender::Generator {
            let mpps = med(c, &|_, w| w.delivered_mpps());
            row = row.with("mpps", mpps).with(
                "delivered_pct",
                med(c, &|m, _| 100.0 * m.delivered as f64 / m.sent as f64),
            );
            if let Some(base) = c.baseline() {
                let base = med(base, &|_, w| w.delivered_mpps());
                if base > 0.0 {
                    row = row.with("ratio", mpps / base);
                }
            }
            row.rounds = samples[pos(c)]
                .iter()
                .filter_map(|m| Some(m.window.as_ref()?.delivered_mpps()))
                .collect();
        } else {
            row.rounds = samples[pos(c)]
                .iter()
                .filter_map(|m| Some(m.window.as_ref()?.rx_mpps()))
                .collect();
        }
        row = row
            .with("rx_mpps", med(c, &|_, w| w.rx_mpps()))
            .with(
                "cpu_ms_per_mpkt",
                med(c, &|_, w| per_m(w.core_cpu.busy_ms, w)),
            )
            .with(
                "softirq_ms_per_mpkt",
                med(c, &|_, w| per_m(w.core_cpu.softirq_ms, w)),
            )
            .with(
                "other_pct",
                med(c, &|_, w| {
                    let other = (w.cpu.busy_ms - w.core_cpu.busy_ms).max(0.0);
                    100.0 * other / (w.elapsed.as_secs_f64() * 1e3 * (cpus - 1.0).max(1.0))
                }),
            );
        rows.push(row);
    }
    let lb = med(Contender::Lb, &|_, w| w.delivered_mpps());
    let iptables = med(Contender::Iptables, &|_, w| w.delivered_mpps());
    let ratio = if iptables > 0.0 { lb / iptables } else { 0.0 };
    let targets = vec![Target {
        bar: "lb delivers at least 4x the packets per second of iptables DNAT".into(),
        actual: format!("{ratio:.2}x ({lb:.2} vs {iptables:.2} Mpps)"),
        met: ratio >= 4.0,
    }];
    Section {
        key: "rate".into(),
        title: "Packet rate through the real path".into(),
        method: format!(
            "A generator in the client namespace sends 64-byte UDP frames (60 bytes + FCS, \
             complete checksums) to the VIP through the client's veth: an XDP program that \
             writes one of {FLOWS} flows' frames (source ports), picked at random per frame, and \
             returns XDP_TX, run by BPF_PROG_TEST_RUN in live-frames mode (one run per \
             measurement, after a {WARMUP_FRAMES}-frame warm-up run). {BACKENDS} backends; \
             contenders alternate within each round. Figures come from a {} ms window that \
             starts {} ms into the run and ends before it does (steady state; a run's fixed \
             setup and teardown, tens of milliseconds, is outside). Delivered = datagrams that \
             reached the UDP socket bound in a backend (its InDatagrams + RcvbufErrors) per \
             second. Host CPU from /proc/stat over the window: the non-idle time (user, nice, \
             system, irq, softirq, steal) of the CPU the generator is pinned to, where the whole \
             path runs, per million packets delivered (for the generator alone, per million \
             frames into the host side), its softirq part, and how busy the other CPUs were \
             (lb's daemon, anything else running on the host).",
            window.as_millis(),
            LEAD.as_millis(),
        ),
        rounds,
        columns: vec![
            Column::new("mpps", "delivered Mpps", 2),
            Column::new("ratio", "× iptables (same backends)", 2),
            Column::new("rx_mpps", "into the host side, Mpps", 2),
            Column::new("delivered_pct", "delivered % (whole run)", 1),
            Column::new(
                "cpu_ms_per_mpkt",
                "CPU ms per million packets (the generator's core)",
                0,
            ),
            Column::new("softirq_ms_per_mpkt", "of which softirq (the path)", 0),
            Column::new("other_pct", "other CPUs busy %", 0),
        ],
        rows,
        targets,
        chart: Some("mpps".into()),
        notes: vec![
            "One core does everything: the generator runs on one CPU, and a veth's NAPI runs \
             where it was scheduled, so the host side's receive, the forwarding (lb's XDP, or \
             the kernel's stack with conntrack and NAT), and the backends' receive all run in \
             softirq on the generator's core, between its batches of 64 frames. The delivered \
             rate is a one-core figure and includes the generator's own cost: the last row is \
             that cost (frames dropped by XDP on the host side). Softirq time is the path's \
             share; the rest of the core's time is mostly the generator (system time)."
                .into(),
            "The two \"backends drop in XDP\" rows count frames that reached the backends' \
             eth0 (the veth's rx counter), where an XDP program drops them: the backends' own \
             receive stack (skb, GRO, IP, UDP, socket), which every other row pays on the same \
             core, is left out, so they compare the balancers' forwarding alone; their ratio is \
             against iptables measured the same way."
                .into(),
            "GRO is on in the backends and on the host side of the client veth for every \
             contender (XDP frames into a veth need it); `ip_forward = 1` and FORWARD policy \
             ACCEPT throughout. lb runs only during its own measurement (started and stopped \
             each round: no XDP/TC attached otherwise), the DNAT rules exist only during \
             theirs, and the client's conntrack entries are deleted before each kernel-path \
             measurement. Kernel forwarding sends every flow to one backend (frames addressed \
             to it directly)."
                .into(),
            "The backends' sockets are not read during a run and are drained after it: most \
             datagrams are dropped at the full socket buffer after the whole receive path, as \
             for an application too slow to read them; the drained ones are checksum-verified \
             by the kernel (InCsumErrors must stay 0) and their payloads checked."
                .into(),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_harness::packets::assert_checksums_valid;

    /// (opcode, dst, src, off, imm) of an instruction.
    fn fields(i: u64) -> (u8, u8, u8, i16, i32) {
        (
            (i & 0xff) as u8,
            ((i >> 8) & 0xf) as u8,
            ((i >> 12) & 0xf) as u8,
            (i >> 16) as u16 as i16,
            (i >> 32) as u32 as i32,
        )
    }

    #[test]
    fn generator_program_writes_a_random_flow_after_a_bounds_check() {
        let a: Vec<u8> = (1..=7).collect();
        let mut b = a.clone();
        b[5] = 0x55; // differs in the 2-byte chunk only
        let f: Vec<_> = generator_program(&[a, b], XDP_TX)
            .into_iter()
            .map(fields)
            .collect();
        assert_eq!(f[0], (0xbf, 6, 1, 0, 0), "r6 = ctx");
        assert_eq!(f[1], (0x85, 0, 0, 0, 7), "call bpf_get_prandom_u32");
        assert_eq!(f[2], (0x94, 0, 0, 0, 2), "w0 %= 2");
        assert_eq!(f[3], (0x61, 2, 6, 0, 0), "r2 = ctx->data");
        assert_eq!(f[4], (0x61, 3, 6, 4, 0), "r3 = ctx->data_end");
        assert_eq!(f[5], (0xbf, 4, 2, 0, 0), "r4 = r2");
        assert_eq!(f[6], (0x07, 4, 0, 0, 7), "r4 += len");
        // 3 stores, jne + 1 store, then r0 = XDP_TX; exit: skip 7.
        assert_eq!(f[7], (0x2d, 4, 3, 7, 0), "if r4 > r3 goto drop");
        assert_eq!(f[8], (0x62, 2, 0, 0, i32::from_ne_bytes([1, 2, 3, 4])));
        assert_eq!(f[9], (0x6a, 2, 0, 4, i32::from_ne_bytes([5, 6, 0, 0])));
        assert_eq!(f[10], (0x72, 2, 0, 6, i32::from_ne_bytes([7, 0, 0, 0])));
        assert_eq!(f[11], (0x55, 0, 0, 1, 1), "if r0 != 1 skip flow 1's store");
        assert_eq!(f[12], (0x6a, 2, 0, 4, i32::from_ne_bytes([5, 0x55, 0, 0])));
        assert_eq!(f[13], (0xb7, 0, 0, 0, XDP_TX as i32));
        assert_eq!(f[14].0, 0x95, "exit");
        assert_eq!(f[15], (0xb7, 0, 0, 0, XDP_DROP as i32), "drop:");
        assert_eq!(f[16].0, 0x95, "exit");
        assert_eq!(f.len(), 17);
    }

    #[test]
    fn flows_differ_only_in_source_port_and_checksum() {
        let macs = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
        let dst = SocketAddrV4::new(Ipv4Addr::new(198, 18, 101, 1), VIP_PORT);
        let frames: Vec<Vec<u8>> = (0..FLOWS)
            .map(|i| {
                let src = SocketAddrV4::new(Ipv4Addr::new(198, 18, 100, 2), FIRST_SRC_PORT + i);
                udp_frame(macs, src, dst)
            })
            .collect();
        let p = generator_program(&frames, XDP_TX);
        // 8 setup instructions, 15 word stores of the first frame, per other
        // flow a jump and the words holding its source port (32..36) and
        // UDP checksum (40..44), then two returns.
        assert_eq!(p.len(), 8 + 15 + (usize::from(FLOWS) - 1) * 3 + 4);
        assert!(p.len() < 4096, "within the verifier's limits for anyone");
    }

    #[test]
    fn frames_are_64_bytes_on_the_wire_with_complete_checksums() {
        let f = udp_frame(
            ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]),
            SocketAddrV4::new(Ipv4Addr::new(198, 18, 100, 2), 40001),
            SocketAddrV4::new(Ipv4Addr::new(198, 18, 101, 1), VIP_PORT),
        );
        assert_eq!(f.len(), FRAME_LEN);
        assert_eq!(&f[0..6], &[2, 0, 0, 0, 0, 1], "destination MAC");
        assert_eq!(&f[6..12], &[2, 0, 0, 0, 0, 2], "source MAC");
        assert_eq!(f[23], 17, "UDP");
        assert_eq!(&f[34..36], &40001u16.to_be_bytes(), "source port");
        assert_eq!(&f[36..38], &VIP_PORT.to_be_bytes(), "destination port");
        assert_ne!(&f[40..42], &[0, 0], "UDP checksum present");
        assert_checksums_valid("bench frame", &f);
    }

    #[test]
    fn parses_proc_files() {
        let snmp = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
                    Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors\n\
                    Udp: 10 2 5 0 4 0 1\n";
        let udp = snmp_fields(snmp, "Udp");
        assert_eq!(udp[0], ("InDatagrams".into(), 10));
        assert_eq!(udp[4], ("RcvbufErrors".into(), 4));
        assert!(snmp_fields(snmp, "Tcp").is_empty());
        let dev = "Inter-|   Receive\n face |bytes    packets errs\n    lo: 100 2 0 0 0 0 0 0 100 2 0 0 0 0 0 0\n  eth0: 6000 123 0 0 0 0 0 0 0 0 0 0 0 0 0 0\n";
        assert_eq!(dev_rx_packets(dev, "eth0"), Some(123));
        assert_eq!(dev_rx_packets(dev, "eth1"), None);
        let stat = "cpu  100 5 50 1000 7 3 20 2 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n";
        let t = CpuTime::parse(stat, None, 100.0).expect("parses");
        assert_eq!(t.busy_ms, (100 + 5 + 50 + 3 + 20 + 2) as f64 * 10.0);
        assert_eq!(t.softirq_ms, 200.0);
        let c = CpuTime::parse(stat, Some(0), 250.0).expect("parses");
        assert_eq!(c.busy_ms, (1 + 2 + 3 + 6 + 7 + 8) as f64 * 4.0);
        assert_eq!(c.softirq_ms, 28.0);
        assert_eq!(CpuTime::parse(stat, Some(1), 100.0), None);
    }
}
