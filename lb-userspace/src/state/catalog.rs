//! The desired services, built: each service as the reconciler takes it
//! (config or API, with the API's changes and Docker's backends), kept up
//! to date one service at a time as changes touch them, with the totals the
//! limits check needs.
//!
//! A change then costs the size of the services it touches, not of every
//! service: with a thousand services, rebuilding and checking all of them
//! at every change was most of a change's time.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::SocketAddrV4,
};

use crate::model::{Protocol, ServiceSpec};

use super::Limits;

/// Built services, by name, and what the maps' limits are checked against.
#[derive(Debug, Default)]
pub(super) struct Catalog {
    specs: BTreeMap<String, ServiceSpec>,
    /// Backends over all services.
    backends: usize,
    /// Services per (VIP, protocol): more than one is refused.
    vips: HashMap<(SocketAddrV4, Protocol), u32>,
    /// Services per (backend, protocol): the reverse path tells at most
    /// [`lb_common::REV_NAT_MAX`] apart.
    shared: HashMap<(SocketAddrV4, Protocol), u32>,
    /// Services whose spec changed since the reconciler last took them.
    unapplied: BTreeSet<String>,
}

impl Catalog {
    /// Every service, by name.
    pub fn specs(&self) -> impl Iterator<Item = &ServiceSpec> {
        self.specs.values()
    }

    /// One service.
    pub fn get(&self, name: &str) -> Option<&ServiceSpec> {
        self.specs.get(name)
    }

    /// Sets service `name` to `spec` (`None`: no such service); a service
    /// that changes is marked unapplied.
    pub fn set(&mut self, name: &str, spec: Option<ServiceSpec>) {
        if self.specs.get(name) == spec.as_ref() {
            return;
        }
        if let Some(old) = self.specs.remove(name) {
            self.backends -= old.backends.len();
            decrement(&mut self.vips, (old.vip, old.protocol));
            for b in &old.backends {
                decrement(&mut self.shared, (b.addr, old.protocol));
            }
        }
        if let Some(new) = spec {
            self.backends += new.backends.len();
            *self.vips.entry((new.vip, new.protocol)).or_default() += 1;
            for b in &new.backends {
                *self.shared.entry((b.addr, new.protocol)).or_default() += 1;
            }
            self.specs.insert(name.to_owned(), new);
        }
        self.unapplied.insert(name.to_owned());
    }

    /// Checks the services named `touched` against the limits, and the
    /// totals. Every other service passed this check when it last changed,
    /// and only the touched ones can have made the totals worse.
    pub fn check<'a>(
        &self,
        touched: impl IntoIterator<Item = &'a str>,
        limits: &Limits,
    ) -> Result<(), String> {
        if self.specs.len() > limits.max_services as usize {
            return Err(format!(
                "{} services would exceed datapath.max_services {}",
                self.specs.len(),
                limits.max_services
            ));
        }
        if self.backends > limits.max_backends as usize {
            return Err(format!(
                "{} backends would exceed datapath.max_backends {}",
                self.backends, limits.max_backends
            ));
        }
        for s in touched.into_iter().filter_map(|n| self.specs.get(n)) {
            if self.vips.get(&(s.vip, s.protocol)).copied().unwrap_or(0) > 1 {
                return Err(format!("{} {} is used by two services", s.protocol, s.vip));
            }
            if s.backends.len() > s.table_size as usize {
                return Err(format!(
                    "service {}: more backends than table slots",
                    s.name
                ));
            }
            if let Some(why) = s.backends.iter().find_map(|b| s.refuses_backend(b.addr)) {
                return Err(why);
            }
            for b in &s.backends {
                let n = self.shared.get(&(b.addr, s.protocol)).copied().unwrap_or(0);
                if n as usize > lb_common::REV_NAT_MAX {
                    return Err(format!(
                        "{} {} would serve more than {} services",
                        s.protocol,
                        b.addr,
                        lb_common::REV_NAT_MAX
                    ));
                }
            }
        }
        Ok(())
    }

    /// The services changed since the last call, each with its spec now
    /// (`None`: removed), in name order.
    pub fn take_unapplied(&mut self) -> Vec<(String, Option<ServiceSpec>)> {
        std::mem::take(&mut self.unapplied)
            .into_iter()
            .map(|name| {
                let spec = self.specs.get(&name).cloned();
                (name, spec)
            })
            .collect()
    }
}

#[cfg(test)]
impl Catalog {
    /// The totals, and the same counted afresh from the specs: equal
    /// unless the incremental bookkeeping went wrong.
    pub fn totals_and_recount(&self) -> [Totals; 2] {
        let kept = (self.backends, self.vips.clone(), self.shared.clone());
        let mut counted = (0, HashMap::new(), HashMap::new());
        for s in self.specs.values() {
            counted.0 += s.backends.len();
            *counted.1.entry((s.vip, s.protocol)).or_default() += 1;
            for b in &s.backends {
                *counted.2.entry((b.addr, s.protocol)).or_default() += 1;
            }
        }
        [kept, counted]
    }
}

/// Backends, services per VIP, services per backend.
#[cfg(test)]
type Totals = (
    usize,
    HashMap<(SocketAddrV4, Protocol), u32>,
    HashMap<(SocketAddrV4, Protocol), u32>,
);

fn decrement(counts: &mut HashMap<(SocketAddrV4, Protocol), u32>, key: (SocketAddrV4, Protocol)) {
    if let Some(n) = counts.get_mut(&key) {
        *n -= 1;
        if *n == 0 {
            counts.remove(&key);
        }
    }
}
