//! The TOML config file: parsed, then validated into a [`Config`] whose every
//! value is usable as it is. Errors name the file, the service and the field.

use std::{
    collections::{HashMap, HashSet},
    fs,
    net::SocketAddrV4,
    path::{Path, PathBuf},
    time::Duration,
};

use lb_common::defaults;
use serde::Deserialize;

use crate::{
    api::access::Access,
    cluster::spec::{ClusterSpec, RawCluster},
    maglev::{is_prime, MAX_TABLE_SIZE},
    model::{
        image_rule, one_line, service_spec, BackendSpec, Forwarding, HealthCheck, Protocol,
        ServiceSpec,
    },
};

/// Why a config file was refused. Each renders as one line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}")]
    Read {
        /// The config file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown or mistyped fields.
    #[error("{path}:{line}: {message}")]
    Syntax {
        /// The config file.
        path: PathBuf,
        /// 1-based line of the error.
        line: usize,
        /// The parser's message, on one line.
        message: String,
    },
    /// A value is out of range or inconsistent with another.
    #[error("{path}: {field}: {reason}")]
    Invalid {
        /// The config file.
        path: PathBuf,
        /// Which field, e.g. `service "web" vip`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// How the forward program is attached to the external interfaces.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ForwardMode {
    /// XDP on NICs, TC on veth (see ARCHITECTURE.md: a veth hands XDP
    /// `CHECKSUM_PARTIAL` packets whose checksums XDP cannot complete).
    #[default]
    Auto,
    /// XDP (native where the driver has it), falling back to TC per backend.
    Xdp,
    /// TC only (the skb path).
    Tc,
}

/// Checks an engine address: `unix:///path` or `tcp://host:port`.
pub fn check_docker_host(h: &str) -> Result<(), String> {
    let ok = match h.split_once("://") {
        Some(("unix", path)) => path.starts_with('/'),
        Some(("tcp" | "http", rest)) => rest.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0)
        }),
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{h:?}: use unix:///path/to/docker.sock or tcp://host:port"
        ))
    }
}

/// Where maps and attachments are pinned unless the config says otherwise.
pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/lb";

/// The Docker watcher's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DockerSpec {
    /// Explicitly on or off; `None`: on when the engine's socket exists.
    pub enabled: Option<bool>,
    /// Engine address (`unix://…` or `tcp://…`).
    pub host: String,
}

/// The engine address unless the config or `--docker-host` says otherwise.
pub const DEFAULT_DOCKER_HOST: &str = "unix:///var/run/docker.sock";

impl Default for DockerSpec {
    fn default() -> Self {
        Self {
            enabled: None,
            host: DEFAULT_DOCKER_HOST.into(),
        }
    }
}

/// The data path section, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatapathSpec {
    /// Interfaces where clients' packets arrive (must exist at start).
    pub external: Vec<String>,
    /// How to attach the forward program there.
    pub mode: ForwardMode,
    /// Services the maps can hold.
    pub max_services: u32,
    /// Backends the maps can hold.
    pub max_backends: u32,
    /// Largest Maglev table a service may use.
    pub max_table_size: u32,
    /// Entries per flow table.
    pub flow_table_size: u32,
    /// bpffs directory where maps and attachments are pinned.
    pub pin_path: PathBuf,
}

/// The admin API section, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiSpec {
    /// Who may change and who may read.
    pub access: Access,
    /// Connections served at once; more are answered 503 and closed.
    pub max_connections: u32,
    /// How long a connection may take to send a request (its headers, and
    /// then its body) before it is closed; an idle connection is closed
    /// after as long.
    pub request_timeout: Duration,
}

/// Default of `[api] max_connections`.
pub const DEFAULT_API_CONNECTIONS: u32 = 64;
/// Default of `[api] request_timeout_ms`.
pub const DEFAULT_API_REQUEST_TIMEOUT_MS: u64 = 10_000;

impl Default for ApiSpec {
    fn default() -> Self {
        Self {
            access: Access::default(),
            max_connections: DEFAULT_API_CONNECTIONS,
            request_timeout: Duration::from_millis(DEFAULT_API_REQUEST_TIMEOUT_MS),
        }
    }
}

