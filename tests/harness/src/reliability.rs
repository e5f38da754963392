//! The balancer's worst days, under load ([`crate::load`]): the daemon
//! killed and started again ([`daemon_restart`]), the Docker engine
//! restarted with `live-restore` ([`engine_restart`]), and a rolling update
//! of a service's containers ([`rolling_update`]). Each scenario
//! returns what happened; the end-to-end tests assert that no request
//! failed and nothing changed that should not have, and `cargo xtask bench`
//! reports the same counts in its reliability section.
//!
//! [`DockerRig`] is the daemon of the Docker scenarios: one topology (a
//! client namespace), `lb run` following the engine, and two services on
//! the topology's VIP, `web` (port [`WEB_PORT`]) filled by containers
//! labelled `lb.service=web`, `lb.port=8080` ([`labelled`]), and `echo`
//! (port [`ECHO_PORT`]) by the image rule [`IMAGE`] on 9000, which takes the
//! containers without a label ([`unlabelled`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    process::ExitStatus,
    thread,
    time::{Duration, Instant},
};

use aya::maps::{Array, HashMap, Map, MapData};
use lb::api::types::{BackendInfo, BackendState, Event, EventKind, Status};
use lb_common::{maps, Backend, ServiceKey, ServiceValue, BACKEND_DOWN};

use crate::{
    attach::attachments,
    config_files::{render_config, ServiceConfig},
    docker_engine::{http_name_cmd_draining, Container, Engine, RunOpts, IMAGE},
    forward::ForwardDrop,
    lb_process::Daemon,
    load::{self, Load, LoadReport},
    ops::{stop_with_output, DaemonFiles, Follower, LbCli},
    servers::HttpServer,
    stream::StreamServer,
    topology::Topology,
};

/// `web`'s port on the VIP.
pub const WEB_PORT: u16 = 80;
/// `echo`'s port on the VIP, and the containers' stream server's port.
pub const ECHO_PORT: u16 = 9000;
/// How long a change in the engine may take to show in `lb backend ls`
/// (bounded polling: figures are measured by the benchmark, not here).
pub const SETTLE: Duration = Duration::from_secs(15);
/// How long the change log is watched after the engine is back, for a
/// change the resync would make.
const QUIET: Duration = Duration::from_secs(1);

