//! etcd servers for the cluster's tests: Debian's etcd-server, started on
//! a data directory of the test's, killed and restarted at will.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One etcd member: its name, the URLs it listens on and advertises to
/// clients and to the other members, and its data directory.
#[derive(Debug, Clone)]
pub struct EtcdMember {
    pub name: String,
    pub listen_client: String,
    pub listen_peer: String,
    /// Where clients reach it (the first one is advertised).
    pub client: Vec<String>,
    /// Where the other members reach it (one per network it is on).
    pub peer: Vec<String>,
    pub data: PathBuf,
}

impl EtcdMember {
    /// A member on 127.0.0.1 with the given ports, its data under `dir`.
    pub fn on_loopback(name: &str, client_port: u16, peer_port: u16, dir: &Path) -> EtcdMember {
        let client = format!("http://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        EtcdMember {
            name: name.to_owned(),
            listen_client: client.clone(),
            listen_peer: peer.clone(),
            client: vec![client],
            peer: vec![peer],
            data: dir.join(name),
        }
    }

    /// The command starting this member of the cluster of `all`, with
    /// elections fast enough for tests (100 ms heartbeats, 1 s elections).
    pub fn command(&self, all: &[EtcdMember]) -> Command {
        let cluster = all
            .iter()
            .flat_map(|m| m.peer.iter().map(move |url| format!("{}={url}", m.name)))
            .collect::<Vec<_>>()
            .join(",");
        let mut command = crate::tool("etcd");
        command
            .args(["--name", &self.name])
            .arg("--data-dir")
            .arg(&self.data)
            .args(["--listen-client-urls", &self.listen_client])
            .args(["--advertise-client-urls", &self.client[0]])
            .args(["--listen-peer-urls", &self.listen_peer])
            .args(["--initial-advertise-peer-urls", &self.peer.join(",")])
            .args(["--initial-cluster", &cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            .args(["--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        command
    }

    /// Waits until the member says it is healthy (it has a leader), asking
    /// with curl run through `wrap` (to run it in the member's network
    /// namespace, say).
    pub fn wait_healthy(&self, wrap: impl Fn(Command) -> Command, within: Duration) {
        let start = Instant::now();
        loop {
            let mut curl = crate::tool("curl");
            curl.args(["-s", "--max-time", "1"]).arg(format!(
                "{}/health",
                self.listen_client.replace("0.0.0.0", "127.0.0.1")
            ));
            let answer = wrap(curl).output().map(|o| o.stdout).unwrap_or_default();
            if String::from_utf8_lossy(&answer).contains("\"health\":\"true\"") {
                return;
            }
            assert!(
                start.elapsed() < within,
                "etcd member {} not healthy within {within:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A one-member etcd on loopback, killed when dropped.
pub struct Etcd {
    member: EtcdMember,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

impl Etcd {
    /// Starts it and waits until it serves.
    pub fn start() -> Etcd {
        let dir = tempfile::tempdir().expect("a directory for etcd");
        let (client, peer) = (crate::free_loopback_port(), crate::free_loopback_port());
        let member = EtcdMember::on_loopback("test", client, peer, dir.path());
        let mut etcd = Etcd {
            member,
            child: None,
            _dir: dir,
        };
        etcd.restart();
        etcd
    }

    /// Its client URL.
    pub fn endpoint(&self) -> String {
        self.member.client[0].clone()
    }

    /// SIGKILL: it answers nothing until restarted.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same data.
    pub fn restart(&mut self) {
        self.kill();
        let child = self
            .member
            .command(std::slice::from_ref(&self.member))
            .spawn()
            .expect("start etcd");
        self.child = Some(child);
        self.member
            .wait_healthy(|command| command, Duration::from_secs(20));
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}
