//! `dmm serve` with the clients people actually run: qemu-io, qemu-img,
//! nbdinfo, nbdcopy and fio. Each test passes only when the real client
//! says the data is right.

mod common;

use std::process::Command;

use common::{DMM, Serve, image_with, run, scratch, stdout, tool};

const MIB: u64 = 1 << 20;

fn qemu_io(uri: &str, commands: &[&str]) -> String {
    let mut command = tool("qemu-io");
    command.args(["-f", "raw"]);
    for c in commands {
        command.args(["-c", c]);
    }
    let output = stdout(command.arg(uri));
    assert!(
        !output.contains("Pattern verification failed") && !output.contains("failed:"),
        "qemu-io reported a failure:\n{output}"
    );
    output
}

#[test]
fn qemu_io_patterns_land_in_the_image_and_survive_sigterm() {
    let dir = scratch();
    let image = image_with(dir.path(), "disk.raw", 64 * MIB, &[]);
    let serve = Serve::start(&image, dir.path(), &["--export", "disk0"]);
    let named = format!("nbd+unix:///disk0?socket={}", serve.socket.display());
    qemu_io(
        &named,
        &[
            "write -P 0xab 0 1M",
            "write -P 0xcd 1M 64k",
            "write -P 0x11 5000 3000",
            "write -z 2M 1M",
            "discard 4M 1M",
            "flush",
        ],
    );
    // The empty name reaches the same export.
    qemu_io(
        &serve.uri(),
        &[
            "read -P 0xab 0 4096",
            "read -P 0x11 5000 3000",
            "read -P 0xcd 1M 64k",
            "read -P 0 2M 1M",
            "write -P 0x22 8M 512k -f",
        ],
    );
    assert!(
        serve.stop().success(),
        "SIGTERM must end dmm serve with status 0"
    );
    // What the clients wrote is in the file itself.
    qemu_io(
        image.to_str().unwrap(),
        &[
            "read -P 0xcd 1M 64k",
            "read -P 0x22 8M 512k",
            "read -P 0 2M 1M",
        ],
    );
}

#[test]
fn qemu_img_convert_in_and_out_and_compare() {
    let dir = scratch();
    let size = 32 * MIB;
    let source = image_with(
        dir.path(),
        "source.raw",
        size,
        &[
            (0, 65536, 1),
            (3 * MIB, 2 * MIB as usize, 2),
            (size - 4096, 4096, 3),
        ],
    );
    let target = image_with(dir.path(), "export.raw", size, &[]);
    let serve = Serve::start(&target, dir.path(), &[]);
    let uri = serve.uri();
    run(tool("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&source)
        .arg(&uri));
    run(tool("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&source)
        .arg(&uri));
    let out = dir.path().join("out.qcow2");
    run(tool("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&uri)
        .arg(&out));
    run(tool("qemu-img")
        .args(["compare", "-f", "raw", "-F", "qcow2"])
        .arg(&source)
        .arg(&out));
    // qemu-img sees a difference when there is one.
    run(tool("qemu-io")
        .args(["-f", "raw", "-c", "write -P 9 20M 4k"])
        .arg(&uri));
    let differs = tool("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&source)
        .arg(&uri)
        .output()
        .unwrap();
    assert_eq!(
        differs.status.code(),
        Some(1),
        "compare must notice the change"
    );
    assert!(serve.stop().success());
}

#[test]
fn nbdinfo_lists_the_export_and_maps_real_holes() {
    let dir = scratch();
    let size = 16 * MIB;
    let image = image_with(
        dir.path(),
        "sparse.raw",
        size,
        &[(0, MIB as usize, 0x5a), (3 * MIB, 65536, 0x6b)],
    );
    let serve = Serve::start(&image, dir.path(), &["--export", "vm-root"]);
    let base = format!("nbd+unix:///?socket={}", serve.socket.display());
    let list = stdout(tool("nbdinfo").args(["--list", &base]));
    assert!(list.contains("export=\"vm-root\""), "{list}");
    let named = format!("nbd+unix:///vm-root?socket={}", serve.socket.display());
    let info = stdout(tool("nbdinfo").args(["--json", &named]));
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["exports"][0]["export-size"], size);
    let map = stdout(tool("nbdinfo").args(["--map", "--json", &named]));
    let map: serde_json::Value = serde_json::from_str(&map).unwrap();
    let extents: Vec<(u64, u64, bool)> = map
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let hole = e["type"].as_u64().unwrap() & 1 != 0;
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                hole,
            )
        })
        .collect();
    assert_eq!(
        extents,
        vec![
            (0, MIB, false),
            (MIB, 2 * MIB, true),
            (3 * MIB, 65536, false),
            (3 * MIB + 65536, size - 3 * MIB - 65536, true),
        ],
        "the map must follow the file's holes"
    );
}

