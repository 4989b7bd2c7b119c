//! Volumes moved between two nodes in their own network namespaces, with a
//! client in a third (all made by the test and removed after): fio with
//! `verify=crc32c` writes through node A's TLS export while the volume
//! moves to node B and reads it back through node B; qemu-img compares
//! the two exports over TLS; the move survives the link between the nodes
//! cut, node B killed and node A killed, resending only what changed
//! meanwhile; a node with a certificate of another CA is refused.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{Daemon, MIB, certificates, path, scratch, source_image, tool};
use dmm_testkit::Network;

/// The NBD port of every node (each has its own namespace).
const NBD_PORT: u16 = 10809;
/// The API port of every node.
const API_PORT: u16 = 7001;

/// Two nodes and a client, each in its namespace.
struct Cluster {
    net: Network,
    dir: PathBuf,
    certs: Vec<PathBuf>,
    a: Option<Daemon>,
    b: Option<Daemon>,
}

impl Cluster {
    fn new(dir: &Path) -> Cluster {
        let net = Network::new(&["a", "b", "c"]);
        let certs = certificates(dir, &["node-a", "node-b", "client"]);
        let mut cluster = Cluster {
            net,
            dir: dir.to_owned(),
            certs,
            a: None,
            b: None,
        };
        cluster.a = Some(cluster.start("a"));
        cluster.b = Some(cluster.start("b"));
        cluster
    }

    /// Starts (or restarts, on the same state) node `a` or `b`.
    fn start(&self, node: &str) -> Daemon {
        let (name, peer, peer_node, certs) = match node {
            "a" => ("node-a", "node-b", "b", &self.certs[0]),
            _ => ("node-b", "node-a", "a", &self.certs[1]),
        };
        let token = self.dir.join("token");
        std::fs::write(&token, "correct-horse-battery-staple").unwrap();
        let api = format!("{}:{API_PORT}", self.net.address(node, peer_node));
        let peer = format!("{peer}={}:{API_PORT}", self.net.address(peer_node, node));
        let nbd = format!("0.0.0.0:{NBD_PORT}");
        Daemon::start_with(
            &self.dir.join(format!("{name}-state")),
            &[
                "--node",
                name,
                "--listen",
                &api,
                "--token-file",
                path(&token),
                "--tls-certificates",
                path(certs),
                "--nbd-listen",
                &nbd,
                "--tls=require",
                "--peer",
                &peer,
            ],
            |command| self.net.wrap(node, command),
        )
    }

    fn a(&self) -> &Daemon {
        self.a.as_ref().expect("node A runs")
    }

    /// The NBD URI of `export` on `node` as the client reaches it; its
    /// certificates are where libnbd looks by default (fio's NBD engine
    /// may not name a directory in the URI), in [`Cluster::client_home`].
    fn uri(&self, node: &str, export: &str) -> String {
        format!(
            "nbds://{}:{NBD_PORT}/{export}?tls-hostname=node-{node}",
            self.net.address(node, "c"),
        )
    }

    /// A home directory whose `.pki/libnbd` holds the client's certificates.
    fn client_home(&self) -> PathBuf {
        let home = self.dir.join("client-home");
        let pki = home.join(".pki/libnbd");
        if !pki.exists() {
            std::fs::create_dir_all(&pki).unwrap();
            for file in ["ca-cert.pem", "client-cert.pem", "client-key.pem"] {
                std::fs::copy(self.certs[2].join(file), pki.join(file)).unwrap();
            }
        }
        home
    }

    /// qemu's options for `export` on `node`, over TLS.
    fn image_opts(&self, node: &str, export: &str) -> String {
        format!(
            "driver=nbd,host={},port={NBD_PORT},export={export},tls-creds=tls0,\
             tls-hostname=node-{node}",
            self.net.address(node, "c")
        )
    }

    fn tls_object(&self) -> String {
        format!(
            "tls-creds-x509,id=tls0,endpoint=client,dir={}",
            path(&self.certs[2])
        )
    }

    /// A tool run by the client.
    fn client(&self, program: &str) -> Command {
        self.net.command("c", program)
    }

    /// qemu-io commands on `export` of `node`, run by the client.
    fn qemu_io(&self, node: &str, export: &str, commands: &[String]) -> Output {
        let mut command = self.client("qemu-io");
        command.args(["--object", &self.tls_object(), "--image-opts"]);
        command.arg(self.image_opts(node, export));
        for c in commands {
            command.args(["-c", c]);
        }
        command.output().unwrap()
    }

    /// Starts a move of `source` to node B, as `export`.
    fn create_move(&self, source: &Path, export: &str, extra: &[&str]) -> (String, PathBuf) {
        let landing = self.dir.join("landing");
        std::fs::create_dir_all(&landing).unwrap();
        let destination = landing.join(format!("{export}.raw"));
        let (source, target, export_property) = (
            format!("source={}", path(source)),
            format!("target=node-b:{}", path(&destination)),
            format!("export={export}"),
        );
        let mut args = vec![
            "create",
            "-p",
            &source,
            "-p",
            &target,
            "-p",
            &export_property,
        ];
        for property in extra {
            args.extend(["-p", property]);
        }
        let migid = self.a().ok(&args).trim().to_owned();
        (migid, destination)
    }

