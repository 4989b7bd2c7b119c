//! A cluster of three dmm nodes (A, B, C) on a three-member etcd, each
//! node, each etcd member and a client in its own network namespace (all
//! made by the test, removed after). In every run a new volume moves from
//! node A to node B while the client writes 4 KiB blocks with FUA through
//! node C, which forwards them to the owner; at a random instant one
//! fault strikes: node A or B killed with SIGKILL and restarted, an etcd
//! member killed, a node cut off from every etcd member, the link between
//! A and B cut, or a node stopped (SIGSTOP) past its lease and resumed.
//! One run in four is rolled back after the switchover, the others are
//! committed.
//!
//! After each run: every block the client wrote reads back through node C
//! (qemu-img) as its last acknowledged write, or as a write that failed
//! after it; nodes A and B serve the same bytes as C; the three nodes name
//! the same owner under the same token; the move completed (committed or
//! rolled back). The refusals of stale tokens and of fenced nodes are
//! counted and printed with the totals.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Daemon, MIB, certificates, path, soak_seed, source_image};
use dmm_store::BlockStore;
use dmm_testkit::{EtcdMember, Network, enter_namespace, run, tool};

const NBD_PORT: u16 = 10809;
const API_PORT: u16 = 7001;
const ETCD_CLIENT_PORT: u16 = 2379;
const ETCD_PEER_PORT: u16 = 2380;
const NODES: [&str; 3] = ["a", "b", "c"];
const MEMBERS: [&str; 3] = ["e1", "e2", "e3"];
/// Each run's volume.
const VOLUME: u64 = 16 * MIB;
/// Blocks the client writes, spread over the volume.
const SLOTS: u64 = 96;
/// Runs in CI; `DMM_CLUSTER_RUNS` asks for more (scripts/soak cluster).
const RUNS: usize = 50;

/// Nodes, etcd members and the client, each in its namespace.
struct Cluster {
    dir: PathBuf,
    /// node-a, node-b, node-c, client.
    certs: Vec<PathBuf>,
    daemons: Vec<Option<Daemon>>,
    members: Vec<EtcdMember>,
    etcd: Vec<Option<Child>>,
    /// Refusals counted by daemons that were killed since.
    refused_before: Refusals,
    /// Last, so that it goes after the processes in it.
    net: Network,
}

#[derive(Debug, Default, Clone, Copy)]
struct Refusals {
    stale: u64,
    fenced: u64,
}

impl Cluster {
    fn new(dir: &Path) -> Cluster {
        let mut names: Vec<&str> = NODES.to_vec();
        names.extend(MEMBERS);
        names.push("client");
        let net = Network::new(&names);
        let certs = certificates(dir, &["node-a", "node-b", "node-c", "client"]);
        let members = MEMBERS
            .iter()
            .map(|&member| etcd_member(&net, dir, member))
            .collect();
        let mut cluster = Cluster {
            dir: dir.to_owned(),
            certs,
            daemons: vec![None, None, None],
            members,
            etcd: vec![None, None, None],
            refused_before: Refusals::default(),
            net,
        };
        for i in 0..MEMBERS.len() {
            cluster.start_member(i);
        }
        for (i, member) in cluster.members.iter().enumerate() {
            member.wait_healthy(|c| cluster.net.wrap(MEMBERS[i], c), Duration::from_secs(30));
        }
        for node in NODES {
            cluster.start_node(node);
        }
        cluster
    }

