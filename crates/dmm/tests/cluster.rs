//! Two daemons in a cluster on a real etcd (`--etcd`): each volume a
//! migration exports is owned by one node, a move hands it to its peer
//! under a new fencing token and a rollback takes it back, `dmm where`
//! and `dmm nodes` say so, a node refuses a volume another node owns, a
//! node that does not serve a volume forwards its clients to the owner
//! under the owner's token while a stale token is refused and counted,
//! and a node cut off from etcd refuses its clients (EPERM, counted)
//! until its lease is renewed.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    MIB, PeerNode, certificates, clean, path, peer_daemon, qemu_io_on, scratch, source_image,
};
use dmm_testkit::Etcd;

/// Two nodes that know each other, in the cluster on `etcd`.
fn pair(dir: &Path, etcd: &Etcd) -> (PeerNode, PeerNode, Vec<std::path::PathBuf>) {
    let certs = certificates(dir, &["node-a", "node-b", "client"]);
    let a_api = format!("127.0.0.1:{}", dmm_testkit::free_loopback_port());
    let b_api = format!("127.0.0.1:{}", dmm_testkit::free_loopback_port());
    let endpoint = etcd.endpoint();
    let cluster = ["--etcd", &endpoint, "--lease-ttl", "3s"];
    let a = peer_daemon(
        dir,
        "node-a",
        &certs[0],
        &a_api,
        &format!("node-b={b_api}"),
        &cluster,
    );
    let b = peer_daemon(
        dir,
        "node-b",
        &certs[1],
        &b_api,
        &format!("node-a={a_api}"),
        &cluster,
    );
    (a, b, certs)
}

/// A move of a new 16 MiB volume from node A to node B, exported as
/// `export`, at `rate`; its migration ID.
fn start_move(dir: &Path, a: &PeerNode, export: &str, rate: &str) -> String {
    let source = source_image(dir, &format!("{export}.raw"), 16 * MIB, 3);
    let destination = dir.join(format!("{export}-on-b.raw"));
    a.daemon
        .ok(&[
            "create",
            "-p",
            &format!("source={}", path(&source)),
            "-p",
            &format!("target=node-b:{}", path(&destination)),
            "-p",
            &format!("export={export}"),
            "-p",
            &format!("rate={rate}"),
        ])
        .trim()
        .to_owned()
}

/// A move as [`start_move`] makes, once switched over.
fn move_to_b(dir: &Path, a: &PeerNode, export: &str) -> String {
    let migid = start_move(dir, a, export, "0");
    a.daemon
        .wait_state(&migid, &["switched-over"], Duration::from_secs(60));
    migid
}

/// `dmm where VOLUME` on `node`, as JSON.
fn owner(node: &PeerNode, volume: &str) -> serde_json::Value {
    node.daemon.json(&["where", volume])["owner"].clone()
}