    fn progress(&self, migid: &str) -> serde_json::Value {
        self.a().json(&["stat", migid])["progress"].clone()
    }

    /// Waits until the move has copied `bytes`.
    fn wait_copied(&self, migid: &str, bytes: u64) {
        let started = Instant::now();
        while self.progress(migid)["copied_bytes"].as_u64().unwrap_or(0) < bytes {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the move never copied {bytes} bytes: {}",
                self.progress(migid)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the move says it waits for node B.
    fn wait_waiting(&self, migid: &str) {
        let started = Instant::now();
        loop {
            let progress = self.progress(migid);
            if progress["activity"] == "waiting-for-destination" {
                let why = progress["error"].as_str().unwrap_or_default().to_owned();
                assert!(why.contains("node-b cannot be reached"), "{why}");
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the move never waited for node B: {progress}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn clean(output: &Output) -> bool {
    let said = String::from_utf8_lossy(&output.stdout) + String::from_utf8_lossy(&output.stderr);
    output.status.success() && !said.contains("failed") && !said.contains("error")
}

/// fio's job on the volume through `uri`: 4 KiB random writes over the
/// first 16 MiB, each block's crc32c checked on the way back; `extra`
/// chooses writing (paced, so that it spans the move) or checking only.
fn fio(cluster: &Cluster, uri: &str, extra: &[&str]) -> String {
    let output = cluster
        .client("fio")
        .env("HOME", cluster.client_home())
        .args([
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--size=16m",
            "--verify=crc32c",
            "--verify_state_save=0",
            "--randseed=4242",
        ])
        .args(extra)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && said.contains("err= 0"),
        "fio reported an error:\n{said}"
    );
    said
}

#[test]
fn fio_verifies_through_node_a_while_the_volume_moves_and_through_node_b_after() {
    let dir = scratch();
    let cluster = Cluster::new(dir.path());
    let source = source_image(dir.path(), "vm1.raw", 64 * MIB, 3);
    let (migid, destination) = cluster.create_move(&source, "vm1", &["rate=24M"]);
    // fio writes through node A during the move (paced to span it) and
    // reads every block back through the same connection, after the
    // switchover and the handoff.
    let on_a = cluster.uri("a", "vm1");
    fio(&cluster, &on_a, &["--rate=2m"]);
    cluster
        .a()
        .wait_state(&migid, &["switched-over"], Duration::from_secs(60));
    let log = cluster.a().ok(&["log", &migid]);
    assert!(log.contains("node-b serves export vm1 now"), "{log}");
    let progress = cluster.progress(&migid);
    assert!(
        progress["verified_chunks"].as_u64().unwrap() > 0,
        "{progress}"
    );
    // Node B serves the volume: fio finds every block it wrote.
    let on_b = cluster.uri("b", "vm1");
    fio(&cluster, &on_b, &["--verify_only"]);
    // qemu-img compares the two nodes' exports, both over TLS.
    let compared = cluster
        .client("qemu-img")
        .args(["compare", "--object", &cluster.tls_object(), "--image-opts"])
        .arg(cluster.image_opts("a", "vm1"))
        .arg(cluster.image_opts("b", "vm1"))
        .output()
        .unwrap();
    assert!(compared.status.success(), "{compared:?}");
    // The commit: node B serves it from its image alone; node A's export
    // goes with the migration, node B's stays.
    cluster.a().ok(&["commit", &migid]);
    fio(&cluster, &on_b, &["--verify_only"]);
    cluster.a().ok(&["delete", &migid]);
    fio(&cluster, &on_b, &["--verify_only"]);
    // What node B serves is its image: the source stopped following at
    // the switchover.
    let image = cluster.qemu_io("b", "vm1", &["read -P 0x25 33M 1M".to_owned()]);
    assert!(clean(&image), "{image:?}");
    let from_file = tool("qemu-io")
        .args(["-f", "raw", "-c", "read -P 0x25 33M 1M"])
        .arg(&destination)
        .output()
        .unwrap();
    assert!(clean(&from_file), "{from_file:?}");
}

/// How node B goes away during the copy.
#[derive(Clone, Copy, Debug)]
enum Outage {
    /// The link between the nodes taken down, then up.
    LinkCut,
    /// Node B killed with SIGKILL, then started again.
    PeerKilled,
}

/// A move with one copy at a time, interrupted after 12 MiB: a client
/// writes 4 chunks already copied while node B is away, the move waits
/// (saying why) and resumes when node B is back, and the chunks copied
/// over the whole move are the volume's once, plus those 4, plus at most
/// the one in flight when node B went away.
fn a_move_outlives(outage: Outage) {
    let dir = scratch();
    let mut cluster = Cluster::new(dir.path());
    let source = source_image(dir.path(), "vm1.raw", 48 * MIB, 7);
    let (migid, destination) = cluster.create_move(
        &source,
        "vm1",
        &["rate=8M", "copies=1", "segsize=1M", "strategy=mirror"],
    );
    cluster.wait_copied(&migid, 12 * MIB);
    match outage {
        Outage::LinkCut => cluster.net.set_link("a", "b", false),
        Outage::PeerKilled => cluster.b.take().unwrap().kill(),
    }
    // MiB 0, 1, 3 and 4 hold data and were copied first.
    let writes: Vec<String> = [0u64, 1, 3, 4]
        .iter()
        .map(|m| format!("write -P 0x5{m} {m}M 64k"))
        .collect();
    let started = Instant::now();
    let written = cluster.qemu_io("a", "vm1", &writes);
    assert!(
        clean(&written),
        "{written:?}\n{}",
        std::fs::read_to_string(dir.path().join("node-a-state.log")).unwrap_or_default()
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the client waited {:?} for node B",
        started.elapsed()
    );
    cluster.wait_waiting(&migid);
    match outage {
        Outage::LinkCut => cluster.net.set_link("a", "b", true),
        Outage::PeerKilled => cluster.b = Some(cluster.start("b")),
    }
    cluster
        .a()
        .wait_state(&migid, &["switched-over"], Duration::from_secs(90));
    common::assert_same_images(&source, &destination);
    let copied = cluster.progress(&migid)["copied_bytes"].as_u64().unwrap();
    let allocated = 32 * MIB; // two MiB of every three
    let resent = copied - allocated;
    eprintln!("{outage:?}: {copied} bytes copied, {resent} more than the volume's data");
    assert!(
        resent <= (4 + 1) * MIB,
        "{outage:?}: {resent} bytes sent again, more than the 4 chunks written and the one in flight"
    );
    let log = cluster.a().ok(&["log", &migid]);
    assert!(!log.contains("failed"), "{log}");
}

#[test]
fn a_move_waits_for_a_cut_link_and_resends_only_what_changed() {
    a_move_outlives(Outage::LinkCut);
}

#[test]
fn a_move_waits_for_a_killed_peer_and_resends_only_what_changed() {
    a_move_outlives(Outage::PeerKilled);
}

#[test]
fn a_move_resumes_after_its_owner_is_killed() {
    let dir = scratch();
    let mut cluster = Cluster::new(dir.path());
    let source = source_image(dir.path(), "vm1.raw", 48 * MIB, 9);
    let (migid, destination) =
        cluster.create_move(&source, "vm1", &["rate=8M", "copies=1", "segsize=1M"]);
    cluster.wait_copied(&migid, 16 * MIB);
    cluster.a.take().unwrap().kill();
    cluster.a = Some(cluster.start("a"));
    cluster
        .a()
        .wait_state(&migid, &["switched-over"], Duration::from_secs(90));
    common::assert_same_images(&source, &destination);
    // Resumed from its saved state, not from zero: what was copied before
    // the kill and not recorded yet is at most a few seconds of copying.
    let copied = cluster.progress(&migid)["copied_bytes"].as_u64().unwrap();
    assert!(copied < 32 * MIB + 8 * MIB, "{copied} bytes copied");
    let on_b = cluster.qemu_io("b", "vm1", &["read -P 0x0b 1M 1M".to_owned()]);
    assert!(clean(&on_b), "{on_b:?}");
}

#[test]
fn a_node_of_another_ca_is_refused_and_changes_nothing() {
    let dir = scratch();
    let cluster = Cluster::new(dir.path());
    // A node calling itself node-a, its certificate from another CA.
    let rogue_dir = dir.path().join("rogue");
    std::fs::create_dir(&rogue_dir).unwrap();
    let rogue = certificates(&rogue_dir, &["node-a"]).remove(0);
    let b_api = format!("{}:{API_PORT}", cluster.net.address("b", "c"));
    let asked = cluster
        .client("curl")
        .args(["-sS", "--max-time", "10", "-k", "-w", "\n%{http_code}"])
        .arg("--cert")
        .arg(rogue.join("client-cert.pem"))
        .arg("--key")
        .arg(rogue.join("client-key.pem"))
        .args(["-H", "content-type: application/json", "-d"])
        .arg(format!(
            r#"{{"path":"{}","size":1048576,"allocated":0,"export":"vm9"}}"#,
            dir.path().join("landing-rogue.raw").display()
        ))
        .arg(format!("https://{b_api}/api/peer/receive"))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&asked.stdout).into_owned()
        + &String::from_utf8_lossy(&asked.stderr);
    assert!(!said.ends_with("200"), "{said}");
    assert!(!dir.path().join("landing-rogue.raw").exists(), "{said}");
    // Its NBD client is refused too: it sees no export of node B.
    let listed = cluster
        .client("nbdinfo")
        .arg("--list")
        .arg(format!(
            "nbds://{}:{NBD_PORT}/?tls-certificates={}&tls-hostname=node-b",
            cluster.net.address("b", "c"),
            path(&rogue)
        ))
        .output()
        .unwrap();
    assert!(!listed.status.success(), "{listed:?}");
    let log = std::fs::read_to_string(dir.path().join("node-b-state.log")).unwrap();
    assert!(
        log.contains("certificate") || log.contains("TLS"),
        "node B logged nothing about the refusal:\n{log}"
    );
}
