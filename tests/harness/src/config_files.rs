//! Rendering `lb run` config files (TOML).

use std::fmt::Write as _;

/// One `[[service]]` of an `lb` config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceConfig {
    /// Unique service name.
    pub name: String,
    /// `"ip:port"` the service answers on.
    pub vip: String,
    /// `"tcp"` or `"udp"`.
    pub protocol: String,
    /// `"ip:port"` or `"ip:port@weight"` of every backend.
    pub backends: Vec<String>,
}

impl ServiceConfig {
    /// A service from its parts.
    pub fn new(name: &str, vip: &str, protocol: &str, backends: &[String]) -> ServiceConfig {
        ServiceConfig {
            name: name.to_owned(),
            vip: vip.to_owned(),
            protocol: protocol.to_owned(),
            backends: backends.to_vec(),
        }
    }

    /// Service `web` on `topo`'s VIP, TCP port 80, over port 8080 of the
    /// backends numbered `backends`.
    pub fn web(topo: &crate::Topology, backends: &[usize]) -> ServiceConfig {
        let eps: Vec<String> = (backends.iter())
            .map(|&i| format!("{}:8080", topo.backend_addr(i)))
            .collect();
        ServiceConfig::new("web", &format!("{}:80", topo.vip()), "tcp", &eps)
    }
}

/// A TOML basic string with `"` and `\` (and control characters) escaped.
fn quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        match c {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(q, "\\u{:04X}", c as u32);
            }
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

fn list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| quote(s)).collect();
    format!("[{}]", quoted.join(", "))
}

/// Renders a config: `[datapath] external = [...]` and one `[[service]]`
/// table per service, in order.
pub fn render_config(external: &[&str], services: &[ServiceConfig]) -> String {
    let external: Vec<String> = external.iter().map(|s| (*s).to_owned()).collect();
    let mut out = format!("[datapath]\nexternal = {}\n", list(&external));
    for s in services {
        let _ = write!(
            out,
            "\n[[service]]\nname = {}\nvip = {}\nprotocol = {}\nbackends = {}\n",
            quote(&s.name),
            quote(&s.vip),
            quote(&s.protocol),
            list(&s.backends)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders() {
        let web = ServiceConfig::new(
            "web",
            "198.18.101.1:80",
            "tcp",
            &["198.18.103.2:8080".into()],
        );
        assert_eq!(
            render_config(&["x0"], &[web]),
            "[datapath]\nexternal = [\"x0\"]\n\n[[service]]\nname = \"web\"\nvip = \"198.18.101.1:80\"\n\
             protocol = \"tcp\"\nbackends = [\"198.18.103.2:8080\"]\n"
        );
        assert_eq!(quote("a\"b\\"), "\"a\\\"b\\\\\"");
    }
}
