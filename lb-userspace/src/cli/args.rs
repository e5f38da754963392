//! The command line as clap types: `lb run` and the admin commands.
//!
//! The CLI only checks what clap checks by type (numbers, ports, enums,
//! required arguments); everything else is the daemon's to judge, so the
//! rules live in one place and `curl` users get the same answers.

use std::{path::PathBuf, time::Duration};

use clap::{builder::NonEmptyStringValueParser, Args, Parser, Subcommand, ValueEnum};

use crate::{
    api::{
        server::DEFAULT_SOCKET,
        types::{CheckKind, Forwarding, HealthCheck, NewBackend, NewService, Protocol},
    },
    daemon::RunArgs,
};

/// XDP/TC load balancer: DNAT to backends held in BPF maps.
#[derive(Debug, Parser)]
#[command(name = "lb", version, about)]
pub struct Cli {
    /// The daemon's admin API socket.
    // Same id as `lb run --socket`: clap then shares the value instead of
    // adding a second `--socket` to `run`, so `lb --socket P run` works too.
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        default_value = DEFAULT_SOCKET
    )]
    pub socket: PathBuf,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon in the foreground: load and attach the data path, keep
    /// its maps in step with the config, detach on SIGINT/SIGTERM.
    Run(RunArgs),
    /// The admin commands, clients of a running daemon.
    #[command(flatten)]
    Admin(Admin),
}

/// Commands that talk to a running daemon (and `completions`).
#[derive(Debug, Subcommand)]
pub enum Admin {
    /// Add, remove and list services.
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Add, remove, drain and list a service's backends.
    #[command(subcommand)]
    Backend(BackendCommand),
    /// Packets, bytes, new and active flows per service and backend.
    Stats(StatsArgs),
    /// Version, uptime, interfaces, map fill levels, Docker state.
    Status(JsonArg),
    /// Follow the daemon's changes as they happen, one line per event
    /// (services, backends up/down/draining and why, Docker, the daemon);
    /// ends when the daemon stops, or on Ctrl-C.
    Events(EventsArgs),
    /// Print shell completions for lb.
    Completions(CompletionsArgs),
}

/// `lb service …`.
#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// Add a service.
    Add(ServiceAdd),
    /// Remove a service added through the API (config services are removed
    /// by editing the config).
    #[command(visible_alias = "remove")]
    Rm {
        /// The service's name.
        #[arg(value_parser = NonEmptyStringValueParser::new())]
        name: String,
    },
    /// List services.
    #[command(visible_alias = "list")]
    Ls(JsonArg),
}

/// `lb backend …`.
#[derive(Debug, Subcommand)]
pub enum BackendCommand {
    /// Add backends to a service, all or none.
    Add(BackendAdd),
    /// Replace a service's backends with these, all or none: the others
    /// leave (their flows move), the ones that stay keep their flows.
    Set(BackendSet),
    /// Remove a backend: its flows move to other backends.
    #[command(visible_alias = "remove")]
    Rm(BackendRef),
    /// Drain a backend: it keeps its flows and takes no new ones.
    Drain(BackendRef),
    /// Put a drained backend back: it takes new flows again.
    Undrain(BackendRef),
    /// Change a backend's weight in place; no established flow moves.
    Weight(BackendWeight),
    /// List a service's backends.
    #[command(visible_alias = "list")]
    Ls(BackendLs),
}

/// `--json`.
#[derive(Debug, Args)]
pub struct JsonArg {
    /// Print the admin API's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Transport protocol of a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl From<Proto> for Protocol {
    fn from(p: Proto) -> Self {
        match p {
            Proto::Tcp => Protocol::Tcp,
            Proto::Udp => Protocol::Udp,
        }
    }
}

/// Kind of active health check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum HealthKind {
    /// A TCP connection to the backend.
    Tcp,
    /// An HTTP GET of --health-path that answers --health-status.
    Http,
    /// A UDP datagram of --health-payload that gets any answer.
    Udp,
}

impl From<HealthKind> for CheckKind {
    fn from(k: HealthKind) -> Self {
        match k {
            HealthKind::Tcp => CheckKind::Tcp,
            HealthKind::Http => CheckKind::Http,
            HealthKind::Udp => CheckKind::Udp,
        }
    }
}

/// How a service's packets reach its backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ForwardingMode {
    /// Destination NAT, replies back through the balancer.
    Nat,
    /// Direct server return: backends hold the VIP and answer clients
    /// directly; their port must be the VIP's.
    Dsr,
}

