//! Host state the benchmark changes, each behind a guard that undoes it:
//! iptables rules (tagged with a comment), a sysctl, extra client
//! namespaces, a bpffs pin directory; and conntrack clean-up.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use lb_harness::{
    cmd::{run, run_ok},
    netns::{list_netns, Netns},
};

/// The comment every iptables rule of the benchmark carries.
pub const RULE_TAG: &str = "lb-bench-e2e";
/// The alias of every host link the benchmark makes itself.
pub const LINK_TAG: &str = "lb-tests bench-e2e";

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_owned()
}

/// Whether nftables has table `ip NAME` (iptables-nft keeps each iptables
/// table there); `None` if `nft` cannot tell.
pub fn nft_table_exists(name: &str) -> Option<bool> {
    let out = std::process::Command::new("nft")
        .args(["list", "table", "ip", name])
        .stdin(std::process::Stdio::null())
        .output()
        .ok()?;
    Some(out.status.success())
}

/// The rules of `table` (`iptables -t T -S`), policies excluded.
pub fn rules_of(table: &str) -> Vec<String> {
    run_ok("iptables", &["-t", table, "-S"])
        .lines()
        .filter(|l| !l.starts_with("-P "))
        .map(str::to_owned)
        .collect()
}

/// iptables rules the benchmark added, deleted (last first) when dropped;
/// a table that did not exist before its first rule was added (iptables-nft
/// creates it) is deleted too once it is empty again, so that e.g. the nat
/// table's conntrack does not outlive the contender that needed it.
#[derive(Debug, Default)]
pub struct Rules {
    rules: Vec<(String, Vec<String>)>,
    created_tables: Vec<String>,
}

impl Rules {
    /// No rules yet.
    pub fn new() -> Rules {
        Rules::default()
    }

    /// Adds rule `spec` to `table` with the comment [`RULE_TAG`] (put just
    /// before `-j`): `spec` is `-A CHAIN ...`, `-I CHAIN ...` or `-I CHAIN N
    /// ...`. It is deleted when the guard is dropped.
    pub fn add(&mut self, table: &str, spec: &[&str]) {
        let (op, chain) = match spec {
            [op @ ("-A" | "-I"), chain, ..] => (*op, *chain),
            _ => panic!("rule {spec:?} must start with -A CHAIN or -I CHAIN"),
        };
        let mut body: Vec<&str> = spec[2..].to_vec();
        let mut head = vec!["-t", table, op, chain];
        if op == "-I" && body.first().is_some_and(|s| s.parse::<u32>().is_ok()) {
            head.push(body.remove(0));
        }
        let at = body.iter().position(|s| *s == "-j").unwrap_or(body.len());
        body.splice(at..at, ["-m", "comment", "--comment", RULE_TAG]);
        if !self.created_tables.iter().any(|t| t == table)
            && !self.rules.iter().any(|(t, _)| t == table)
            && nft_table_exists(table) == Some(false)
        {
            self.created_tables.push(table.to_owned());
        }
        let mut add = head.clone();
        add.extend(&body);
        run_ok("iptables", &add);
        let mut del = vec!["-t", table, "-D", chain];
        del.extend(&body);
        self.rules.push((
            table.to_owned(),
            del.iter().map(|s| (*s).to_owned()).collect(),
        ));
    }
}

impl Drop for Rules {
    fn drop(&mut self) {
        for (_, del) in self.rules.drain(..).rev() {
            let args: Vec<&str> = del.iter().map(String::as_str).collect();
            let out = run("iptables", &args);
            if !out.status.success() {
                eprintln!("warning: `iptables {}`: {}", args.join(" "), stderr(&out));
            }
        }
        for table in self.created_tables.drain(..) {
            // Only if nobody put a rule there meanwhile, and every policy
            // is still ACCEPT (deleting the table resets them).
            let listing = run("iptables", &["-t", &table, "-S"]);
            let text = String::from_utf8_lossy(&listing.stdout);
            let pristine = listing.status.success()
                && text
                    .lines()
                    .all(|l| l.starts_with("-P ") && l.ends_with(" ACCEPT"));
            if pristine {
                let out = run("nft", &["delete", "table", "ip", &table]);
                if !out.status.success() {
                    eprintln!("warning: `nft delete table ip {table}`: {}", stderr(&out));
                }
            }
        }
    }
}

/// Deletes rules tagged [`RULE_TAG`] left in `tables` by a run that was
/// killed outright.
pub fn remove_stale_rules(tables: &[&str]) {
    for table in tables {
        for rule in rules_of(table) {
            if !rule.contains(RULE_TAG) {
                continue;
            }
            let Some(rest) = rule.strip_prefix("-A ") else {
                continue;
            };
            eprintln!("removing stale rule `iptables -t {table} {rule}`");
            // The listing quotes nothing in our rules: split on spaces.
            let mut args = vec!["-t", table, "-D"];
            args.extend(rest.split_whitespace());
            let _ = run("iptables", &args);
        }
    }
}

/// A sysctl (`/proc/sys/...`) set for the benchmark and restored when dropped.
#[derive(Debug)]
pub struct Sysctl {
    path: PathBuf,
    saved: String,
}

impl Sysctl {
    /// Saves `/proc/sys/{key}` (e.g. `net/ipv4/ip_forward`) and writes `value`.
    pub fn set(key: &str, value: &str) -> Sysctl {
        let path = Path::new("/proc/sys").join(key);
        let saved = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
            .trim()
            .to_owned();
        let guard = Sysctl { path, saved };
        std::fs::write(&guard.path, value)
            .unwrap_or_else(|e| panic!("writing {value} to {}: {e}", guard.path.display()));
        guard
    }

