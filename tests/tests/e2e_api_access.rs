//! End-to-end tests of who may use the admin API and of its bounds: the
//! peer's credentials decide (root, `[api] admin_group`, `[api]
//! read_group`, anyone else), and an oversized body, a slow body, idle
//! connections and too many connections each get a defined answer while
//! the daemon keeps serving. Real daemon, real CLI run as other users
//! through `setpriv`. Run as root, one at a time:
//! `cargo test -p lb-tests --test e2e_api_access -- --test-threads=1`.

use std::{
    io::{Read as _, Write as _},
    os::unix::{fs::PermissionsExt as _, net::UnixStream},
    path::Path,
    time::{Duration, Instant},
};

use lb::api::types::{BackendInfo, ServiceInfo};
use lb_harness::{
    ops::{CliOutput, DaemonFiles, LbCli},
    render_config, require_root, Daemon, ServiceConfig, Topology,
};

/// Group ids the config names; no such groups need exist on the host.
const ADMIN_GID: u32 = 4001;
const READ_GID: u32 = 4002;
/// A user id that is nobody's on the host.
const USER: u32 = 4100;
/// The config's `[api] max_connections` and `request_timeout_ms`.
const MAX_CONNECTIONS: usize = 4;
const REQUEST_TIMEOUT: Duration = Duration::from_millis(1_000);

/// A daemon whose config names both groups and small bounds.
struct Api {
    // Dropped in order: daemon, files (pins included), topology.
    _daemon: Daemon,
    files: DaemonFiles,
    topo: Topology,
}

impl Api {
    fn start(prefix: &str) -> Api {
        let topo = Topology::new(prefix, 1);
        let files = DaemonFiles::new(&topo, "api");
        files.open_to_others();
        let web = ServiceConfig::web(&topo, &[0]);
        files.write_config(&format!(
            "{}\n[api]\nadmin_group = \"{ADMIN_GID}\"\nread_group = \"{READ_GID}\"\n\
             max_connections = {MAX_CONNECTIONS}\nrequest_timeout_ms = {}\n",
            render_config(&[&topo.client_host_if()], &[web]),
            REQUEST_TIMEOUT.as_millis()
        ));
        Api {
            _daemon: files.start(&[]),
            files,
            topo,
        }
    }

    fn cli(&self) -> LbCli {
        self.files.cli()
    }

    fn backend(&self, port: u16) -> String {
        format!("{}:{port}", self.topo.backend_addr(0))
    }
}

/// Asserts `out` was refused with exit 1 and one line saying `want`.
fn assert_refused(out: &CliOutput, want: &str) {
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert_eq!(out.stderr_lines().len(), 1, "{}", out.describe());
    assert!(
        out.stderr.contains(want),
        "want {want:?}: {}",
        out.describe()
    );
    assert!(out.stdout.trim().is_empty(), "{}", out.describe());
}

#[test]
fn root_admins_readers_and_outsiders_get_what_they_may() {
    require_root();
    let api = Api::start("lbq1");
    let lb = api.cli();
    let mode = std::fs::metadata(&api.files.socket)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o777,
        0o666,
        "with groups named, the checks keep users apart"
    );

    // Root: a change and a read.
    lb.ok(&["backend", "add", "web", &api.backend(8081)]);
    let services: Vec<ServiceInfo> = lb.json(&["service", "ls", "--json"]);
    assert_eq!(services.len(), 1);

    // A member of the admin group (a user with no name, in no other group).
    let admin = lb.run_as_member(
        USER,
        &[ADMIN_GID],
        &["backend", "add", "web", &api.backend(8082)],
    );
    assert!(admin.status.success(), "{}", admin.describe());
    let listed = lb.run_as_member(USER, &[ADMIN_GID], &["backend", "ls", "web", "--json"]);
    assert!(listed.status.success(), "{}", listed.describe());

    // A member of the read group: reads, no changes.
    for read in [
        vec!["service", "ls"],
        vec!["backend", "ls", "web"],
        vec!["stats"],
        vec!["status"],
    ] {
        let out = lb.run_as_member(USER, &[READ_GID], &read);
        assert!(out.status.success(), "{read:?}: {}", out.describe());
    }
    let out = lb.run_as_member(
        USER,
        &[READ_GID],
        &["backend", "drain", "web", &api.backend(8081)],
    );
    assert_refused(&out, "root and members of admin_group (gid 4001) may");

    // Anyone else: neither.
    let out = lb.run_as_member(USER, &[], &["service", "ls"]);
    assert_refused(&out, "permission denied: uid 4100 may not use lb's API");
    let out = lb.run_as_member(USER, &[], &["backend", "rm", "web", &api.backend(8081)]);
    assert_refused(&out, "permission denied");

    // What the refused calls would have changed is unchanged.
    let backends: Vec<BackendInfo> = lb.json(&["backend", "ls", "web", "--json"]);
    let mut addrs: Vec<(String, bool)> = backends
        .iter()
        .map(|b| {
            (
                b.address.clone(),
                b.state == lb::api::types::BackendState::Draining,
            )
        })
        .collect();
    addrs.sort();
    let mut want = vec![
        (api.backend(8080), false),
        (api.backend(8081), false),
        (api.backend(8082), false),
    ];
    want.sort();
    assert_eq!(addrs, want, "{backends:#?}");
}

