//! Network namespaces for tests of nodes that talk over a network: each
//! node in its own namespace, joined by veth pairs, so that a test can cut
//! one link (`ip link set … down`) and traffic never leaves the machine.
//! Everything is made by [`Network::new`] and removed when it drops.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::{run, tool};

/// Namespaces made so far by this process, for unique names.
static MADE: AtomicU32 = AtomicU32::new(0);

/// Some namespaces, each pair of them joined by a link with its own /24.
pub struct Network {
    /// Namespace names, in the order asked for.
    names: Vec<String>,
    links: Vec<Link>,
}

/// A veth pair between two namespaces.
struct Link {
    ends: [usize; 2],
    devices: [String; 2],
    addresses: [String; 2],
}

impl Network {
    /// Namespaces for `nodes` (their names in the test), every two joined
    /// by a link; the namespaces' loopbacks are up.
    pub fn new(nodes: &[&str]) -> Network {
        let id = std::process::id() % 10_000;
        let serial = MADE.fetch_add(1, Ordering::Relaxed);
        let names: Vec<String> = nodes
            .iter()
            .map(|node| format!("dmm{id}-{serial}-{node}"))
            .collect();
        let mut network = Network {
            names,
            links: Vec::new(),
        };
        for name in &network.names {
            run(tool("ip").args(["netns", "add", name]));
            run(tool("ip").args(["-n", name, "link", "set", "lo", "up"]));
        }
        let subnet = |k: usize| format!("10.{}.{}", 100 + serial % 100, k);
        for a in 0..nodes.len() {
            for b in a + 1..nodes.len() {
                let k = network.links.len();
                let devices = [
                    format!("v{id}s{serial}l{k}a"),
                    format!("v{id}s{serial}l{k}b"),
                ];
                let addresses = [format!("{}.1", subnet(k)), format!("{}.2", subnet(k))];
                network.join(a, b, &devices, &addresses);
                network.links.push(Link {
                    ends: [a, b],
                    devices,
                    addresses,
                });
            }
        }
        network
    }

    fn join(&self, a: usize, b: usize, devices: &[String; 2], addresses: &[String; 2]) {
        let (na, nb) = (&self.names[a], &self.names[b]);
        run(tool("ip").args([
            "link",
            "add",
            &devices[0],
            "netns",
            na,
            "type",
            "veth",
            "peer",
            "name",
            &devices[1],
            "netns",
            nb,
        ]));
        for (ns, (device, address)) in [na, nb].into_iter().zip(devices.iter().zip(addresses)) {
            let cidr = format!("{address}/24");
            run(tool("ip").args(["-n", ns, "addr", "add", &cidr, "dev", device]));
            run(tool("ip").args(["-n", ns, "link", "set", device, "up"]));
        }
    }

    fn index(&self, node: &str) -> usize {
        self.names
            .iter()
            .position(|name| name.ends_with(&format!("-{node}")))
            .unwrap_or_else(|| panic!("no node {node}"))
    }

    fn link(&self, a: &str, b: &str) -> &Link {
        let (a, b) = (self.index(a), self.index(b));
        self.links
            .iter()
            .find(|l| l.ends == [a, b] || l.ends == [b, a])
            .expect("every two nodes are joined")
    }

    /// The address `node` has on its link to `other`.
    pub fn address(&self, node: &str, other: &str) -> String {
        let link = self.link(node, other);
        let side = usize::from(link.ends[1] == self.index(node));
        link.addresses[side].clone()
    }

    /// The namespace of `node`.
    pub fn namespace(&self, node: &str) -> &str {
        &self.names[self.index(node)]
    }

    /// `program` to run in `node`'s namespace.
    pub fn command(&self, node: &str, program: &str) -> Command {
        let mut command = tool("ip");
        command.args(["netns", "exec", self.namespace(node), program]);
        command
    }

    /// `command` moved into `node`'s namespace.
    pub fn wrap(&self, node: &str, command: Command) -> Command {
        let mut wrapped = self.command(node, &command.get_program().to_string_lossy());
        wrapped.args(command.get_args());
        for (key, value) in command.get_envs() {
            match value {
                Some(value) => wrapped.env(key, value),
                None => wrapped.env_remove(key),
            };
        }
        wrapped
    }

    /// Takes the link between `a` and `b` down (packets dropped, no reset
    /// sent: as a cable pulled) or up again.
    pub fn set_link(&self, a: &str, b: &str, up: bool) {
        let link = self.link(a, b);
        let state = if up { "up" } else { "down" };
        for (end, device) in link.ends.iter().zip(&link.devices) {
            run(tool("ip").args(["-n", &self.names[*end], "link", "set", device, state]));
        }
    }
}

/// Moves the calling thread into the network namespace `name` (made by
/// `ip netns add`): sockets it opens afterwards are in that namespace. For
/// a client the test runs in-process, on a thread of its own.
pub fn enter_namespace(name: &str) {
    let path = format!("/run/netns/{name}");
    let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    rustix::thread::move_into_link_name_space(
        std::os::fd::AsFd::as_fd(&file),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )
    .unwrap_or_else(|e| panic!("cannot enter the network namespace {name}: {e}"));
}

impl Drop for Network {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth ends in it.
        for name in &self.names {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}