#[test]
fn nbdcopy_in_both_directions() {
    let dir = scratch();
    let size = 24 * MIB;
    let pieces: Vec<(u64, usize, u8)> = (0..24u64)
        .filter(|i| i % 3 != 1)
        .map(|i| (i * MIB + i * 4096, 100_000, i as u8 + 1))
        .collect();
    let source = image_with(dir.path(), "source.raw", size, &pieces);
    let target = image_with(dir.path(), "export.raw", size, &[]);
    let serve = Serve::start(&target, dir.path(), &[]);
    run(tool("nbdcopy").arg(&source).arg(serve.uri()));
    let back = image_with(dir.path(), "back.raw", size, &[]);
    run(tool("nbdcopy").arg(serve.uri()).arg(&back));
    run(tool("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&source)
        .arg(&back));
    assert!(serve.stop().success());
    run(tool("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&source)
        .arg(&target));
}

fn fio(uri: &str, extra: &[&str]) -> String {
    let uri = format!("--uri={uri}");
    let mut args = vec![
        "--name=verify",
        "--ioengine=nbd",
        &uri,
        "--iodepth=32",
        "--randseed=1234",
    ];
    args.extend(extra);
    common::fio(&args)
}

#[test]
fn fio_random_writes_verify_with_crc32c() {
    let dir = scratch();
    let image = image_with(dir.path(), "fio.raw", 64 * MIB, &[]);
    let serve = Serve::start(&image, dir.path(), &[]);
    // Write (and verify in the same run), then verify again in a new run.
    fio(&serve.uri(), &["--size=48M", "--do_verify=1"]);
    fio(&serve.uri(), &["--size=48M", "--verify_only"]);
    assert!(serve.stop().success());
}

#[test]
fn two_clients_at_once_each_see_their_data() {
    let dir = scratch();
    let image = image_with(dir.path(), "shared.raw", 64 * MIB, &[]);
    let serve = Serve::start(&image, dir.path(), &[]);
    let uri = serve.uri();
    let jobs: Vec<_> = [("0", "1"), ("32M", "2")]
        .into_iter()
        .map(|(offset, seed)| {
            let uri = uri.clone();
            std::thread::spawn(move || {
                fio(
                    &uri,
                    &[
                        &format!("--offset={offset}"),
                        "--size=24M",
                        &format!("--randseed={seed}"),
                    ],
                )
            })
        })
        .collect();
    for job in jobs {
        job.join().expect("fio thread");
    }
    fio(
        &uri,
        &["--offset=0", "--size=24M", "--randseed=1", "--verify_only"],
    );
    fio(
        &uri,
        &[
            "--offset=32M",
            "--size=24M",
            "--randseed=2",
            "--verify_only",
        ],
    );
}

#[test]
fn a_client_vanishing_mid_request_changes_nothing() {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    let dir = scratch();
    let image = image_with(dir.path(), "cut.raw", 16 * MIB, &[]);
    let serve = Serve::start(&image, dir.path(), &[]);
    let mut stream = UnixStream::connect(&serve.socket).unwrap();
    let mut greeting = [0u8; 18];
    stream.read_exact(&mut greeting).unwrap();
    let mut hello = 3u32.to_be_bytes().to_vec();
    dmm_nbd::proto::ClientOption::ExportName(String::new()).encode(&mut hello);
    stream.write_all(&hello).unwrap();
    let mut info = [0u8; 10];
    stream.read_exact(&mut info).unwrap();
    let mut request = Vec::new();
    dmm_nbd::proto::RequestHeader {
        flags: 0,
        command: dmm_nbd::proto::Command::Write,
        cookie: 7,
        offset: MIB,
        length: 65536,
    }
    .encode(&mut request);
    request.extend(vec![0xee; 10_000]);
    stream.write_all(&request).unwrap();
    drop(stream);
    // Another client still gets served, and sees no trace of the cut write.
    qemu_io(&serve.uri(), &["read -P 0 1M 64k"]);
    assert!(serve.stop().success());
    qemu_io(image.to_str().unwrap(), &["read -P 0 1M 64k"]);
}

#[test]
fn read_only_export_refuses_writes() {
    let dir = scratch();
    let image = image_with(dir.path(), "ro.raw", 4 * MIB, &[(0, 4096, 7)]);
    let serve = Serve::start(&image, dir.path(), &["--read-only"]);
    let info = stdout(tool("nbdinfo").arg(serve.uri()));
    assert!(info.contains("is_read_only: true"), "{info}");
    let write = tool("qemu-io")
        .args(["-f", "raw", "-c", "write -P 1 0 4k"])
        .arg(serve.uri())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&write.stdout) + String::from_utf8_lossy(&write.stderr);
    assert!(!write.status.success() || said.contains("failed"), "{said}");
    assert!(
        said.contains("ermission") || said.contains("read-only"),
        "{said}"
    );
    let read = stdout(
        tool("qemu-io")
            .args(["-r", "-f", "raw", "-c", "read -P 7 0 4k"])
            .arg(serve.uri()),
    );
    assert!(!read.contains("verification failed"), "{read}");
}

#[test]
fn tcp_listener_serves_on_the_reported_port() {
    let dir = scratch();
    let image = image_with(dir.path(), "tcp.raw", 4 * MIB, &[(4096, 4096, 9)]);
    let mut child = Command::new(DMM)
        .arg("serve")
        .arg(&image)
        .args(["--listen", "127.0.0.1:0"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stderr.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    let addr = line.rsplit("tcp:").next().unwrap().trim().to_owned();
    let uri = format!("nbd://{addr}/");
    let result = std::panic::catch_unwind(|| qemu_io(&uri, &["read -P 9 4096 4096"]));
    common::terminate(&child);
    let status = common::wait_with_timeout(&mut child, std::time::Duration::from_secs(20));
    result.unwrap();
    assert!(status.expect("dmm serve stops").success());
}

#[test]
fn bad_paths_give_one_line_and_a_failure_status() {
    let dir = scratch();
    let cases = [dir.path().join("missing.raw"), dir.path().to_path_buf()];
    for path in cases {
        let output = Command::new(DMM)
            .arg("serve")
            .arg(&path)
            .arg("--socket")
            .arg(dir.path().join("never.sock"))
            .output()
            .unwrap();
        assert!(!output.status.success(), "{path:?} must be refused");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
        assert!(
            stderr.contains(&path.display().to_string()),
            "names the path: {stderr}"
        );
        assert!(!dir.path().join("never.sock").exists());
    }
    let output = Command::new(DMM).arg("serve").output().unwrap();
    assert!(!output.status.success(), "a missing argument is refused");
}