/// A whole validated config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Data path settings.
    pub datapath: DatapathSpec,
    /// Services, in file order.
    pub services: Vec<ServiceSpec>,
    /// The Docker watcher.
    pub docker: DockerSpec,
    /// The admin API.
    pub api: ApiSpec,
    /// Cluster mode (`[cluster]`); `None`: this node alone.
    pub cluster: Option<ClusterSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    datapath: RawDatapath,
    #[serde(default, rename = "service")]
    services: Vec<RawService>,
    #[serde(default)]
    docker: RawDocker,
    #[serde(default)]
    api: RawApi,
    cluster: Option<RawCluster>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApi {
    admin_group: Option<String>,
    read_group: Option<String>,
    max_connections: Option<u32>,
    request_timeout_ms: Option<u64>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDocker {
    enabled: Option<bool>,
    host: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDatapath {
    external: Vec<String>,
    #[serde(default)]
    mode: ForwardMode,
    max_services: Option<u32>,
    max_backends: Option<u32>,
    max_table_size: Option<u32>,
    flow_table_size: Option<u32>,
    pin_path: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: String,
    vip: String,
    protocol: Option<String>,
    #[serde(default)]
    backends: Vec<String>,
    table_size: Option<u32>,
    health: Option<HealthCheck>,
    image: Option<String>,
    target_port: Option<u16>,
    forwarding: Option<Forwarding>,
}

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Validates `text` as the contents of `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_owned(),
            line: e.span().map_or(1, |s| line_of(text, s.start)),
            message: one_line(e.message()),
        })?;
        let invalid = |field: String, reason: String| ConfigError::Invalid {
            path: path.to_owned(),
            field: one_line(&field),
            reason: one_line(&reason),
        };

        let d = raw.datapath;
        if d.external.is_empty() {
            return Err(invalid(
                "datapath.external".into(),
                "empty: name at least one interface where clients' packets arrive".into(),
            ));
        }
        let mut seen_if = HashSet::new();
        for i in &d.external {
            if i.is_empty() || i.len() > 15 || i.contains(['/', ' ']) {
                return Err(invalid(
                    "datapath.external".into(),
                    format!("{i:?} is not an interface name"),
                ));
            }
            if !seen_if.insert(i) {
                return Err(invalid(
                    "datapath.external".into(),
                    format!("{i:?} is listed twice"),
                ));
            }
        }
        let positive = |v: Option<u32>, default: u32, field: &str| match v {
            Some(0) => Err(invalid(
                format!("datapath.{field}"),
                "must be at least 1".into(),
            )),
            Some(v) => Ok(v),
            None => Ok(default),
        };
        let max_table_size =
            positive(d.max_table_size, defaults::MAX_TABLE_SIZE, "max_table_size")?;
        if max_table_size > MAX_TABLE_SIZE {
            return Err(invalid(
                "datapath.max_table_size".into(),
                format!("{max_table_size} is larger than {MAX_TABLE_SIZE}"),
            ));
        }
        if !is_prime(max_table_size) {
            return Err(invalid(
                "datapath.max_table_size".into(),
                format!("{max_table_size} is not prime (Maglev needs a prime table size)"),
            ));
        }
        let datapath = DatapathSpec {
            external: d.external,
            mode: d.mode,
            max_services: positive(d.max_services, defaults::MAX_SERVICES, "max_services")?,
            max_backends: positive(d.max_backends, defaults::MAX_BACKENDS, "max_backends")?,
            max_table_size,
            flow_table_size: positive(
                d.flow_table_size,
                defaults::FLOW_TABLE_SIZE,
                "flow_table_size",
            )?,
            pin_path: match d.pin_path {
                Some(p) if !p.is_absolute() => {
                    return Err(invalid(
                        "datapath.pin_path".into(),
                        format!("{} is not an absolute path", p.display()),
                    ))
                }
                Some(p) => p,
                None => PathBuf::from(DEFAULT_PIN_PATH),
            },
        };
        if u64::from(datapath.max_services) * 2 * u64::from(max_table_size) > u64::from(u32::MAX) {
            return Err(invalid(
                "datapath.max_services".into(),
                "max_services * 2 * max_table_size must fit in 32 bits".into(),
            ));
        }

        let mut services = Vec::new();
        let mut names = HashSet::new();
        let mut vips = HashSet::new();
        let mut total_backends = 0usize;
        for s in raw.services {
            let field = |f: &str| format!("service {:?} {f}", s.name);
            let mut spec = service_spec(
                &s.name,
                &s.vip,
                s.protocol.as_deref(),
                s.table_size,
                s.health,
                s.forwarding,
                max_table_size,
            )
            .map_err(|e| {
                if e.field == "name" {
                    invalid("service name".into(), e.reason)
                } else {
                    invalid(field(e.field), e.reason)
                }
            })?;
            if !names.insert(s.name.clone()) {
                return Err(invalid(
                    field("name"),
                    "a service with this name is defined twice".into(),
                ));
            }
            if !vips.insert((spec.vip, spec.protocol)) {
                return Err(invalid(
                    field("vip"),
                    format!(
                        "{} {} is already used by another service",
                        spec.protocol, spec.vip
                    ),
                ));
            }
            let table_size = spec.table_size;
            // No static backends is fine: Docker (labels or the image rule)
            // or the admin API fill the service.
            spec.image = image_rule(s.image.as_deref(), s.target_port)
                .map_err(|e| invalid(field(e.field), e.reason))?;
            if let Some(why) = spec.refuses_image() {
                return Err(invalid(field("target_port"), why));
            }
            let mut backends = Vec::new();
            let mut seen = HashSet::new();
            for b in &s.backends {
                let spec: BackendSpec = b.parse().map_err(|r| invalid(field("backends"), r))?;
                if !seen.insert(spec.addr) {
                    return Err(invalid(
                        field("backends"),
                        format!("{} is listed twice", spec.addr),
                    ));
                }
                backends.push(spec);
            }
            if let Some(why) = backends.iter().find_map(|b| spec.refuses_backend(b.addr)) {
                return Err(invalid(field("backends"), why));
            }
            if backends.len() > table_size as usize {
                return Err(invalid(
                    field("backends"),
                    format!("more backends than table slots ({table_size})"),
                ));
            }
            total_backends += backends.len();
            spec.backends = backends;
            services.push(spec);
        }
        // The reverse path tells a backend's services apart by trying each.
        let mut shared: HashMap<(SocketAddrV4, Protocol), usize> = HashMap::new();
        for s in &services {
            for b in &s.backends {
                let n = shared.entry((b.addr, s.protocol)).or_default();
                *n += 1;
                if *n > lb_common::REV_NAT_MAX {
                    return Err(invalid(
                        format!("service {:?} backends", s.name),
                        format!(
                            "{} {} serves more than {} services",
                            s.protocol,
                            b.addr,
                            lb_common::REV_NAT_MAX
                        ),
                    ));
                }
            }
        }
        if services.len() > datapath.max_services as usize {
            return Err(invalid(
                "service".into(),
                format!(
                    "{} services, more than datapath.max_services {}",
                    services.len(),
                    datapath.max_services
                ),
            ));
        }
        if total_backends > datapath.max_backends as usize {
            return Err(invalid(
                "backends".into(),
                format!(
                    "{total_backends} backends, more than datapath.max_backends {}",
                    datapath.max_backends
                ),
            ));
        }
        let docker = DockerSpec {
            enabled: raw.docker.enabled,
            host: match raw.docker.host {
                Some(h) => {
                    check_docker_host(&h).map_err(|r| invalid("docker.host".into(), r))?;
                    h
                }
                None => DEFAULT_DOCKER_HOST.into(),
            },
        };
        let group = |name: Option<String>, field: &str| {
            name.map(|n| gid_of(&n).map_err(|r| invalid(format!("api.{field}"), r)))
                .transpose()
        };
        let a = raw.api;
        let api = ApiSpec {
            access: Access {
                admin_gid: group(a.admin_group, "admin_group")?,
                read_gid: group(a.read_group, "read_group")?,
            },
            max_connections: match a.max_connections {
                Some(0) => {
                    return Err(invalid(
                        "api.max_connections".into(),
                        "must be at least 1".into(),
                    ))
                }
                Some(n) => n,
                None => DEFAULT_API_CONNECTIONS,
            },
            request_timeout: match a.request_timeout_ms {
                Some(ms) if !(100..=600_000).contains(&ms) => {
                    return Err(invalid(
                        "api.request_timeout_ms".into(),
                        format!("{ms} is outside 100..=600000"),
                    ))
                }
                ms => Duration::from_millis(ms.unwrap_or(DEFAULT_API_REQUEST_TIMEOUT_MS)),
            },
        };
        let cluster = raw
            .cluster
            .map(|c| c.validate().map_err(|e| invalid(e.field.into(), e.reason)))
            .transpose()?;
        Ok(Self {
            datapath,
            services,
            docker,
            api,
            cluster,
        })
    }
}

/// The 1-based line of byte `offset` of `text`: one more than the line
/// breaks before it.
fn line_of(text: &str, offset: usize) -> usize {
    let before = text.get(..offset).unwrap_or(text);
    before.matches('\n').count() + 1
}

/// A group named in the config: a number is a gid, anything else a group
/// name looked up in the system's group database.
fn gid_of(name: &str) -> Result<u32, String> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => Err(format!("no group {name:?} on this system")),
        Err(e) => Err(format!("looking up group {name:?}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{CheckKind, ImageRule, MAX_UDP_PAYLOAD};

    const GOOD: &str = r#"
[datapath]
external = ["eth1"]            # interfaces where clients' packets arrive

[[service]]
name = "web"
vip = "198.18.101.1:80"        # address:port of the service
protocol = "tcp"               # tcp | udp
backends = ["198.18.103.2:8080", "198.18.104.2:8080@2"]   # ip:port, optional @weight
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("lb.toml"), text)
    }

    #[test]
    fn api_section() {
        assert_eq!(parse(GOOD).unwrap().api, ApiSpec::default());
        let c = parse(&format!(
            "{GOOD}\n[api]\nadmin_group = \"root\"\nread_group = \"4002\"\n\
             max_connections = 8\nrequest_timeout_ms = 2500\n"
        ))
        .unwrap();
        assert_eq!(
            c.api,
            ApiSpec {
                access: Access {
                    admin_gid: Some(0),
                    read_gid: Some(4002),
                },
                max_connections: 8,
                request_timeout: Duration::from_millis(2_500),
            }
        );
        for (bad, want) in [
            (
                "admin_group = \"no-such-group-lb\"",
                "api.admin_group: no group \"no-such-group-lb\" on this system",
            ),
            (
                "max_connections = 0",
                "api.max_connections: must be at least 1",
            ),
            (
                "request_timeout_ms = 5",
                "api.request_timeout_ms: 5 is outside 100..=600000",
            ),
            ("groups = 1", "unknown field `groups`"),
        ] {
            let e = err(&format!("{GOOD}\n[api]\n{bad}\n"));
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    fn err(text: &str) -> String {
        let e = parse(text).expect_err("must be refused").to_string();
        assert!(
            !e.contains(['\n', '\r', '\u{2028}', '\u{2029}']),
            "error must be one line: {e:?}"
        );
        e
    }

    #[test]
    fn cluster_section() {
        assert_eq!(parse(GOOD).unwrap().cluster, None, "no [cluster]: alone");
        let c = parse(&format!(
            "{GOOD}\n[cluster]\netcd = [\"http://198.18.0.1:2379\"]\nnode = \"host-a\"\n"
        ))
        .unwrap();
        let cluster = c.cluster.unwrap();
        assert_eq!(cluster.node, "host-a");
        assert_eq!(cluster.prefix, "/lb/");
        let e = err(&format!(
            "{GOOD}\n[cluster]\netcd = [\"http://198.18.0.1:2379\"]\nnode = \"a b\"\n"
        ));
        assert!(e.starts_with("lb.toml: cluster.node: \"a b\""), "{e}");
        let e = err(&format!(
            "{GOOD}\n[cluster]\netcd = [\"http://198.18.0.1:2379\"]\nnode = \"a\"\nttl = 3\n"
        ));
        assert!(e.contains("unknown field `ttl`"), "{e}");
    }

    #[test]
    fn the_first_config_a_user_writes_works() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.datapath.external, ["eth1"]);
        assert_eq!(c.datapath.mode, ForwardMode::Auto);
        let s = &c.services[0];
        assert_eq!(s.name, "web");
        assert_eq!(s.vip, "198.18.101.1:80".parse().unwrap());
        assert_eq!(s.protocol, Protocol::Tcp);
        assert_eq!(s.table_size, 16_381, "the default table size");
        assert_eq!(
            c.datapath.max_table_size, 65_537,
            "room for 65,537 if asked"
        );
        assert_eq!(s.backends[0].weight, 1);
        assert_eq!(s.backends[1].weight, 2);
        assert_eq!(s.backends[1].addr, "198.18.104.2:8080".parse().unwrap());
    }

    #[test]
    fn bad_values_name_their_field() {
        let cases = [
            (GOOD.replace("198.18.101.1:80", "198.18.101.1:99999"), "vip"),
            (GOOD.replace("198.18.101.1:80", "198.18.101.1:0"), "vip"),
            (GOOD.replace("198.18.101.1:80", "web.example:80"), "vip"),
            (GOOD.replace("8080@2", "8080@0"), "backends"),
            (GOOD.replace("8080@2", "8080@x"), "backends"),
            (GOOD.replace("198.18.103.2:8080", "198.18.103.2"), "backends"),
            (GOOD.replace("198.18.104.2:8080@2", "198.18.103.2:8080"), "backends"),
            (format!("{GOOD}image = \"web:1\"\n"), "target_port"),
            (format!("{GOOD}target_port = 80\n"), "image"),
            (format!("{GOOD}image = \"web 1\"\ntarget_port = 80\n"), "image"),
            (format!("{GOOD}image = \"web:1\"\ntarget_port = 0\n"), "target_port"),
            (format!("{GOOD}\n[docker]\nhost = \"/var/run/docker.sock\"\n"), "docker.host"),
            (format!("{GOOD}\n[docker]\nenabled = \"yes\"\n"), "expected a boolean"),
            (GOOD.replace(r#"["eth1"]"#, "[]"), "external"),
            (GOOD.replace(r#""tcp""#, r#""sctp""#), "protocol"),
            (format!("{GOOD}table_size = 65536\n"), "table_size"),
            (GOOD.replace("external = [\"eth1\"]", "external = [\"eth1\"]\nmax_table_size = 4294967291"), "max_table_size"),
            (format!("{GOOD}colour = 1\n"), "colour"),
            (format!("{GOOD}\n[[service]]\nname = \"web\"\nvip = \"198.18.101.2:80\"\nbackends = [\"198.18.103.2:1\"]\n"), "name"),
            (format!("{GOOD}\n[[service]]\nname = \"web2\"\nvip = \"198.18.101.1:80\"\nbackends = [\"198.18.103.2:1\"]\n"), "vip"),
        ];
        for (text, field) in cases {
            let e = err(&text);
            assert!(e.contains(field), "{field:?} not named in: {e}");
            assert!(e.starts_with("lb.toml"), "file not named in: {e}");
        }
    }

    #[test]
    fn direct_server_return_keeps_the_port() {
        let dsr = |backends: &str| {
            GOOD.replace(
                r#"backends = ["198.18.103.2:8080", "198.18.104.2:8080@2"]"#,
                &format!("backends = [{backends}]\nforwarding = \"dsr\""),
            )
        };
        let c = parse(&dsr(r#""198.18.103.2:80", "198.18.104.2:80@2""#)).unwrap();
        assert_eq!(c.services[0].forwarding, Forwarding::Dsr);
        assert_eq!(parse(GOOD).unwrap().services[0].forwarding, Forwarding::Nat);
        let e = err(&dsr(r#""198.18.103.2:80", "198.18.104.2:8080""#));
        assert!(
            e.contains("backends") && e.contains("198.18.104.2:8080") && e.contains("port"),
            "{e}"
        );
        let e = err(&(dsr("") + "image = \"web:1\"\ntarget_port = 8080\n"));
        assert!(e.contains("target_port") && e.contains("8080"), "{e}");
        let e = err(&GOOD.replace(
            "protocol = \"tcp\"",
            "protocol = \"tcp\"\nforwarding = \"tunnel\"",
        ));
        assert!(e.contains("forwarding") || e.contains("tunnel"), "{e}");
        assert!(!e.contains('\n'), "one line: {e}");
    }

    /// `GOOD` with `health = { … }` set to `fields` and its protocol to
    /// `protocol`.
    fn with_health(protocol: &str, fields: &str) -> String {
        GOOD.replace(r#"protocol = "tcp""#, &format!("protocol = {protocol:?}"))
            + &format!(
                "health = {{ interval_ms = 1000, timeout_ms = 500, rise = 2, fall = 3{fields} }}\n"
            )
    }

    #[test]
    fn health_checks_of_each_kind() {
        let check = |protocol: &str, fields: &str| {
            let c = parse(&with_health(protocol, fields)).unwrap();
            c.services[0].health.clone().expect("a health check")
        };
        // No kind is a TCP connect, as before kinds existed.
        assert_eq!(check("tcp", ""), HealthCheck::default());
        assert_eq!(check("udp", "").kind, CheckKind::Tcp);
        // An HTTP check's path and status get their defaults.
        let http = check("tcp", r#", kind = "http""#);
        assert_eq!(
            (http.kind, http.path.as_deref(), http.status),
            (CheckKind::Http, Some("/"), Some(200))
        );
        let http = check("tcp", r#", kind = "http", path = "/healthz", status = 204"#);
        assert_eq!(
            (http.path.as_deref(), http.status),
            (Some("/healthz"), Some(204))
        );
        let udp = check("udp", r#", kind = "udp", payload = "ping""#);
        assert_eq!(
            (udp.kind, udp.payload.as_deref()),
            (CheckKind::Udp, Some("ping"))
        );
    }

    #[test]
    fn bad_health_checks_get_one_clear_line() {
        let big = "x".repeat(MAX_UDP_PAYLOAD + 1);
        for (protocol, fields, want) in [
            (
                "udp",
                r#", kind = "http""#.to_owned(),
                "an HTTP check needs a TCP service",
            ),
            (
                "tcp",
                r#", kind = "udp", payload = "ping""#.into(),
                "a UDP check needs a UDP service",
            ),
            (
                "tcp",
                r#", kind = "http", path = """#.into(),
                "path is empty",
            ),
            (
                "tcp",
                r#", kind = "http", path = "healthz""#.into(),
                "is not a path",
            ),
            (
                "tcp",
                r#", kind = "http", path = "/a b""#.into(),
                "is not a path",
            ),
            (
                "tcp",
                r#", kind = "http", status = 600"#.into(),
                "status 600 is not an HTTP status (100-599)",
            ),
            (
                "tcp",
                r#", kind = "http", status = 99"#.into(),
                "status 99 is not an HTTP status",
            ),
            ("udp", r#", kind = "udp""#.into(), "payload missing"),
            (
                "udp",
                format!(r#", kind = "udp", payload = "{big}""#),
                "payload of 1025 bytes",
            ),
            (
                "udp",
                r#", kind = "udp", payload = """#.into(),
                "payload of 0 bytes",
            ),
            (
                "tcp",
                r#", path = "/""#.into(),
                r#"path goes with kind = "http" only"#,
            ),
            (
                "udp",
                r#", payload = "ping""#.into(),
                r#"payload goes with kind = "udp" only"#,
            ),
            ("tcp", r#", kind = "icmp""#.into(), "unknown variant `icmp`"),
            ("tcp", r#", pth = "/""#.into(), "unknown field `pth`"),
        ] {
            let e = err(&with_health(protocol, &fields));
            assert!(e.contains(want), "{fields}: {e}");
            // Field errors name the service's health field.
            if !want.starts_with("unknown") {
                assert!(e.contains(r#"service "web" health"#), "{fields}: {e}");
            }
        }
    }

    #[test]
    fn docker_fills_services_declared_without_backends() {
        let text = r#"
[datapath]
external = ["eth1"]

[docker]
host = "unix:///run/docker.sock"

[[service]]
name = "web"
vip = "198.18.101.1:80"

[[service]]
name = "api"
vip = "198.18.101.2:80"
image = "web:1"
target_port = 8080
"#;
        let c = parse(text).unwrap();
        assert!(c.services.iter().all(|s| s.backends.is_empty()));
        assert_eq!(c.docker.enabled, None);
        assert_eq!(c.docker.host, "unix:///run/docker.sock");
        assert_eq!(
            c.services[1].image,
            Some(ImageRule {
                image: "web:1".into(),
                target_port: 8080
            })
        );
        assert_eq!(parse(GOOD).unwrap().docker, DockerSpec::default());
    }

    #[test]
    fn same_vip_port_with_another_protocol_is_fine() {
        let text = format!(
            "{GOOD}\n[[service]]\nname = \"dns\"\nvip = \"198.18.101.1:80\"\nprotocol = \"udp\"\nbackends = [\"198.18.103.2:53\"]\n"
        );
        assert_eq!(parse(&text).unwrap().services.len(), 2);
    }

    #[test]
    fn a_backend_serves_at_most_four_services() {
        let mut text = String::from("[datapath]\nexternal = [\"eth1\"]\n");
        for i in 0..5 {
            text.push_str(&format!(
                "[[service]]\nname = \"s{i}\"\nvip = \"198.18.101.{i}:80\"\nbackends = [\"198.18.103.2:8080\"]\n"
            ));
        }
        let e = err(&text);
        assert!(
            e.contains("s4") && e.contains("more than 4 services"),
            "{e}"
        );
    }

    #[test]
    fn syntax_errors_give_a_line() {
        let e = err("[datapath]\nexternal = [\"eth1\"\n");
        assert!(e.starts_with("lb.toml:"), "{e}");
    }

    #[test]
    fn an_error_at_the_start_of_a_line_names_that_line() {
        // The unknown field is the first thing on line 3, not on line 2.
        let e = err("[datapath]\nexternal = [\"eth1\"]\ncolour = 1\n");
        assert!(e.starts_with("lb.toml:3: unknown field `colour`"), "{e}");
        let e = err("colour = 1\n");
        assert!(e.starts_with("lb.toml:1: "), "{e}");
        assert_eq!(line_of("a\nb", 2), 2);
        assert_eq!(line_of("a\nb", 1), 1);
        assert_eq!(line_of("", 0), 1);
    }

    #[test]
    fn text_quoted_from_the_file_stays_on_one_line() {
        // toml quotes an unknown key as it is, line breaks and all.
        for key in ["\"\\r\"", "\"a\\nb\"", "\"\\u2028\""] {
            let e = err(&format!("{GOOD}{key} = 1\n"));
            assert!(e.contains("unknown field"), "{e}");
        }
        let e = err(&GOOD.replace("\"tcp\"", "\"t\\ncp\""));
        assert!(e.contains(r#"t\ncp"#), "escaped, not dropped: {e}");
    }

    #[test]
    fn backend_spec_round_trips() {
        for s in ["198.18.103.2:8080", "198.18.103.2:8080@7"] {
            assert_eq!(s.parse::<BackendSpec>().unwrap().to_string(), s);
        }
    }

    mod properties {
        use proptest::{collection::vec, prelude::*, sample::select};

        use super::parse;
        use crate::inputs::{one_clear_line, text};

        /// A config using every section and field.
        const FULL: &str = r#"[datapath]
external = ["eth1", "eth2"]
mode = "xdp"
max_services = 16
max_backends = 256
max_table_size = 251
flow_table_size = 4096
pin_path = "/sys/fs/bpf/lb-test"

[docker]
enabled = true
host = "unix:///run/docker.sock"

[cluster]
etcd = ["https://198.18.0.1:2379", "https://198.18.0.2:2379"]
node = "host-a"
prefix = "/lb/"
lease_ttl_secs = 10
ca_file = "/etc/lb/ca.pem"
cert_file = "/etc/lb/host-a.pem"
key_file = "/etc/lb/host-a.key"

[api]
admin_group = "0"
read_group = "4002"
max_connections = 8
request_timeout_ms = 2500

[[service]]
name = "web"
vip = "198.18.101.1:80"
protocol = "tcp"
backends = ["198.18.103.2:8080", "198.18.104.2:8080@2"]
table_size = 251
health = { kind = "http", path = "/healthz", status = 200, interval_ms = 1000, timeout_ms = 500, rise = 2, fall = 3 }

[[service]]
name = "dns"
vip = "198.18.101.2:53"
protocol = "udp"
image = "web:1"
target_port = 8080
health = { kind = "udp", payload = "ping", interval_ms = 1000, timeout_ms = 500, rise = 2, fall = 3 }
"#;

        /// A TOML string holding `s`, escaped as TOML needs.
        fn quoted(s: &str) -> String {
            toml::Value::String(s.to_owned()).to_string()
        }

        /// Any TOML value, or raw text where one goes.
        fn value() -> impl Strategy<Value = String> {
            prop_oneof![
                text().prop_map(|t| quoted(&t)),
                any::<i64>().prop_map(|n| n.to_string()),
                any::<f64>().prop_map(|n| format!("{n:?}")),
                any::<bool>().prop_map(|b| b.to_string()),
                vec(text(), 0..3).prop_map(|v| {
                    let items: Vec<String> = v.iter().map(|t| quoted(t)).collect();
                    format!("[{}]", items.join(", "))
                }),
                (text(), text()).prop_map(|(k, v)| format!(
                    "{{ {} = {} }}",
                    quoted(&k),
                    quoted(&v)
                )),
                text(),
            ]
        }

        /// One change to [`FULL`], line `line` (wrapped to its length).
        #[derive(Clone, Debug)]
        enum Mutation {
            Value(usize, String),
            Key(usize, String),
            Remove(usize),
            Repeat(usize),
            Insert(usize, String),
        }

        fn mutation() -> impl Strategy<Value = Mutation> {
            let line = 0..FULL.lines().count();
            prop_oneof![
                4 => (line.clone(), value()).prop_map(|(i, v)| Mutation::Value(i, v)),
                2 => (line.clone(), text()).prop_map(|(i, k)| Mutation::Key(i, k)),
                1 => line.clone().prop_map(Mutation::Remove),
                1 => line.clone().prop_map(Mutation::Repeat),
                1 => (line, text()).prop_map(|(i, t)| Mutation::Insert(i, t)),
            ]
        }

        fn mutated(m: &Mutation) -> String {
            let mut lines: Vec<String> = FULL.lines().map(String::from).collect();
            match m {
                Mutation::Value(i, v) => {
                    if let Some((k, _)) = lines[*i].split_once(" = ") {
                        lines[*i] = format!("{k} = {v}");
                    }
                }
                Mutation::Key(i, k) => {
                    let l = &lines[*i];
                    lines[*i] = match l.split_once(" = ") {
                        Some((_, v)) => format!("{} = {v}", quoted(k)),
                        None if l.starts_with("[[") => format!("[[{}]]", quoted(k)),
                        None if l.starts_with('[') => format!("[{}]", quoted(k)),
                        None => l.clone(),
                    };
                }
                Mutation::Remove(i) => {
                    lines.remove(*i);
                }
                Mutation::Repeat(i) => {
                    let l = lines[*i].clone();
                    lines.insert(*i, l);
                }
                Mutation::Insert(i, t) => lines.insert(*i, t.clone()),
            }
            lines.join("\n")
        }

        fn taken_or_one_line(text: &str) -> Result<(), TestCaseError> {
            match parse(text) {
                Ok(_) => Ok(()),
                Err(e) => one_clear_line("config", &e.to_string()),
            }
        }

        #[test]
        fn the_full_config_is_valid() {
            parse(FULL).unwrap();
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn a_valid_config_with_one_change(m in mutation()) {
                taken_or_one_line(&mutated(&m))?;
            }

            #[test]
            fn any_text(t in prop_oneof![text(), select(vec![FULL]).prop_map(String::from)]) {
                taken_or_one_line(&t)?;
            }

            #[test]
            fn a_valid_config_cut_short(n in 0..FULL.len()) {
                if FULL.is_char_boundary(n) {
                    taken_or_one_line(&FULL[..n])?;
                }
            }
        }
    }
}