/// The command of every container of the rig: HTTP on 8080 answering the
/// container's name, and on [`ECHO_PORT`] a stream server that greets each
/// connection with the name, then echoes.
pub fn http_and_echo_cmd() -> Vec<String> {
    [
        "sh",
        "-c",
        "echo -n $(hostname) > /www/index.html; \
         nc -ll -p 9000 -e sh -c 'hostname; exec cat' & \
         exec httpd -f -p 8080 -h /www",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// A container that joins `web` by its labels.
pub fn labelled() -> RunOpts {
    RunOpts::default()
        .cmd(http_and_echo_cmd())
        .label("lb.service", "web")
        .label("lb.port", "8080")
}

/// A container that joins `echo` by the image rule.
pub fn unlabelled() -> RunOpts {
    RunOpts::default().cmd(http_and_echo_cmd())
}

/// `lb run` following the Docker engine, with `web` and `echo` (see the
/// module docs). Declare it after the [`Engine`] and before the containers
/// and the [`Daemon`], so that they go first.
#[derive(Debug)]
pub struct DockerRig {
    /// Config, state, socket, pins.
    pub files: DaemonFiles,
    /// The client namespace and the VIP.
    pub topo: Topology,
}

impl DockerRig {
    /// A topology named `prefix` (no backend namespaces: the containers are
    /// the backends) and the daemon's files.
    pub fn new(prefix: &str) -> DockerRig {
        let topo = Topology::new(prefix, 0);
        let files = DaemonFiles::new(&topo, "docker");
        let vip = topo.vip();
        files.write_config(&format!(
            "[datapath]\nexternal = [\"{ext}\"]\n\n[docker]\nenabled = true\n\n\
             [[service]]\nname = \"web\"\nvip = \"{vip}:{WEB_PORT}\"\n\n\
             [[service]]\nname = \"echo\"\nvip = \"{vip}:{ECHO_PORT}\"\n\
             image = \"{IMAGE}\"\ntarget_port = {ECHO_PORT}\n",
            ext = topo.client_host_if()
        ));
        DockerRig { files, topo }
    }

    /// Starts `lb run` (plus `extra`) and waits until it is ready.
    pub fn start(&self, extra: &[&str]) -> Daemon {
        self.files.start(extra)
    }

    /// The admin CLI.
    pub fn cli(&self) -> LbCli {
        self.files.cli()
    }

    /// `web` on the VIP.
    pub fn web(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.topo.vip(), WEB_PORT)
    }

    /// `echo` on the VIP.
    pub fn echo(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.topo.vip(), ECHO_PORT)
    }

    /// `service`'s backends as `lb backend ls` lists them.
    pub fn backends(&self, service: &str) -> Vec<BackendInfo> {
        self.cli().json(&["backend", "ls", service, "--json"])
    }

    /// Who serves what: one line per backend of `web` and `echo`, its
    /// service, address, container, state and weight.
    pub fn membership(&self) -> BTreeSet<String> {
        ["web", "echo"]
            .into_iter()
            .flat_map(|s| {
                self.backends(s).into_iter().map(move |b| {
                    format!(
                        "{s} {} {} {:?} weight {}",
                        b.address,
                        b.container.as_deref().unwrap_or("-"),
                        b.state,
                        b.weight
                    )
                })
            })
            .collect()
    }

    /// Waits (up to [`SETTLE`]) until `service`'s active containers are
    /// exactly `want`; panics with its backends and the daemon's log if not.
    pub fn wait_active(&self, daemon: &Daemon, service: &str, want: &BTreeSet<String>) {
        let end = Instant::now() + SETTLE;
        loop {
            let backends = self.backends(service);
            let now: BTreeSet<String> = backends
                .iter()
                .filter(|b| b.state == BackendState::Active)
                .filter_map(|b| b.container.clone())
                .collect();
            if &now == want {
                return;
            }
            assert!(
                Instant::now() < end,
                "{service}'s active containers are {now:?}, not {want:?}, after {SETTLE:?}; \
                 backends: {backends:#?}\ndaemon output:\n{}",
                daemon.output()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the daemon's pinned maps hold now.
    pub fn maps(&self) -> MapsSnapshot {
        MapsSnapshot::read(self.files.pins.path())
    }

    /// The Docker engine's connection as `lb status` shows it.
    pub fn docker_status(&self) -> String {
        self.cli().json::<Status>(&["status", "--json"]).docker
    }

    /// Waits (up to `limit`) until `lb status` shows a Docker connection
    /// that starts with `prefix`; the last status seen either way.
    pub fn wait_docker_status(&self, prefix: &str, limit: Duration) -> String {
        let end = Instant::now() + limit;
        loop {
            let status = self.docker_status();
            if status.starts_with(prefix) || Instant::now() >= end {
                return status;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The names of `cs`.
pub fn names(cs: &[Container]) -> BTreeSet<String> {
    cs.iter().map(|c| c.name().to_owned()).collect()
}

/// What a daemon's pinned maps hold: every service entry (its id and
/// which table copy is active) and every backend entry that is not down
/// (its id, address, service and state). A backend removed and added again
/// gets another id (freed ids cool down for a minute), and a Maglev rebuild
/// flips the active copy: equal snapshots mean neither happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapsSnapshot {
    /// (VIP, port, protocol) → (service id, active table base, table size).
    pub services: BTreeMap<(Ipv4Addr, u16, u8), (u32, u32, u32)>,
    /// Backend id → (address, service id, state, interface index).
    pub backends: BTreeMap<u32, (SocketAddrV4, u32, u32, u32)>,
}

impl MapsSnapshot {
    /// Reads the maps pinned under `pin_path` (in the one layout directory
    /// there); panics if they cannot be read.
    pub fn read(pin_path: &Path) -> MapsSnapshot {
        let dir = layout_dir(pin_path);
        let open = |name: &str| {
            let data = MapData::from_pin(dir.join(name))
                .unwrap_or_else(|e| panic!("opening pinned map {name}: {e}"));
            Map::from_map_data(data).unwrap_or_else(|e| panic!("pinned map {name}: {e}"))
        };
        let services: HashMap<MapData, ServiceKey, ServiceValue> =
            HashMap::try_from(open(maps::SERVICES)).expect("LB_SERVICES is a hash");
        let services = services
            .iter()
            .map(|kv| {
                let (k, v) = kv.unwrap_or_else(|e| panic!("reading LB_SERVICES: {e}"));
                (
                    (
                        Ipv4Addr::from(u32::from_be(k.addr)),
                        u16::from_be(k.port),
                        k.proto,
                    ),
                    (v.id, v.table_base, v.table_size),
                )
            })
            .collect();
        let backends: Array<MapData, Backend> =
            Array::try_from(open(maps::BACKENDS)).expect("LB_BACKENDS is an array");
        let backends = backends
            .iter()
            .enumerate()
            .filter_map(|(id, b)| {
                let b = b.unwrap_or_else(|e| panic!("reading LB_BACKENDS: {e}"));
                (b.state != BACKEND_DOWN).then(|| {
                    let addr = SocketAddrV4::new(
                        Ipv4Addr::from(u32::from_be(b.addr)),
                        u16::from_be(b.port),
                    );
                    let id = u32::try_from(id).expect("a backend id fits u32");
                    (id, (addr, b.service_id, b.state, b.ifindex))
                })
            })
            .collect();
        MapsSnapshot { services, backends }
    }
}

/// The one layout directory (`abi…`) under `pin_path`.
fn layout_dir(pin_path: &Path) -> PathBuf {
    std::fs::read_dir(pin_path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", pin_path.display()))
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("abi"))
        })
        .unwrap_or_else(|| panic!("no pinned data path under {}", pin_path.display()))
}

/// The change log as `lb events --json` prints it, from the daemon's
/// first event on.
#[derive(Debug)]
pub struct EventFeed(Follower);

impl EventFeed {
    /// Follows the daemon behind `cli` from its first event.
    pub fn follow(cli: &LbCli) -> EventFeed {
        EventFeed(cli.follow(&["events", "--json", "--since", "0"]))
    }

    /// Every event printed so far (a quiet stream's empty lines skipped).
    pub fn events(&self) -> Vec<Event> {
        self.0
            .lines()
            .iter()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not an event ({e}): {l}")))
            .collect()
    }

    /// Waits (up to `limit`) until an event of `kind` numbered above
    /// `after` was printed; every event so far. Panics if none comes.
    pub fn wait_kind(&self, kind: EventKind, after: u64, limit: Duration) -> Vec<Event> {
        let end = Instant::now() + limit;
        loop {
            let events = self.events();
            if events
                .iter()
                .any(|e| e.seq > after && e.change.kind == kind)
            {
                return events;
            }
            assert!(
                Instant::now() < end,
                "no {kind:?} event after #{after} within {limit:?}; events: {events:#?}"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The number of the last event printed (0: none yet).
    pub fn last_seq(&self) -> u64 {
        self.events().last().map_or(0, |e| e.seq)
    }
}

/// Containers of each service in [`engine_restart`].
pub const RESTART_CONTAINERS: usize = 3;
/// Held connections to `echo` in [`engine_restart`].
pub const RESTART_HELD: usize = 6;

/// What [`engine_restart`] saw.
#[derive(Debug)]
pub struct EngineRestart {
    /// The load through the restart.
    pub load: LoadReport,
    /// Who served what before the restart and after the resync
    /// ([`DockerRig::membership`]).
    pub before: BTreeSet<String>,
    /// The same, after.
    pub after: BTreeSet<String>,
    /// The pinned maps before and after.
    pub maps_before: MapsSnapshot,
    /// The same, after.
    pub maps_after: MapsSnapshot,
    /// Every event published from the engine's stop until a second after
    /// the daemon reconnected.
    pub events: Vec<Event>,
    /// `lb status`'s Docker line while the engine was away.
    pub status_away: String,
    /// From the engine's stop to its answering again.
    pub engine_away: Duration,
    /// From the engine's stop to the daemon's `docker_connected` event.
    pub reconnected_after: Duration,
    /// The daemon's log.
    pub daemon_output: String,
}

/// Docker's `live-restore` under load: an engine with it on, a daemon
/// following it, [`RESTART_CONTAINERS`] containers in `web` (with a health
/// check; HTTP requests through the VIP) and as many in `echo` ([`RESTART_HELD`] connections
/// held through the VIP). `dockerd` is stopped and started again (as a
/// user would, e.g. for its own upgrade) while the load runs; the scenario
/// waits for the daemon to reconnect and a second more. Container names
/// and the topology start with `prefix`.
pub fn engine_restart(prefix: &str) -> EngineRestart {
    let mut engine = Engine::ensure();
    engine.live_restore();
    let rig = DockerRig::new(prefix);
    // With a health check, as production containers have, and Docker's
    // default of 3 retries: the engine counts a probe its own shutdown cut
    // short as a failure, which with 1 retry alone reports the container
    // unhealthy after the restart (and lb drains it until the next probe
    // passes, as it must for a container the engine calls unhealthy).
    let web: Vec<Container> = (1..=RESTART_CONTAINERS)
        .map(|i| {
            let mut opts = labelled().health(
                "wget -q -O /dev/null http://127.0.0.1:8080/",
                Duration::from_millis(200),
            );
            opts.health_retries = 3;
            engine.run(&format!("{prefix}-w{i}"), opts)
        })
        .collect();
    let echo: Vec<Container> = (1..=RESTART_CONTAINERS)
        .map(|i| engine.run(&format!("{prefix}-e{i}"), unlabelled()))
        .collect();
    let daemon = rig.start(&[]);
    rig.wait_active(&daemon, "web", &names(&web));
    rig.wait_active(&daemon, "echo", &names(&echo));
    let feed = EventFeed::follow(&rig.cli());
    let connected = feed.wait_kind(EventKind::DockerConnected, 0, SETTLE);
    let last = connected.last().map_or(0, |e| e.seq);
    let before = rig.membership();
    let maps_before = rig.maps();

    let load = Load {
        http: rig.web(),
        held: Some((rig.echo(), RESTART_HELD)),
    };
    let ((status_away, engine_away, reconnected_after), load) =
        load::around(&rig.topo.client, &load, |running| {
            let stopped = Instant::now();
            engine.stop();
            let status_away = rig.wait_docker_status("disconnected", SETTLE);
            // Requests go on being answered while no engine runs.
            running.wait_answers(20);
            engine.start();
            let engine_away = stopped.elapsed();
            feed.wait_kind(EventKind::DockerConnected, last, SETTLE);
            let reconnected_after = stopped.elapsed();
            thread::sleep(QUIET);
            (status_away, engine_away, reconnected_after)
        });
    let after = rig.membership();
    let maps_after = rig.maps();
    let events = feed.events().into_iter().filter(|e| e.seq > last).collect();
    EngineRestart {
        load,
        before,
        after,
        maps_before,
        maps_after,
        events,
        status_away,
        engine_away,
        reconnected_after,
        daemon_output: daemon.output(),
    }
}

/// Containers replaced one by one in [`rolling_update`].
pub const ROLLING_CONTAINERS: usize = 3;

/// What [`rolling_update`] saw.
#[derive(Debug)]
pub struct RollingUpdate {
    /// The load through the update.
    pub load: LoadReport,
    /// The containers replaced, by name.
    pub old: Vec<String>,
    /// Their replacements, by name.
    pub new: Vec<String>,
    /// The daemon's log.
    pub daemon_output: String,
}

/// A rolling update under load: [`ROLLING_CONTAINERS`] containers in `web`,
/// each replaced in turn (a new one started and serving, then the old one
/// `docker stop`ped) while HTTP requests go through the VIP. Their servers
/// finish on SIGTERM as real ones do (answering for a second, then
/// exiting: [`http_name_cmd_draining`]), and they have a health check, as a
/// rolling update needs: a new container whose server is not listening yet
/// joins drained ("health: starting") and takes new flows only once it
/// answers. Container names and the topology start with `prefix`.
pub fn rolling_update(prefix: &str) -> RollingUpdate {
    let engine = Engine::ensure();
    let rig = DockerRig::new(prefix);
    let opts = || {
        labelled().cmd(http_name_cmd_draining()).health(
            "wget -q -O /dev/null http://127.0.0.1:8080/",
            Duration::from_millis(200),
        )
    };
    let old: Vec<Container> = (1..=ROLLING_CONTAINERS)
        .map(|i| engine.run(&format!("{prefix}-a{i}"), opts()))
        .collect();
    let daemon = rig.start(&[]);
    let mut live = names(&old);
    rig.wait_active(&daemon, "web", &live);
    let load = Load {
        http: rig.web(),
        held: None,
    };
    let (new, load) = load::around(&rig.topo.client, &load, |_| {
        let mut new = Vec::new();
        for (i, c) in old.iter().enumerate() {
            let n = engine.run(&format!("{prefix}-b{}", i + 1), opts());
            live.insert(n.name().to_owned());
            rig.wait_active(&daemon, "web", &live);
            c.stop(10);
            live.remove(c.name());
            rig.wait_active(&daemon, "web", &live);
            new.push(n);
        }
        new
    });
    RollingUpdate {
        load,
        old: old.iter().map(|c| c.name().to_owned()).collect(),
        new: new.iter().map(|c| c.name().to_owned()).collect(),
        daemon_output: daemon.output(),
    }
}

/// `web`'s and the backends' HTTP port in [`daemon_restart`].
const HTTP_PORT: u16 = 8080;
/// The stream service's port, on the VIP and on the backends, in
/// [`daemon_restart`].
const STREAM_PORT: u16 = 7000;

/// How the first daemon of [`daemon_restart`] ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// `lb run --keep-datapath`, then SIGTERM: a planned restart.
    KeepDatapath,
    /// A plain `lb run`, then SIGKILL: a crash.
    Crash,
}

/// What [`daemon_restart`] saw.
#[derive(Debug)]
pub struct DaemonRestart {
    /// The load through the restart: HTTP requests to `web` and one
    /// connection held to `stream`.
    pub load: LoadReport,
    /// Requests answered while no daemon ran.
    pub answered_without_daemon: usize,
    /// The first daemon's exit status (SIGTERM; none for a crash, which is
    /// a SIGKILL) and its log.
    pub first_exit: Option<ExitStatus>,
    /// The first daemon's log.
    pub first_output: String,
    /// The first daemon still ran after its SIGKILL.
    pub first_survived_kill: bool,
    /// Whether the second daemon's `lb status` says it adopted the data path.
    pub adopted: bool,
    /// The second daemon's exit status on SIGTERM, and its log.
    pub second_exit: ExitStatus,
    /// The second daemon's log.
    pub second_output: String,
    /// What was left under the pin path after the second daemon's plain
    /// stop: `None` when the directory itself is gone, as it must be.
    pub pins_left: Option<Vec<PathBuf>>,
    /// What was left attached to the topology's interfaces then.
    pub attached_left: Vec<String>,
}

/// A daemon restarted under load, over backend namespaces with real
/// servers: `web` (HTTP, port 80 on the VIP) and `stream` (echo, port
/// 7000). The first daemon is ended as `ending` says while HTTP requests
/// go on and a connection is held; a second or more with no daemon; then a
/// plain second `lb run`, which must take over what the first left pinned.
/// The topology is named `prefix`.
pub fn daemon_restart(prefix: &str, ending: Ending) -> DaemonRestart {
    let topo = Topology::new(prefix, 2);
    let n = topo.backend_count();
    let _http: Vec<HttpServer> = (0..n)
        .map(|i| HttpServer::start(&topo.backends[i], HTTP_PORT, &format!("b{i}")))
        .collect();
    let _streams: Vec<StreamServer> = (0..n)
        .map(|i| StreamServer::start(&topo.backends[i], STREAM_PORT, &format!("b{i}")))
        .collect();
    let _forward = ForwardDrop::new();
    let files = DaemonFiles::new(&topo, "ops");
    let endpoints = |port: u16| -> Vec<String> {
        (0..n)
            .map(|i| format!("{}:{port}", topo.backend_addr(i)))
            .collect()
    };
    let vip = topo.vip();
    files.write_config(&render_config(
        &[&topo.client_host_if()],
        &[
            ServiceConfig::new(
                "stream",
                &format!("{vip}:{STREAM_PORT}"),
                "tcp",
                &endpoints(STREAM_PORT),
            ),
            ServiceConfig::new(
                "web",
                &format!("{vip}:{WEB_PORT}"),
                "tcp",
                &endpoints(HTTP_PORT),
            ),
        ],
    ));
    let mut first = match ending {
        Ending::KeepDatapath => files.start(&["--keep-datapath"]),
        Ending::Crash => files.start(&[]),
    };
    let load = Load {
        http: SocketAddrV4::new(vip, WEB_PORT),
        held: Some((SocketAddrV4::new(vip, STREAM_PORT), 1)),
    };
    let (during, load) = load::around(&topo.client, &load, |running| {
        // A second of load with the first daemon.
        thread::sleep(Duration::from_secs(1));
        let (first_exit, first_output, first_survived_kill) = match ending {
            Ending::KeepDatapath => {
                let (status, out) = stop_with_output(first);
                (Some(status), out, false)
            }
            Ending::Crash => {
                first.kill();
                let survived = first.is_running();
                (None, first.output(), survived)
            }
        };
        let gap = running.answered();
        thread::sleep(Duration::from_secs(1));
        running.wait_answers(1);
        let answered_without_daemon = running.answered() - gap;
        let second = files.start(&[]);
        thread::sleep(Duration::from_secs(1));
        (
            first_exit,
            first_output,
            first_survived_kill,
            answered_without_daemon,
            second,
        )
    });
    let (first_exit, first_output, first_survived_kill, answered_without_daemon, second) = during;
    let adopted = files.cli().json::<Status>(&["status", "--json"]).adopted;
    let (second_exit, second_output) = stop_with_output(second);
    let mut ifaces = vec![topo.client_host_if()];
    ifaces.extend((0..n).map(|i| topo.backend_host_if(i)));
    let attached_left = ifaces
        .iter()
        .map(|i| attachments(i))
        .filter(|a| !a.is_empty())
        .map(|a| a.to_string())
        .collect();
    DaemonRestart {
        load,
        answered_without_daemon,
        first_exit,
        first_output,
        first_survived_kill,
        adopted,
        second_exit,
        second_output,
        pins_left: files.pins.exists().then(|| files.pins.listing()),
        attached_left,
    }
}
