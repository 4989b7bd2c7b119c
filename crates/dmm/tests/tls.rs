//! NBD over TLS with the clients and servers people run: certificates from
//! `dmm tls init` and `dmm tls issue`; `dmm serve --tls=require` read and
//! written by qemu-io and nbdinfo with their own X.509 credentials, a
//! plaintext client refused with NBD_REP_ERR_TLS_REQD, clients of another
//! CA or outside the allow-list refused; dmm's client copying from
//! qemu-nbd --tls-creds and to nbdkit --tls=require, checked by qemu-img.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{DMM, MIB, Serve, image_with, path, scratch, source_image, tool};

/// `dmm ARGS`, which must succeed; its stdout.
fn dmm(args: &[&str]) -> String {
    let output = Command::new(DMM).args(args).output().unwrap();
    assert!(output.status.success(), "dmm {args:?}: {output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A CA in `dir/ca`, and certificates issued by it for a server (also
/// valid for 127.0.0.1 and localhost) and for clients named `client` and
/// `intruder`; plus a client of another CA.
struct Pki {
    server: PathBuf,
    client: PathBuf,
    intruder: PathBuf,
    stranger: PathBuf,
}

fn pki(dir: &Path) -> Pki {
    let at = |name: &str| dir.join(name);
    dmm(&["tls", "init", path(&dir.join("ca"))]);
    let ca = at("ca");
    let issue = |name: &str, also: &str| {
        let out = at(name);
        let mut args = vec!["tls", "issue", "--ca", path(&ca), name, "--out", path(&out)];
        if !also.is_empty() {
            args.extend(["--also", also]);
        }
        dmm(&args);
        out
    };
    let server = issue("server", "127.0.0.1,localhost");
    let client = issue("client", "");
    let intruder = issue("intruder", "");
    dmm(&["tls", "init", path(&at("other-ca")), "--name", "another CA"]);
    let stranger = at("stranger");
    dmm(&[
        "tls",
        "issue",
        "--ca",
        path(&at("other-ca")),
        "client",
        "--out",
        path(&stranger),
    ]);
    Pki {
        server,
        client,
        intruder,
        stranger,
    }
}

/// `dmm serve IMAGE` on 127.0.0.1:PORT (and a socket) with TLS options.
fn serve_tls(image: &Path, dir: &Path, extra: &[&str]) -> (Serve, u16) {
    let port = dmm_testkit::free_loopback_port();
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec!["--listen", &listen];
    args.extend(extra);
    let serve = Serve::start(image, dir, &args);
    (serve, port)
}

fn nbdinfo(uri: &str) -> Output {
    tool("nbdinfo").arg(uri).output().unwrap()
}

/// qemu-io over TLS with the credentials in `certificates`.
fn qemu_io_tls(port: u16, certificates: &Path, commands: &[&str]) -> Output {
    let mut command = tool("qemu-io");
    command.args([
        "--object",
        &format!(
            "tls-creds-x509,id=tls0,endpoint=client,dir={}",
            path(certificates)
        ),
        "--image-opts",
        &format!("driver=nbd,host=127.0.0.1,port={port},tls-creds=tls0"),
    ]);
    for c in commands {
        command.args(["-c", c]);
    }
    command.output().unwrap()
}

fn text(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr)
}

#[test]
fn a_required_tls_export_serves_qemu_and_libnbd_and_refuses_plaintext() {
    let dir = scratch();
    let pki = pki(dir.path());
    let image = image_with(dir.path(), "disk.raw", 16 * MIB, &[(MIB, 4096, 7)]);
    let certificates = format!("--tls-certificates={}", path(&pki.server));
    let (serve, port) = serve_tls(
        &image,
        dir.path(),
        &["--tls=require", &certificates, "--tls-verify-peer"],
    );
    assert!(
        serve.stderr_first_line.contains("TLS required"),
        "{}",
        serve.stderr_first_line
    );

    // qemu-io writes and reads back through TLS with its own credentials.
    let written = qemu_io_tls(
        port,
        &pki.client,
        &[
            "write -P 0x5a 4M 1M",
            "read -P 0x5a 4M 1M",
            "read -P 7 1M 4096",
        ],
    );
    let said = text(&written);
    assert!(
        written.status.success() && !said.contains("failed"),
        "{said}"
    );
    // libnbd's nbdinfo over TLS.
    let secure = format!(
        "nbds://127.0.0.1:{port}/?tls-certificates={}",
        path(&pki.client)
    );
    let info = nbdinfo(&secure);
    assert!(info.status.success(), "{}", text(&info));
    assert!(
        text(&info).contains(&format!("export-size: {}", 16 * MIB)),
        "{}",
        text(&info)
    );
    // In clear: refused before any export is named.
    let plain = nbdinfo(&format!("nbd://127.0.0.1:{port}/"));
    assert!(!plain.status.success());
    assert!(text(&plain).contains("TLS"), "{}", text(&plain));
    // A client of another CA: refused in the TLS handshake.
    let stranger = format!(
        "nbds://127.0.0.1:{port}/?tls-certificates={}",
        path(&pki.stranger)
    );
    let refused = nbdinfo(&stranger);
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(serve.stop().success());
    let data = std::fs::read(&image).unwrap();
    assert!(
        data[4 << 20..5 << 20].iter().all(|&b| b == 0x5a),
        "qemu-io's data is in the image"
    );
}

#[test]
fn only_clients_on_the_allow_list_get_in() {
    let dir = scratch();
    let pki = pki(dir.path());
    let image = image_with(dir.path(), "disk.raw", 4 * MIB, &[]);
    let certificates = format!("--tls-certificates={}", path(&pki.server));
    let (serve, port) = serve_tls(
        &image,
        dir.path(),
        &["--tls=require", &certificates, "--tls-allow=client"],
    );
    let uri = |certs: &Path| format!("nbds://127.0.0.1:{port}/?tls-certificates={}", path(certs));
    assert!(nbdinfo(&uri(&pki.client)).status.success());
    let intruder = nbdinfo(&uri(&pki.intruder));
    assert!(
        !intruder.status.success(),
        "same CA, another name: {}",
        text(&intruder)
    );
    assert!(serve.stop().success());
}

#[test]
fn an_offered_tls_serves_both_and_dmm_refuses_a_server_without_it() {
    let dir = scratch();
    let pki = pki(dir.path());
    let image = image_with(dir.path(), "disk.raw", 4 * MIB, &[(0, 4096, 3)]);
    let certificates = format!("--tls-certificates={}", path(&pki.server));
    let (serve, port) = serve_tls(&image, dir.path(), &["--tls=on", &certificates]);
    assert!(
        nbdinfo(&format!("nbd://127.0.0.1:{port}/"))
            .status
            .success(),
        "in clear"
    );
    let secure = format!(
        "nbds://127.0.0.1:{port}/?tls-certificates={}",
        path(&pki.client)
    );
    assert!(nbdinfo(&secure).status.success(), "over TLS");
    assert!(serve.stop().success());

    // dmm asked for TLS never falls back to plaintext.
    let (plain, port) = serve_tls(&image, dir.path(), &[]);
    let copy = dir.path().join("copy.raw");
    let uri = format!(
        "nbds://127.0.0.1:{port}/?tls-certificates={}",
        path(&pki.client)
    );
    let output = Command::new(DMM)
        .args(["migrate", "--exit-when-done", &uri, path(&copy)])
        .output()
        .unwrap();
    let said = text(&output);
    assert!(
        !output.status.success() && said.contains("does not offer TLS"),
        "{said}"
    );
    assert!(plain.stop().success());
}

#[test]
fn dmm_migrates_from_qemu_nbd_and_to_nbdkit_over_tls() {
    let dir = scratch();
    let pki = pki(dir.path());
    let source = source_image(dir.path(), "source.raw", 32 * MIB, 11);
    let middle = image_with(dir.path(), "middle.raw", 32 * MIB, &[]);
    let target = image_with(dir.path(), "target.raw", 32 * MIB, &[]);
    let qemu_port = dmm_testkit::free_loopback_port();
    let mut qemu = tool("qemu-nbd")
        .args([
            "--object",
            &format!(
                "tls-creds-x509,id=tls0,endpoint=server,dir={}",
                path(&pki.server)
            ),
            "--tls-creds",
            "tls0",
            "-f",
            "raw",
            "-b",
            "127.0.0.1",
            "-p",
            &qemu_port.to_string(),
            "-x",
            "disk",
            "--persistent",
            path(&source),
        ])
        .spawn()
        .unwrap();
    let kit_port = dmm_testkit::free_loopback_port();
    let mut kit = tool("nbdkit")
        .args([
            "--foreground",
            "--tls=require",
            &format!("--tls-certificates={}", path(&pki.server)),
            "--tls-verify-peer",
            "-i",
            "127.0.0.1",
            "-p",
            &kit_port.to_string(),
            "file",
            path(&target),
        ])
        .spawn()
        .unwrap();
    for port in [qemu_port, kit_port] {
        common::wait_for_port(port);
    }
    let client = path(&pki.client);
    let from = format!("nbds://127.0.0.1:{qemu_port}/disk?tls-certificates={client}");
    let to = format!("nbds://127.0.0.1:{kit_port}/?tls-certificates={client}");
    dmm(&["migrate", "--exit-when-done", &from, path(&middle)]);
    dmm(&["migrate", "--exit-when-done", path(&middle), &to]);
    let _ = qemu.kill();
    let _ = kit.kill();
    let _ = qemu.wait();
    let _ = kit.wait();
    common::assert_same_images(&source, &target);
}

#[test]
fn the_daemon_serves_its_volumes_over_tls_only() {
    let dir = scratch();
    let pki = pki(dir.path());
    let port = dmm_testkit::free_loopback_port();
    let listen = format!("127.0.0.1:{port}");
    let certificates = format!("--tls-certificates={}", path(&pki.server));
    let daemon = common::Daemon::start(
        &dir.path().join("state"),
        &[
            "--nbd-listen",
            &listen,
            "--tls=require",
            &certificates,
            "--tls-allow=client",
        ],
    );
    let (migid, _, _) = common::create_volume(
        &daemon,
        dir.path(),
        "",
        (8 * MIB, 3),
        &["export=vm1", "rate=1M"],
    );
    assert_eq!(daemon.state_of(&migid), "running");
    let secure = format!(
        "nbds://127.0.0.1:{port}/vm1?tls-certificates={}",
        path(&pki.client)
    );
    let info = nbdinfo(&secure);
    assert!(info.status.success(), "{}", text(&info));
    assert!(
        text(&info).contains(&format!("export-size: {}", 8 * MIB)),
        "{}",
        text(&info)
    );
    let plain = nbdinfo(&format!("nbd://127.0.0.1:{port}/vm1"));
    assert!(
        !plain.status.success() && text(&plain).contains("TLS"),
        "{}",
        text(&plain)
    );
    let intruder = nbdinfo(&format!(
        "nbds://127.0.0.1:{port}/vm1?tls-certificates={}",
        path(&pki.intruder)
    ));
    assert!(!intruder.status.success(), "{}", text(&intruder));
    assert!(daemon.stop().success());
}