/// Sends `head` then `body` on a fresh connection and returns the status
/// code and body of the answer (or what went wrong), within 5 s.
fn raw(socket: &Path, head: &str, body: &[u8]) -> Result<(u16, String), String> {
    let mut s = UnixStream::connect(socket).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(head.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    // The server may answer before it has read all of an oversized body.
    let _ = s.write_all(body);
    read_answer(&mut s)
}

fn read_answer(s: &mut UnixStream) -> Result<(u16, String), String> {
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                answer.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&answer);
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if body.len() >= len {
                        break;
                    }
                }
            }
            Err(e) if answer.is_empty() => return Err(format!("read: {e}")),
            Err(_) => break,
        }
    }
    let text = String::from_utf8_lossy(&answer).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status line in {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((code, body))
}

/// A connection that holds one of the daemon's slots and sends nothing.
/// The slot of a connection the test just closed may not be free yet (the
/// daemon notices the close a moment later), so one answered at once (a
/// 503) is dropped and tried again, 50 times at most.
fn held_idle(socket: &Path) -> UnixStream {
    for _ in 0..50 {
        let mut c = UnixStream::connect(socket).expect("connect");
        c.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut buf = [0u8; 512];
        match c.read(&mut buf) {
            // Nothing within 100 ms: it holds a slot.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return c
            }
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    panic!("no free slot for an idle connection after 50 tries");
}

#[test]
fn oversized_slow_idle_and_surplus_clients_get_an_answer_and_stall_nothing() {
    require_root();
    let api = Api::start("lbq2");
    let lb = api.cli();
    let path = "/v1/services/web/backends";

    // A body over 4 MiB: 413 and one line, nothing added.
    let big = vec![b' '; 5 << 20];
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: lb\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        big.len()
    );
    let (code, body) = raw(&api.files.socket, &head, &big).expect("an answer");
    assert_eq!(code, 413, "{body}");
    assert!(body.contains("larger than 4 MiB"), "{body}");

    // A body that never finishes: 408 once the request timeout passes.
    let head = format!("POST {path} HTTP/1.1\r\nhost: lb\r\ncontent-length: 100\r\n\r\n");
    let t = Instant::now();
    let (code, body) = raw(&api.files.socket, &head, b"{\"addr").expect("an answer");
    assert_eq!(code, 408, "{body}");
    assert!(t.elapsed() < REQUEST_TIMEOUT * 3, "{:?}", t.elapsed());

    // Idle connections fill every slot: one more gets a 503 at once.
    let idle: Vec<UnixStream> = (0..MAX_CONNECTIONS)
        .map(|_| held_idle(&api.files.socket))
        .collect();
    let (code, body) = raw(
        &api.files.socket,
        "GET /v1/services HTTP/1.1\r\nhost: lb\r\n\r\n",
        b"",
    )
    .expect("an answer");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("max_connections"), "{body}");

    // The idle ones are closed by the daemon within the request timeout,
    // and the CLI is served again.
    for (i, mut c) in idle.into_iter().enumerate() {
        c.set_read_timeout(Some(REQUEST_TIMEOUT * 4)).unwrap();
        let mut buf = [0u8; 512];
        let closed = c.read(&mut buf).is_ok();
        assert!(
            closed,
            "idle connection {i} still open after {:?}",
            REQUEST_TIMEOUT * 4
        );
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = lb.run(&["service", "ls", "--json"]);
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not served again: {}",
            out.describe()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let backends: Vec<BackendInfo> = lb.json(&["backend", "ls", "web", "--json"]);
    assert_eq!(backends.len(), 1, "nothing was added: {backends:#?}");
}