impl From<ForwardingMode> for Forwarding {
    fn from(m: ForwardingMode) -> Self {
        match m {
            ForwardingMode::Nat => Forwarding::Nat,
            ForwardingMode::Dsr => Forwarding::Dsr,
        }
    }
}

/// `lb service add`.
#[derive(Debug, Args)]
pub struct ServiceAdd {
    /// Unique name of the service.
    #[arg(value_parser = NonEmptyStringValueParser::new())]
    pub name: String,
    /// Address and port clients connect to.
    #[arg(long, value_name = "IP:PORT")]
    pub vip: String,
    /// Transport protocol [default: tcp].
    #[arg(long, value_enum)]
    pub proto: Option<Proto>,
    /// Maglev table size, a prime [default: the daemon's].
    #[arg(long, value_name = "M")]
    pub table_size: Option<u32>,
    /// How packets reach the backends [default: nat].
    #[arg(long, value_enum, value_name = "MODE")]
    pub forwarding: Option<ForwardingMode>,
    /// Docker containers of this image join the service as backends.
    #[arg(long, value_name = "IMAGE")]
    pub image: Option<String>,
    /// The containers' port for --image.
    #[arg(long, value_name = "PORT")]
    pub target_port: Option<u16>,
    /// Check backends actively; a failing backend takes no flows.
    #[arg(long, value_enum, value_name = "KIND")]
    pub health: Option<HealthKind>,
    /// Milliseconds between checks of one backend [default: 1000].
    #[arg(long, value_name = "MS", requires = "health")]
    pub health_interval: Option<u64>,
    /// Milliseconds a check may take [default: 500].
    #[arg(long, value_name = "MS", requires = "health")]
    pub health_timeout: Option<u64>,
    /// Passed checks in a row that bring a backend back [default: 2].
    #[arg(long, value_name = "N", requires = "health")]
    pub health_rise: Option<u32>,
    /// Failed checks in a row that take a backend out [default: 3].
    #[arg(long, value_name = "N", requires = "health")]
    pub health_fall: Option<u32>,
    /// HTTP check: the path asked for [default: /].
    #[arg(long, value_name = "PATH", requires = "health")]
    pub health_path: Option<String>,
    /// HTTP check: the status that passes [default: 200].
    #[arg(long, value_name = "CODE", requires = "health")]
    pub health_status: Option<u16>,
    /// UDP check: what is sent (any answer passes).
    #[arg(long, value_name = "TEXT", requires = "health")]
    pub health_payload: Option<String>,
}

impl ServiceAdd {
    /// The request body: options as given, health check defaults from
    /// [`HealthCheck::default`].
    pub fn to_request(&self) -> NewService {
        // Path, status and payload go as given: the daemon fills in the
        // defaults and refuses one that does not go with the kind.
        let health = self.health.map(|kind| {
            let d = HealthCheck::default();
            HealthCheck {
                kind: kind.into(),
                interval_ms: self.health_interval.unwrap_or(d.interval_ms),
                timeout_ms: self.health_timeout.unwrap_or(d.timeout_ms),
                rise: self.health_rise.unwrap_or(d.rise),
                fall: self.health_fall.unwrap_or(d.fall),
                path: self.health_path.clone(),
                status: self.health_status,
                payload: self.health_payload.clone(),
            }
        });
        NewService {
            name: self.name.clone(),
            vip: self.vip.clone(),
            protocol: self.proto.map(Into::into),
            table_size: self.table_size,
            image: self.image.clone(),
            target_port: self.target_port,
            health,
            forwarding: self.forwarding.map(Into::into),
        }
    }
}

/// `lb backend add`.
#[derive(Debug, Args)]
pub struct BackendAdd {
    /// The service's name.
    #[arg(value_parser = NonEmptyStringValueParser::new())]
    pub service: String,
    /// The backends' addresses and ports.
    #[arg(value_name = "IP:PORT", required = true, value_parser = NonEmptyStringValueParser::new())]
    pub addresses: Vec<String>,
    /// Relative share of new flows of each [default: 1].
    #[arg(long, value_name = "N")]
    pub weight: Option<u32>,
}

impl BackendAdd {
    /// The request body.
    pub fn to_request(&self) -> Vec<NewBackend> {
        new_backends(&self.addresses, self.weight)
    }
}

