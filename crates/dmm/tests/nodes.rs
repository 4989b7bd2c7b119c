//! Daemons that know each other: each started with `--node` and `--peer`,
//! their APIs on TLS with certificates from `dmm tls`. `dmm peers` asks
//! each peer who it is over mutual TLS; a peer route refuses a certificate
//! of the right CA but an unknown name, a client without a certificate
//! and an admin's token; a peer's certificate opens no admin route.

mod common;

use std::path::{Path, PathBuf};

use common::{
    MIB, PeerNode as Node, certificates, clean, path, peer_daemon, qemu_io_on, scratch,
    source_image, tool,
};

/// curl over TLS with `certificates`' CA, and its client certificate if
/// `present`; the body and the status code.
fn curl(url: &str, certificates: &Path, present: bool, extra: &[&str]) -> String {
    let mut command = tool("curl");
    command
        .args([
            "-sS",
            "--max-time",
            "10",
            "-w",
            "\n%{http_code}",
            "--cacert",
        ])
        .arg(certificates.join("ca-cert.pem"));
    if present {
        command
            .arg("--cert")
            .arg(certificates.join("client-cert.pem"))
            .arg("--key")
            .arg(certificates.join("client-key.pem"));
    }
    let output = command.args(extra).arg(url).output().unwrap();
    String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr)
}

#[test]
fn peers_know_each_other_by_certificate_and_nothing_else() {
    let dir = scratch();
    let certs = certificates(dir.path(), &["node-a", "node-b", "rogue"]);
    let (a_certs, b_certs, rogue) = (&certs[0], &certs[1], &certs[2]);
    let a_api = format!("127.0.0.1:{}", dmm_testkit::free_loopback_port());
    let b_api = format!("127.0.0.1:{}", dmm_testkit::free_loopback_port());
    let a = peer_daemon(
        dir.path(),
        "node-a",
        a_certs,
        &a_api,
        &format!("node-b={b_api}"),
        &[],
    );
    let b = peer_daemon(
        dir.path(),
        "node-b",
        b_certs,
        &b_api,
        &format!("node-a={a_api}"),
        &[],
    );

    let peers = a.daemon.json(&["peers"]);
    assert_eq!(peers[0]["name"], "node-b", "{peers}");
    assert_eq!(peers[0]["hello"]["node"], "node-b", "{peers}");
    assert!(peers[0]["error"].is_null(), "{peers}");
    let shown = b.daemon.ok(&["peers"]);
    assert!(
        shown.contains("node-a") && shown.contains(" up "),
        "{shown}"
    );

    let hello = format!("https://{}/api/peer/hello", b.api);
    // A known peer's certificate: served.
    let answer = curl(&hello, a_certs, true, &[]);
    assert!(
        answer.ends_with("200") && answer.contains("\"node-b\""),
        "{answer}"
    );
    // The right CA, an unknown name: refused.
    let answer = curl(&hello, rogue, true, &[]);
    assert!(answer.ends_with("403"), "{answer}");
    // No certificate, even with the admin's token: refused.
    let bearer = "Authorization: Bearer correct-horse-battery-staple";
    let answer = curl(&hello, a_certs, false, &["-H", bearer]);
    assert!(answer.ends_with("403"), "{answer}");
    // A peer's certificate opens no admin route.
    let list = format!("https://{}/api/migrations", b.api);
    let answer = curl(&list, a_certs, true, &[]);
    assert!(answer.ends_with("401"), "{answer}");
    let log = std::fs::read_to_string(b.daemon.state.with_extension("log")).unwrap();
    assert!(
        log.contains("peer route refused") && log.contains("rogue"),
        "{log}"
    );

    // A peer that is gone is shown down, with the reason.
    assert!(b.daemon.stop().success());
    let peers = a.daemon.json(&["peers"]);
    assert!(peers[0]["hello"].is_null(), "{peers}");
    assert!(
        peers[0]["error"]
            .as_str()
            .unwrap()
            .contains("not reachable"),
        "{peers}"
    );
    assert!(a.daemon.stop().success());
}