    fn start_member(&mut self, i: usize) {
        let command = self.members[i].command(&self.members);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("etcd-{}.log", MEMBERS[i])))
            .unwrap();
        let child = self
            .net
            .wrap(MEMBERS[i], command)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd");
        self.etcd[i] = Some(child);
    }

    fn kill_member(&mut self, i: usize) {
        if let Some(mut child) = self.etcd[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts (or restarts, on the same state) a node.
    fn start_node(&mut self, node: &str) {
        let index = node_index(node);
        let token = self.dir.join("token");
        std::fs::write(&token, "correct-horse-battery-staple").unwrap();
        let peers: Vec<String> = NODES
            .iter()
            .filter(|&&other| other != node)
            .map(|&other| format!("node-{other}={}:{API_PORT}", self.net.address(other, node)))
            .collect();
        let etcd: Vec<String> = MEMBERS
            .iter()
            .map(|&m| format!("http://{}:{ETCD_CLIENT_PORT}", self.net.address(m, node)))
            .collect();
        let (api, nbd) = (format!("0.0.0.0:{API_PORT}"), format!("0.0.0.0:{NBD_PORT}"));
        let name = format!("node-{node}");
        let etcd = etcd.join(",");
        let mut args = vec![
            "--node",
            &name,
            "--listen",
            &api,
            "--token-file",
            path(&token),
            "--tls-certificates",
            path(&self.certs[index]),
            "--nbd-listen",
            &nbd,
            "--tls=require",
            "--etcd",
            &etcd,
            "--lease-ttl",
            "3s",
        ];
        for peer in &peers {
            args.extend(["--peer", peer]);
        }
        let state = self.dir.join(format!("{name}-state"));
        let daemon = Daemon::start_with(&state, &args, |command| self.net.wrap(node, command));
        self.daemons[index] = Some(daemon);
    }

    fn node(&self, node: &str) -> &Daemon {
        self.daemons[node_index(node)]
            .as_ref()
            .expect("the node runs")
    }

    /// SIGKILL, then a restart on the same state.
    fn kill_node(&mut self, node: &str) {
        let counted = refusals(self.node(node));
        self.refused_before.stale += counted.stale;
        self.refused_before.fenced += counted.fenced;
        if let Some(daemon) = self.daemons[node_index(node)].take() {
            daemon.kill();
        }
        std::thread::sleep(Duration::from_millis(300));
        self.start_node(node);
    }

    /// Takes every link between `node` and the etcd members down or up.
    fn cut_from_etcd(&self, node: &str, up: bool) {
        for member in MEMBERS {
            self.net.set_link(node, member, up);
        }
    }

    /// SIGSTOP or SIGCONT to a node.
    fn signal(&self, node: &str, signal: &str) {
        let pid = self.node(node).pid().to_string();
        run(Command::new("kill").args([signal, &pid]));
    }

    /// The URI of `volume` on node C as the client reaches it.
    fn uri_on_c(&self, volume: &str) -> String {
        format!(
            "nbds://{}:{NBD_PORT}/{volume}?tls-certificates={}&tls-hostname=node-c",
            self.net.address("c", "client"),
            path(&self.certs[3])
        )
    }

    /// `volume` as node `node` serves it, copied to a file by qemu-img
    /// run by the client.
    fn copy_from(&self, node: &str, volume: &str) -> Vec<u8> {
        let out = self.dir.join(format!("{volume}-via-{node}.raw"));
        let options = format!(
            "driver=nbd,host={},port={NBD_PORT},export={volume},tls-creds=tls0,tls-hostname=node-{node}",
            self.net.address(node, "client")
        );
        let tls = format!(
            "tls-creds-x509,id=tls0,endpoint=client,dir={}",
            path(&self.certs[3])
        );
        let mut convert = tool("qemu-img");
        convert
            .args([
                "convert",
                "--object",
                &tls,
                "--image-opts",
                &options,
                "-O",
                "raw",
            ])
            .arg(&out);
        run(&mut self.net.wrap("client", convert));
        let bytes = std::fs::read(&out).unwrap();
        std::fs::remove_file(&out).unwrap();
        bytes
    }

    /// The refusals counted by the running nodes and by those killed.
    fn refusals(&self) -> Refusals {
        let mut total = self.refused_before;
        for node in NODES {
            let counted = refusals(self.node(node));
            total.stale += counted.stale;
            total.fenced += counted.fenced;
        }
        total
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..MEMBERS.len() {
            self.kill_member(i);
        }
    }
}

fn node_index(node: &str) -> usize {
    NODES.iter().position(|&n| n == node).expect("a node")
}

/// Member `name`: its client and peer URLs on every link it has.
fn etcd_member(net: &Network, dir: &Path, name: &str) -> EtcdMember {
    let peer = MEMBERS
        .iter()
        .filter(|&&other| other != name)
        .map(|&other| format!("http://{}:{ETCD_PEER_PORT}", net.address(name, other)))
        .collect();
    EtcdMember {
        name: name.to_owned(),
        listen_client: format!("http://0.0.0.0:{ETCD_CLIENT_PORT}"),
        listen_peer: format!("http://0.0.0.0:{ETCD_PEER_PORT}"),
        client: vec![format!(
            "http://{}:{ETCD_CLIENT_PORT}",
            net.address(name, "a")
        )],
        peer,
        data: dir.join(format!("etcd-{name}")),
    }
}

fn refusals(daemon: &Daemon) -> Refusals {
    let output = daemon.cli(&["--json", "nodes"]);
    let view: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_default();
    Refusals {
        stale: view["refused_stale"].as_u64().unwrap_or(0),
        fenced: view["refused_fenced"].as_u64().unwrap_or(0),
    }
}

/// What the client wrote: per block, the last acknowledged value and the
/// values of writes that failed after it (which may or may not have
/// landed).
#[derive(Default)]
struct Ledger {
    acked: HashMap<u64, u8>,
    failed_since: HashMap<u64, Vec<u8>>,
    acks: u64,
    failures: u64,
}

/// The client: FUA writes through node C, one at a time, going on after
/// failures (and reconnecting after a lost connection) until stopped.
struct Writer {
    stop: Arc<Mutex<bool>>,
    ledger: Arc<Mutex<Ledger>>,
    thread: std::thread::JoinHandle<()>,
}

impl Writer {
    fn start(namespace: String, uri: String) -> Writer {
        let stop = Arc::new(Mutex::new(false));
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let thread = {
            let (stop, ledger) = (stop.clone(), ledger.clone());
            std::thread::spawn(move || {
                enter_namespace(&namespace);
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(write_until_stopped(uri, stop, ledger));
            })
        };
        Writer {
            stop,
            ledger,
            thread,
        }
    }

    fn finish(self) -> Ledger {
        *self.stop.lock().unwrap() = true;
        self.thread.join().unwrap();
        std::mem::take(&mut *self.ledger.lock().unwrap())
    }
}

async fn write_until_stopped(uri: String, stop: Arc<Mutex<bool>>, ledger: Arc<Mutex<Ledger>>) {
    let mut store = None;
    let (mut slot, mut value) = (0u64, 1u8);
    while !*stop.lock().unwrap() {
        if store.is_none() {
            let connecting = dmm_nbd::NbdStore::connect_uri(&uri);
            match tokio::time::timeout(Duration::from_secs(5), connecting).await {
                Ok(Ok(connected)) => store = Some(connected),
                _ => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            }
        }
        let connected = store.as_ref().expect("connected");
        let offset = slot * (VOLUME / SLOTS);
        let data = dmm_store::Bytes::from(vec![value; 4096]);
        let written = connected.write(offset, data, true).await;
        {
            let mut ledger = ledger.lock().unwrap();
            match &written {
                Ok(()) => {
                    ledger.acks += 1;
                    ledger.acked.insert(offset, value);
                    ledger.failed_since.remove(&offset);
                }
                Err(_) => {
                    ledger.failures += 1;
                    ledger.failed_since.entry(offset).or_default().push(value);
                }
            }
        }
        if written.is_err_and(|e| e.kind() == dmm_store::ErrorKind::Disconnected) {
            store = None;
        }
        slot = (slot + 1) % SLOTS;
        value = value % 250 + 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// One fault, struck at a random instant of a move.
#[derive(Debug, Clone, Copy)]
enum Fault {
    Kill(&'static str),
    KillMember(usize),
    CutFromEtcd(&'static str),
    CutLink,
    Pause(&'static str),
}

impl Fault {
    fn pick(rng: &mut u64) -> Fault {
        match next(rng) % 8 {
            0 => Fault::Kill("a"),
            1 => Fault::Kill("b"),
            2 => Fault::KillMember((next(rng) % 3) as usize),
            3 => Fault::CutFromEtcd("a"),
            4 => Fault::CutFromEtcd("b"),
            5 => Fault::CutLink,
            6 => Fault::Pause("a"),
            _ => Fault::Pause("b"),
        }
    }

    fn strike(self, cluster: &mut Cluster) {
        match self {
            Fault::Kill(node) => cluster.kill_node(node),
            Fault::KillMember(i) => {
                cluster.kill_member(i);
                std::thread::sleep(Duration::from_secs(3));
                cluster.start_member(i);
            }
            Fault::CutFromEtcd(node) => {
                cluster.cut_from_etcd(node, false);
                std::thread::sleep(Duration::from_secs(4));
                cluster.cut_from_etcd(node, true);
            }
            Fault::CutLink => {
                cluster.net.set_link("a", "b", false);
                std::thread::sleep(Duration::from_secs(3));
                cluster.net.set_link("a", "b", true);
            }
            Fault::Pause(node) => {
                cluster.signal(node, "-STOP");
                std::thread::sleep(Duration::from_secs(4));
                cluster.signal(node, "-CONT");
            }
        }
    }
}

/// xorshift64.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Runs `verb` on node A until it succeeds (a fence may be closed for a
/// moment after a fault), for at most a minute; what it printed.
fn retry_verb(cluster: &Cluster, args: &[&str]) -> String {
    let started = Instant::now();
    loop {
        let output = cluster.node("a").cli(args);
        if output.status.success() {
            return String::from_utf8_lossy(&output.stdout).into_owned();
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "dmm {args:?} kept failing: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Waits for one of `wanted`; a migration that failed is resumed by a
/// verb (counted). At most two minutes.
fn settle(cluster: &Cluster, migid: &str, wanted: &[&str], resumed: &mut u64) {
    let started = Instant::now();
    loop {
        let state = cluster.node("a").state_of(migid);
        if wanted.contains(&state.as_str()) {
            return;
        }
        if state == "failed" {
            *resumed += 1;
            retry_verb(cluster, &["resume", migid]);
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "migration {migid} stuck in {state}: {}",
            cluster.node("a").ok(&["log", migid])
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every block the client wrote holds its last acknowledged write or a
/// write that failed after it; the number of blocks lost.
fn lost_blocks(bytes: &[u8], ledger: &Ledger, what: &str) -> u64 {
    let mut lost = 0;
    for (&offset, &acked) in &ledger.acked {
        let mut allowed = vec![acked];
        allowed.extend(ledger.failed_since.get(&offset).into_iter().flatten());
        let block = &bytes[offset as usize..offset as usize + 4096];
        if let Some(stray) = block.iter().position(|b| !allowed.contains(b)) {
            eprintln!(
                "{what}: byte {stray} of the block at {offset} is {:#x}, not one of {allowed:?}",
                block[stray]
            );
            lost += 1;
        }
    }
    lost
}

/// The owner every node names for `volume`: (node, token).
fn owners(cluster: &Cluster, volume: &str) -> Vec<(String, i64)> {
    NODES
        .iter()
        .map(|&node| {
            let owner = &cluster.node(node).json(&["where", volume])["owner"];
            (
                owner["node"].as_str().unwrap_or("none").to_owned(),
                owner["token"].as_i64().unwrap_or(0),
            )
        })
        .collect()
}

#[test]
fn moves_under_random_faults_lose_no_acknowledged_write() {
    let runs = std::env::var("DMM_CLUSTER_RUNS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(RUNS);
    let dir = common::scratch();
    let mut cluster = Cluster::new(dir.path());
    let mut rng = soak_seed(0x5eed_c105);
    let landing = dir.path().join("landing");
    std::fs::create_dir_all(&landing).unwrap();
    let (mut acks, mut failures, mut lost, mut rolled_back, mut resumed) = (0, 0, 0, 0, 0);
    for run in 0..runs {
        let volume = format!("v{run}");
        let source = source_image(dir.path(), &format!("{volume}.raw"), VOLUME, run as u8);
        let destination = landing.join(format!("{volume}.raw"));
        let created = retry_verb(
            &cluster,
            &[
                "create",
                "-p",
                &format!("source={}", path(&source)),
                "-p",
                &format!("target=node-b:{}", path(&destination)),
                "-p",
                &format!("export={volume}"),
                "-p",
                "rate=8M",
            ],
        );
        let migid = created.trim().to_owned();
        let writer = Writer::start(
            cluster.net.namespace("client").to_owned(),
            cluster.uri_on_c(&volume),
        );
        let fault = Fault::pick(&mut rng);
        std::thread::sleep(Duration::from_millis(next(&mut rng) % 2500));
        fault.strike(&mut cluster);
        settle(&cluster, &migid, &["switched-over"], &mut resumed);
        let roll_back = next(&mut rng).is_multiple_of(4);
        if roll_back {
            retry_verb(&cluster, &["rollback", &migid]);
            settle(&cluster, &migid, &["rolled-back"], &mut resumed);
            rolled_back += 1;
        } else {
            retry_verb(&cluster, &["commit", &migid]);
            settle(&cluster, &migid, &["committed"], &mut resumed);
        }
        std::thread::sleep(Duration::from_millis(300));
        let ledger = writer.finish();
        acks += ledger.acks;
        failures += ledger.failures;
        let what = format!("run {run} ({fault:?}, rolled back: {roll_back})");
        assert!(ledger.acks > 0, "{what}: no write was acknowledged");
        let through_c = cluster.copy_from("c", &volume);
        lost += lost_blocks(&through_c, &ledger, &what);
        for node in ["a", "b"] {
            assert!(
                cluster.copy_from(node, &volume) == through_c,
                "{what}: node {node} serves other bytes than node C"
            );
        }
        let named = owners(&cluster, &volume);
        assert!(
            named.iter().all(|owner| *owner == named[0]),
            "{what}: the nodes disagree on the owner: {named:?}"
        );
        let expected = if roll_back { "node-a" } else { "node-b" };
        assert_eq!(named[0].0, expected, "{what}");
        retry_verb(&cluster, &["delete", &migid]);
        eprintln!(
            "{what}: {} writes acknowledged, {} failed",
            ledger.acks, ledger.failures
        );
    }
    let refused = cluster.refusals();
    eprintln!(
        "{runs} runs: {acks} FUA writes acknowledged ({failures} failed), {lost} lost; \
         refused: {} stale tokens, {} while fenced; {rolled_back} rolled back; \
         {resumed} resumed by a verb",
        refused.stale, refused.fenced
    );
    assert_eq!(lost, 0, "acknowledged writes lost");
}