/// `lb backend set`.
#[derive(Debug, Args)]
pub struct BackendSet {
    /// The service's name.
    #[arg(value_parser = NonEmptyStringValueParser::new())]
    pub service: String,
    /// The backends' addresses and ports; none empties the service.
    #[arg(value_name = "IP:PORT", value_parser = NonEmptyStringValueParser::new())]
    pub addresses: Vec<String>,
    /// Relative share of new flows of each [default: 1].
    #[arg(long, value_name = "N")]
    pub weight: Option<u32>,
}

impl BackendSet {
    /// The request body.
    pub fn to_request(&self) -> Vec<NewBackend> {
        new_backends(&self.addresses, self.weight)
    }
}

fn new_backends(addresses: &[String], weight: Option<u32>) -> Vec<NewBackend> {
    addresses
        .iter()
        .map(|a| NewBackend {
            address: a.clone(),
            weight,
        })
        .collect()
}

/// `lb backend weight`.
#[derive(Debug, Args)]
pub struct BackendWeight {
    /// The service's name.
    #[arg(value_parser = NonEmptyStringValueParser::new())]
    pub service: String,
    /// The backend's address and port.
    #[arg(value_name = "IP:PORT", value_parser = NonEmptyStringValueParser::new())]
    pub address: String,
    /// Its new relative share of new flows (at least 1).
    #[arg(value_name = "N")]
    pub weight: u32,
}

/// A backend of a service, for `rm`, `drain` and `undrain`.
#[derive(Debug, Args)]
pub struct BackendRef {
    /// The service's name.
    #[arg(value_parser = NonEmptyStringValueParser::new())]
    pub service: String,
    /// The backend's address and port.
    #[arg(value_name = "IP:PORT", value_parser = NonEmptyStringValueParser::new())]
    pub address: String,
}

/// `lb backend ls`.
#[derive(Debug, Args)]
pub struct BackendLs {
    /// The service's name.
    #[arg(value_parser = NonEmptyStringValueParser::new())]
    pub service: String,
    /// `--json`.
    #[command(flatten)]
    pub json: JsonArg,
}

/// `lb stats`.
#[derive(Debug, Args)]
pub struct StatsArgs {
    /// Only this service (and no data path totals).
    #[arg(value_parser = NonEmptyStringValueParser::new())]
    pub service: Option<String>,
    /// Print the admin API's JSON instead of a table; with --watch one
    /// object per line from the second snapshot on, each service and
    /// backend with its `rates` and the whole with `interval_secs`.
    #[arg(long)]
    pub json: bool,
    /// Refresh every interval and show rates (packets/s, bytes/s, new
    /// flows/s) over the last interval; Ctrl-C ends it.
    #[arg(long)]
    pub watch: bool,
    /// Seconds between refreshes of --watch, fractions allowed [default: 1].
    #[arg(long, value_name = "SECS", requires = "watch", value_parser = parse_interval)]
    pub interval: Option<Duration>,
}

/// `lb events`.
#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Print each event as the API's JSON, one object per line.
    #[arg(long)]
    pub json: bool,
    /// First replay the events after this sequence number that the daemon
    /// still keeps (0: all it keeps), then follow; a line of kind `gap`
    /// says what it no longer has.
    #[arg(long, value_name = "SEQ")]
    pub since: Option<u64>,
    /// Only this service's events (and those about the daemon itself).
    #[arg(long, value_name = "NAME", value_parser = NonEmptyStringValueParser::new())]
    pub service: Option<String>,
}

impl EventsArgs {
    /// The `GET /v1/events` path with its query.
    pub fn path(&self) -> String {
        let mut query = Vec::new();
        if let Some(n) = self.since {
            query.push(format!("since={n}"));
        }
        if let Some(s) = &self.service {
            query.push(format!("service={}", crate::cli::url_segment(s)));
        }
        if query.is_empty() {
            "/v1/events".into()
        } else {
            format!("/v1/events?{}", query.join("&"))
        }
    }
}

impl StatsArgs {
    /// The refresh interval of `--watch`.
    pub fn interval(&self) -> Duration {
        self.interval.unwrap_or(Duration::from_secs(1))
    }
}

/// `--interval`: positive seconds, at least a millisecond.
fn parse_interval(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds"))?;
    match Duration::try_from_secs_f64(secs) {
        Ok(d) if d >= Duration::from_millis(1) => Ok(d),
        _ => Err(format!(
            "`{s}`: needs a number of seconds of at least 0.001"
        )),
    }
}

/// `lb completions`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}