    /// The value it restores.
    pub fn saved(&self) -> &str {
        &self.saved
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(&self.path, &self.saved) {
            eprintln!(
                "warning: restoring {} to {}: {e}",
                self.path.display(),
                self.saved
            );
        }
    }
}

/// Deletes the conntrack entries whose original source is `addr` (none
/// is fine; so is a host without conntrack loaded).
pub fn forget_conntrack(addr: Ipv4Addr) {
    let _ = run("conntrack", &["-D", "-s", &addr.to_string()]);
}

/// How many conntrack entries have original source `addr`.
pub fn conntrack_count(addr: Ipv4Addr) -> usize {
    let out = run("conntrack", &["-L", "-s", &addr.to_string()]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}

/// A client namespace of its own joined to the host by a veth, like the
/// topology's client: `{ns}` with `eth0` at `.2/24`, host side `link` at
/// `.1/24`, default route via the host. Removed when dropped.
#[derive(Debug)]
pub struct ExtraClient {
    link: String,
    subnet: [u8; 3],
    /// The namespace.
    pub ns: Netns,
}

impl ExtraClient {
    /// Creates namespace `ns` and veth `link` in subnet `subnet.0/24`.
    pub fn new(ns: &str, link: &str, subnet: [u8; 3]) -> ExtraClient {
        let _ = run("ip", &["link", "del", link]);
        let client = ExtraClient {
            link: link.to_owned(),
            subnet,
            ns: Netns::new(ns),
        };
        run_ok(
            "ip",
            &[
                "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", ns,
            ],
        );
        run_ok("ip", &["link", "set", "dev", link, "alias", LINK_TAG]);
        let host = format!("{}/24", client.host_addr());
        run_ok("ip", &["addr", "add", &host, "dev", link]);
        run_ok("ip", &["link", "set", link, "up"]);
        client.ns.ip(&["link", "set", "lo", "up"]);
        let own = format!("{}/24", client.addr());
        client.ns.ip(&["addr", "add", &own, "dev", "eth0"]);
        client.ns.ip(&["link", "set", "eth0", "up"]);
        client.ns.ip(&[
            "route",
            "add",
            "default",
            "via",
            &client.host_addr().to_string(),
        ]);
        client
    }

    /// The client's address, `subnet.2`.
    pub fn addr(&self) -> Ipv4Addr {
        let [a, b, c] = self.subnet;
        Ipv4Addr::new(a, b, c, 2)
    }

    /// The host's address on the link, `subnet.1`.
    pub fn host_addr(&self) -> Ipv4Addr {
        let [a, b, c] = self.subnet;
        Ipv4Addr::new(a, b, c, 1)
    }

    /// The host side of the veth.
    pub fn link(&self) -> &str {
        &self.link
    }
}

impl Drop for ExtraClient {
    fn drop(&mut self) {
        let out = run("ip", &["link", "del", &self.link]);
        let err = stderr(&out);
        if !out.status.success() && !err.contains("Cannot find device") {
            eprintln!("warning: `ip link del {}`: {err}", self.link);
        }
        // The namespace goes next (its field's drop).
    }
}

/// Deletes namespaces and links named like the benchmark's extra clients
/// (`names`: (namespace, link)) left by a run killed outright, and refuses
/// (panics) if one of `subnets` is held by a link the benchmark did not
/// make.
pub fn remove_stale_clients(names: &[(String, String)], subnets: &[[u8; 3]]) {
    let namespaces = list_netns();
    for (ns, link) in names {
        if namespaces.iter().any(|n| n == ns) {
            eprintln!("removing stale namespace {ns}");
            let _ = run("ip", &["netns", "del", ns]);
        }
        if Path::new("/sys/class/net").join(link).exists() {
            eprintln!("removing stale link {link}");
            let _ = run("ip", &["link", "del", link]);
        }
    }
    let out = run("ip", &["-o", "-4", "addr", "show"]);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(ifname), Some(cidr)) = (f.get(1), f.get(3)) else {
            continue;
        };
        let Some(Ok(addr)) = cidr.split('/').next().map(str::parse::<Ipv4Addr>) else {
            continue;
        };
        let o = addr.octets();
        if !subnets.contains(&[o[0], o[1], o[2]]) {
            continue;
        }
        let alias =
            std::fs::read_to_string(format!("/sys/class/net/{ifname}/ifalias")).unwrap_or_default();
        if alias.trim() == LINK_TAG {
            eprintln!("removing stale link {ifname} ({cidr})");
            let _ = run("ip", &["link", "del", ifname]);
        } else {
            panic!(
                "{cidr} is on {ifname}, which the benchmark did not create; \
                 the end-to-end benchmark needs that subnet"
            );
        }
    }
}

/// A bpffs directory for the benchmark's `lb` (`datapath.pin_path`),
/// removed before use (a killed run's leftovers) and when dropped.
#[derive(Debug)]
pub struct PinPath {
    path: PathBuf,
}

impl PinPath {
    /// A guard for `/sys/fs/bpf/{name}`.
    pub fn new(name: &str) -> PinPath {
        assert!(name.starts_with("lb-bench-") && !name.contains('/'));
        let p = PinPath {
            path: Path::new("/sys/fs/bpf").join(name),
        };
        p.remove();
        p
    }

    /// The directory, as the config file wants it.
    pub fn as_str(&self) -> &str {
        self.path.to_str().expect("UTF-8 pin path")
    }

    /// Whether it exists.
    pub fn exists(&self) -> bool {
        self.path.exists()
    }

    fn remove(&self) {
        if self.path.exists() {
            if let Err(e) = std::fs::remove_dir_all(&self.path) {
                eprintln!("warning: removing {}: {e}", self.path.display());
            }
        }
    }
}

impl Drop for PinPath {
    fn drop(&mut self) {
        self.remove();
    }
}