/// Waits until `check` holds, for at most `within`.
fn eventually(within: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_move_hands_ownership_over_under_a_new_token() {
    let dir = scratch();
    let etcd = Etcd::start();
    let (a, b, certs) = pair(dir.path(), &etcd);
    let (a_certificates, client) = (&certs[0], &certs[2]);

    let nodes = a.daemon.json(&["nodes"]);
    let names: Vec<&str> = nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["node-a", "node-b"], "{nodes}");
    assert_eq!(nodes["fenced"], false, "{nodes}");

    // Committed: node B owns vol1 under the token of the handoff.
    let committed = start_move(dir.path(), &a, "vol1", "8M");
    let first = owner(&a, "vol1");
    assert_eq!(first["node"], "node-a", "{first}");
    a.daemon
        .wait_state(&committed, &["switched-over"], Duration::from_secs(60));
    eventually(Duration::from_secs(20), "node B serves vol1", || {
        clean(&qemu_io_on(&b, client, "vol1", &["read 0 64k"]))
    });
    let handed = owner(&b, "vol1");
    assert_eq!(handed["node"], "node-b", "{handed}");
    assert_eq!(handed["moving"]["phase"], "handed", "{handed}");
    assert_eq!(handed["moving"]["from"], "node-a", "{handed}");
    a.daemon.ok(&["commit", &committed]);
    let after = owner(&a, "vol1");
    assert_eq!(after["moving"]["phase"], "committed", "{after}");
    assert_eq!(
        after["token"], handed["token"],
        "the commit keeps the token"
    );
    a.daemon.ok(&["delete", &committed]);
    let after = owner(&a, "vol1");
    assert_eq!(after["node"], "node-b", "{after}");
    assert!(after["moving"].is_null(), "{after}");
    let shown = a.daemon.ok(&["where", "vol1"]);
    assert!(shown.contains("owned by node-b (up)"), "{shown}");
    // Node A serves vol1 no more: its clients are forwarded to node B,
    // under node B's token.
    let through_a = qemu_io_on(&a, client, "vol1", &["write -P 0x4d 2M 64k"]);
    assert!(clean(&through_a), "{through_a:?}");
    let on_b = qemu_io_on(&b, client, "vol1", &["read -P 0x4d 2M 64k"]);
    assert!(clean(&on_b), "{on_b:?}");
    // A request under a token that is not current is refused, and counted.
    let old_token = format!("vol1@{}", first["token"]);
    let stale = qemu_io_on(&b, a_certificates, &old_token, &["read 0 4k"]);
    let said = String::from_utf8_lossy(&stale.stdout) + String::from_utf8_lossy(&stale.stderr);
    assert!(said.contains("Operation not permitted"), "{said}");
    let nodes = b.daemon.json(&["nodes"]);
    assert!(nodes["refused_stale"].as_u64().unwrap() > 0, "{nodes}");

    // Rolled back: node A owns vol2 again, under a newer token.
    let rolled = move_to_b(dir.path(), &a, "vol2");
    let handed = owner(&a, "vol2");
    eventually(Duration::from_secs(20), "handed to node B", || {
        owner(&a, "vol2")["node"] == "node-b"
    });
    a.daemon.ok(&["rollback", &rolled]);
    a.daemon
        .wait_state(&rolled, &["rolled-back"], Duration::from_secs(60));
    let back = owner(&a, "vol2");
    assert_eq!(back["node"], "node-a", "{back}");
    assert!(back["moving"].is_null(), "{back}");
    assert!(
        back["token"].as_i64() > handed["token"].as_i64(),
        "{handed} then {back}"
    );

    // A volume another node owns is refused, naming the owner.
    let image = source_image(dir.path(), "vol3.raw", 4 * MIB, 1);
    let copy = source_image(dir.path(), "vol3-copy.raw", 4 * MIB, 0);
    let refused = b.daemon.cli(&[
        "create",
        "-p",
        &format!("source={}", path(&image)),
        "-p",
        &format!("target={}", path(&copy)),
        "-p",
        "export=vol2",
    ]);
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{refused:?}");
    assert!(said.contains("owned by node-a"), "{said}");

    let nodes = b.daemon.json(&["nodes"]);
    let b_owns = &nodes["nodes"][1]["owns"];
    assert_eq!(b_owns, &serde_json::json!(["vol1"]), "{nodes}");
    assert!(a.daemon.stop().success());
    let nodes = b.daemon.json(&["nodes"]);
    let a_shown = &nodes["nodes"][0];
    assert_eq!(
        (a_shown["name"].as_str(), a_shown["up"].as_bool()),
        (Some("node-a"), Some(false)),
        "a node that left but owns volumes is down: {nodes}"
    );
    assert!(b.daemon.stop().success());
}

#[test]
fn a_node_cut_off_from_etcd_refuses_its_clients_until_renewed() {
    let dir = scratch();
    let mut etcd = Etcd::start();
    let (a, b, certs) = pair(dir.path(), &etcd);
    let client = &certs[2];
    move_to_b(dir.path(), &a, "vol");
    eventually(Duration::from_secs(20), "node B serves vol", || {
        clean(&qemu_io_on(&b, client, "vol", &["write -P 0x5a 0 64k"]))
    });

    etcd.kill();
    let killed = Instant::now();
    // The fence closes two thirds of the 3 s TTL after the last renewal.
    eventually(Duration::from_secs(4), "node B refuses", || {
        let read = qemu_io_on(&b, client, "vol", &["read 0 4k"]);
        String::from_utf8_lossy(&read.stdout).contains("Operation not permitted")
            || String::from_utf8_lossy(&read.stderr).contains("Operation not permitted")
    });
    assert!(
        killed.elapsed() < Duration::from_secs(4),
        "{:?}",
        killed.elapsed()
    );
    let failed = b.daemon.cli(&["nodes"]);
    assert!(!failed.status.success());
    assert!(
        String::from_utf8_lossy(&failed.stderr).contains("etcd is unavailable"),
        "{failed:?}"
    );

    etcd.restart();
    eventually(Duration::from_secs(15), "node B serves vol again", || {
        clean(&qemu_io_on(&b, client, "vol", &["read -P 0x5a 0 64k"]))
    });
    // B's requests go through A's export until the commit: whichever
    // node's fence closed first refused them.
    let (on_a, on_b) = (a.daemon.json(&["nodes"]), b.daemon.json(&["nodes"]));
    let refused = |view: &serde_json::Value| view["refused_fenced"].as_u64().unwrap();
    assert!(refused(&on_a) + refused(&on_b) > 0, "{on_a}\n{on_b}");
    assert_eq!(on_b["fenced"], false, "{on_b}");
    assert!(a.daemon.stop().success());
    assert!(b.daemon.stop().success());
}