/// Two nodes that know each other.
fn pair(dir: &Path) -> (Node, Node, Vec<PathBuf>) {
    let certs = certificates(dir, &["node-a", "node-b", "rogue"]);
    let a_api = format!("127.0.0.1:{}", dmm_testkit::free_loopback_port());
    let b_api = format!("127.0.0.1:{}", dmm_testkit::free_loopback_port());
    let a = peer_daemon(
        dir,
        "node-a",
        &certs[0],
        &a_api,
        &format!("node-b={b_api}"),
        &[],
    );
    let b = peer_daemon(
        dir,
        "node-b",
        &certs[1],
        &b_api,
        &format!("node-a={a_api}"),
        &[],
    );
    (a, b, certs)
}

#[test]
fn a_volume_moves_to_a_peer_over_nbd_with_tls_while_a_client_writes() {
    let dir = scratch();
    let (a, b, certs) = pair(dir.path());
    let source = source_image(dir.path(), "vm1.raw", 32 * MIB, 5);
    let landing = dir.path().join("landing");
    std::fs::create_dir(&landing).unwrap();
    let destination = landing.join("vm1.raw");
    let target = format!("target=node-b:{}", path(&destination));
    let source_property = format!("source={}", path(&source));
    let migid = a
        .daemon
        .ok(&[
            "create",
            "-p",
            &source_property,
            "-p",
            &target,
            "-p",
            "export=vm1",
            "-p",
            "rate=8M",
        ])
        .trim()
        .to_owned();
    // A client writes through node A's export during the move.
    let written = tool("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0x6b 20M 1M",
            "-c",
            "read -P 0x6b 20M 1M",
        ])
        .arg(a.daemon.export_uri("vm1"))
        .output()
        .unwrap();
    assert!(written.status.success(), "{written:?}");
    a.daemon.wait_state(
        &migid,
        &["switched-over"],
        std::time::Duration::from_secs(60),
    );
    // Node B received the volume, the client's write included.
    common::assert_same_images(&source, &destination);
    // The handoff: node B serves the volume under its name to any client
    // of the CA, and node A forwards its own clients' writes there.
    let on_b = format!(
        "driver=nbd,host=127.0.0.1,port={},export=vm1,tls-creds=tls0,tls-hostname=node-b",
        b.nbd().rsplit_once(':').unwrap().1
    );
    let qemu_io_b = |commands: &[&str]| {
        let mut command = tool("qemu-io");
        command.args([
            "--object",
            &format!(
                "tls-creds-x509,id=tls0,endpoint=client,dir={}",
                path(&certs[2])
            ),
            "--image-opts",
            &on_b,
        ]);
        for c in commands {
            command.args(["-c", c]);
        }
        command.output().unwrap()
    };
    let started = std::time::Instant::now();
    while !clean(&qemu_io_b(&["read -P 0x6b 20M 1M"])) {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "node B never served vm1: {}",
            a.daemon.ok(&["log", &migid])
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let forwarded = tool("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x7c 24M 64k"])
        .arg(a.daemon.export_uri("vm1"))
        .output()
        .unwrap();
    assert!(forwarded.status.success(), "{forwarded:?}");
    let read = qemu_io_b(&["read -P 0x7c 24M 64k"]);
    assert!(clean(&read), "{read:?}");
    let log = a.daemon.ok(&["log", &migid]);
    assert!(log.contains("node-b serves export vm1 now"), "{log}");
    // One client connection on node A across the commit: it keeps working,
    // its requests going to node B, which owns the volume now.
    use std::io::Write;
    let mut client = tool("qemu-io")
        .args(["-f", "raw"])
        .arg(a.daemon.export_uri("vm1"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut commands = client.stdin.take().unwrap();
    writeln!(commands, "write -P 0x11 28M 64k").unwrap();
    commands.flush().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    a.daemon.ok(&["commit", &migid]);
    writeln!(
        commands,
        "write -P 0x22 29M 64k\nread -P 0x11 28M 64k\nread -P 0x22 29M 64k\nquit"
    )
    .unwrap();
    drop(commands);
    let session = client.wait_with_output().unwrap();
    assert!(clean(&session), "{session:?}");
    let said = String::from_utf8_lossy(&session.stdout);
    assert_eq!(said.matches("read 65536/65536 bytes").count(), 2, "{said}");
    assert!(
        clean(&qemu_io_b(&["read -P 0x22 29M 64k"])),
        "node B holds the write made after the commit"
    );
    let log = a.daemon.ok(&["log", &migid]);
    assert!(log.contains("forwards the clients connected here"), "{log}");
    // The export B offers for the reception is the sending node's only.
    let uri = |certs: &Path| {
        format!(
            "nbds://{}/receive.node-a.vm1?tls-certificates={}&tls-hostname=node-b",
            b.nbd(),
            path(certs)
        )
    };
    let rogue = tool("nbdinfo").arg(uri(&certs[2])).output().unwrap();
    assert!(!rogue.status.success(), "{rogue:?}");
    // A path in use, or relative, is refused with the reason.
    let again = a.daemon.cli(&[
        "create",
        "-p",
        &source_property,
        "-p",
        "target=node-b:relative.raw",
    ]);
    assert!(!again.status.success());
    assert!(a.daemon.stop().success());
    assert!(b.daemon.stop().success());
}

#[test]
fn a_peer_that_never_answers_is_shown_down_within_the_call_limit() {
    let dir = scratch();
    let certs = certificates(dir.path(), &["node-a"]);
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = silent.local_addr().unwrap();
    // Accepts connections and holds them without a byte.
    std::thread::spawn(move || {
        let held: Vec<_> = silent.incoming().take(4).collect();
        std::thread::sleep(std::time::Duration::from_secs(60));
        drop(held);
    });
    let a_api = format!("127.0.0.1:{}", dmm_testkit::free_loopback_port());
    let a = peer_daemon(
        dir.path(),
        "node-a",
        &certs[0],
        &a_api,
        &format!("node-b={address}"),
        &[],
    );
    let started = std::time::Instant::now();
    let peers = a.daemon.json(&["peers"]);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    let error = peers[0]["error"].as_str().unwrap();
    assert!(error.contains("did not answer within 10 s"), "{peers}");
    assert!(a.daemon.stop().success(), "SIGTERM still stops it");
}

#[test]
fn a_rollback_after_the_handoff_brings_back_what_clients_of_both_nodes_wrote() {
    let dir = scratch();
    let (a, b, certs) = pair(dir.path());
    let source = source_image(dir.path(), "vm2.raw", 16 * MIB, 9);
    let destination = dir.path().join("vm2-on-b.raw");
    let migid = a
        .daemon
        .ok(&[
            "create",
            "-p",
            &format!("source={}", path(&source)),
            "-p",
            &format!("target=node-b:{}", path(&destination)),
            "-p",
            "export=vm2",
        ])
        .trim()
        .to_owned();
    a.daemon.wait_state(
        &migid,
        &["switched-over"],
        std::time::Duration::from_secs(60),
    );
    // After the handoff: one write through node A, one through node B
    // (which goes through node A's migration until the commit).
    let on_a = tool("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x3a 1M 64k"])
        .arg(a.daemon.export_uri("vm2"))
        .output()
        .unwrap();
    assert!(clean(&on_a), "{on_a:?}");
    let started = std::time::Instant::now();
    while !clean(&qemu_io_on(&b, &certs[2], "vm2", &["write -P 0x3b 5M 64k"])) {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "node B never served vm2"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    a.daemon.ok(&["rollback", &migid]);
    a.daemon
        .wait_state(&migid, &["rolled-back"], std::time::Duration::from_secs(60));
    a.daemon.ok(&["delete", &migid]);
    // The source holds both writes; node B no longer serves the volume.
    let read = tool("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "read -P 0x3a 1M 64k",
            "-c",
            "read -P 0x3b 5M 64k",
        ])
        .arg(&source)
        .output()
        .unwrap();
    assert!(clean(&read), "{read:?}");
    let gone = qemu_io_on(&b, &certs[2], "vm2", &["read 0 4k"]);
    assert!(!clean(&gone), "{gone:?}");
}
