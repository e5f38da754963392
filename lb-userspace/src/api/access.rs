//! Who may use the admin API: the peer's credentials (`SO_PEERCRED`) decide,
//! per connection. Root and the members of `[api] admin_group` may change
//! anything; the members of `[api] read_group` may list, stat and watch
//! (every `GET`); anyone else is refused. Group membership is the connecting
//! process's own (its primary group and the supplementary groups the kernel
//! lists for it in `/proc/PID/status`), as the kernel checks a file's group.

use std::fs;

use tokio::net::UnixStream;

/// What a peer may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Everything.
    Admin,
    /// Reads only.
    Read,
}

/// The groups the config names, as group ids.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Access {
    /// Members may change anything.
    pub admin_gid: Option<u32>,
    /// Members may read.
    pub read_gid: Option<u32>,
}

/// A connected process's credentials.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// Its user id.
    pub uid: u32,
    /// Its primary group and supplementary groups.
    pub groups: Vec<u32>,
}

impl Peer {
    /// The credentials of the process at the other end of `stream`: `None`
    /// if the kernel does not give them (the connection is then refused).
    pub fn of(stream: &UnixStream) -> Option<Peer> {
        let cred = stream.peer_cred().ok()?;
        let mut groups = vec![cred.gid()];
        // The pid is the connecting process's at connect time; if it has
        // gone, only its primary group counts.
        if let Some(pid) = cred.pid() {
            groups.extend(supplementary_groups(&format!("/proc/{pid}/status")));
        }
        Some(Peer {
            uid: cred.uid(),
            groups,
        })
    }
}

/// The `Groups:` line of a `/proc/PID/status` file.
fn supplementary_groups(status: &str) -> Vec<u32> {
    fs::read_to_string(status)
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Groups:")).map(|g| {
                g.split_whitespace()
                    .filter_map(|n| n.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
}

impl Access {
    /// Whether any group is named: the socket is then open to every local
    /// user (mode 0666) and these checks keep them apart.
    pub fn is_shared(&self) -> bool {
        self.admin_gid.is_some() || self.read_gid.is_some()
    }

    /// What `peer` may do, if anything.
    pub fn role(&self, peer: &Peer) -> Option<Role> {
        let member = |gid: Option<u32>| gid.is_some_and(|g| peer.groups.contains(&g));
        if peer.uid == 0 || member(self.admin_gid) {
            Some(Role::Admin)
        } else if member(self.read_gid) {
            Some(Role::Read)
        } else {
            None
        }
    }

    /// The one line a refused peer gets, saying what would let it in.
    pub fn refusal(&self, peer: &Peer, wanted: Role) -> String {
        let groups = |list: &[(Option<u32>, &str)]| {
            list.iter()
                .filter_map(|(g, name)| g.map(|g| format!("{name} (gid {g})")))
                .collect::<Vec<_>>()
                .join(" or ")
        };
        let who = format!("uid {}", peer.uid);
        let admin = groups(&[(self.admin_gid, "admin_group")]);
        match wanted {
            Role::Admin if admin.is_empty() => {
                format!("permission denied: {who} may not change lb; only root may")
            }
            Role::Admin => format!(
                "permission denied: {who} may not change lb; root and members of {admin} may"
            ),
            Role::Read => {
                let any = groups(&[
                    (self.admin_gid, "admin_group"),
                    (self.read_gid, "read_group"),
                ]);
                format!(
                    "permission denied: {who} may not use lb's API; root and members of {any} may"
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, groups: &[u32]) -> Peer {
        Peer {
            uid,
            groups: groups.to_vec(),
        }
    }

    #[test]
    fn root_admins_readers_and_outsiders() {
        let a = Access {
            admin_gid: Some(4001),
            read_gid: Some(4002),
        };
        assert_eq!(a.role(&peer(0, &[0])), Some(Role::Admin));
        assert_eq!(a.role(&peer(1000, &[1000, 4001])), Some(Role::Admin));
        assert_eq!(a.role(&peer(1000, &[4002])), Some(Role::Read));
        assert_eq!(a.role(&peer(1000, &[4002, 4001])), Some(Role::Admin));
        assert_eq!(a.role(&peer(1000, &[1000])), None);
        // With no groups named, only root.
        let root_only = Access::default();
        assert!(!root_only.is_shared());
        assert_eq!(root_only.role(&peer(0, &[])), Some(Role::Admin));
        assert_eq!(root_only.role(&peer(1000, &[4001])), None);
    }

    #[test]
    fn refusals_say_who_may() {
        let a = Access {
            admin_gid: Some(4001),
            read_gid: Some(4002),
        };
        let p = peer(1000, &[1000]);
        assert_eq!(
            a.refusal(&p, Role::Admin),
            "permission denied: uid 1000 may not change lb; root and members of admin_group (gid 4001) may"
        );
        assert_eq!(
            a.refusal(&p, Role::Read),
            "permission denied: uid 1000 may not use lb's API; root and members of admin_group (gid 4001) or read_group (gid 4002) may"
        );
        let reads = Access {
            admin_gid: None,
            read_gid: Some(4002),
        };
        assert_eq!(
            reads.refusal(&p, Role::Admin),
            "permission denied: uid 1000 may not change lb; only root may"
        );
    }

    #[test]
    fn groups_line_of_proc_status() {
        let dir = std::env::temp_dir().join(format!("lb-access-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let f = dir.join("status");
        fs::write(
            &f,
            "Name:\tcat\nUid:\t1000\t1000\t1000\t1000\nGroups:\t4 24 4001 \nNgid:\t0\n",
        )
        .unwrap();
        assert_eq!(supplementary_groups(f.to_str().unwrap()), [4, 24, 4001]);
        fs::write(&f, "Groups:\n").unwrap();
        assert!(supplementary_groups(f.to_str().unwrap()).is_empty());
        assert!(supplementary_groups("/nonexistent/status").is_empty());
        fs::remove_dir_all(&dir).unwrap();
    }
}
