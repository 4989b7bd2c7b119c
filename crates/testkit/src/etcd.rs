//! etcd servers for the cluster's tests: Debian's etcd-server, started on
//! a data directory of the test's, killed and restarted at will.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One etcd member: its name, the addresses it serves clients and peers
/// on, and its data directory.
#[derive(Debug, Clone)]
pub struct EtcdMember {
    pub name: String,
    pub client: String,
    pub peer: String,
    pub data: PathBuf,
}

impl EtcdMember {
    /// A member on `host` with the given ports, its data under `dir`.
    pub fn new(name: &str, host: &str, client_port: u16, peer_port: u16, dir: &Path) -> EtcdMember {
        EtcdMember {
            name: name.to_owned(),
            client: format!("http://{host}:{client_port}"),
            peer: format!("http://{host}:{peer_port}"),
            data: dir.join(name),
        }
    }

    /// The command starting this member of the cluster of `all`, with
    /// elections fast enough for tests (100 ms heartbeats, 1 s elections).
    pub fn command(&self, all: &[EtcdMember]) -> Command {
        let cluster = all
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let mut command = crate::tool("etcd");
        command
            .args(["--name", &self.name])
            .arg("--data-dir")
            .arg(&self.data)
            .args(["--listen-client-urls", &self.client])
            .args(["--advertise-client-urls", &self.client])
            .args(["--listen-peer-urls", &self.peer])
            .args(["--initial-advertise-peer-urls", &self.peer])
            .args(["--initial-cluster", &cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            .args(["--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        command
    }

    /// Waits until the member says it is healthy (a leader is elected).
    pub fn wait_healthy(&self, within: Duration) {
        let address = self.client.trim_start_matches("http://").to_owned();
        let start = Instant::now();
        while start.elapsed() < within {
            if healthy(&address) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("etcd member {} not healthy within {within:?}", self.name);
    }
}

/// Whether etcd at `address` answers `/health` with `"health":"true"`.
fn healthy(address: &str) -> bool {
    let Ok(mut stream) = std::net::TcpStream::connect(address) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let request = format!("GET /health HTTP/1.0\r\nHost: {address}\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer.contains("\"health\":\"true\"")
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
        let member = EtcdMember::new("test", "127.0.0.1", client, peer, dir.path());
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
        self.member.client.clone()
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
        self.member.wait_healthy(Duration::from_secs(20));
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}
