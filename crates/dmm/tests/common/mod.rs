//! Helpers for the end-to-end tests: run the real `dmm` binary and the real
//! clients (qemu-io, qemu-img, nbdinfo, nbdcopy, fio) against it.

#![allow(dead_code)]

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const DMM: &str = env!("CARGO_BIN_EXE_dmm");
pub const MIB: u64 = 1 << 20;

#[allow(unused_imports)] // Not every test binary uses every one.
pub use dmm_testkit::{LoopMount, NOBODY, run, stdout, tool};

/// A running `dmm serve`.
pub struct Serve {
    child: Option<Child>,
    pub socket: PathBuf,
    pub stderr_first_line: String,
}

impl Serve {
    /// Starts `dmm serve IMAGE --socket DIR/nbd.sock EXTRA…` and waits until
    /// it accepts connections.
    pub fn start(image: &Path, dir: &Path, extra: &[&str]) -> Serve {
        let socket = dir.join("nbd.sock");
        let mut child = Command::new(DMM)
            .arg("serve")
            .arg(image)
            .arg("--socket")
            .arg(&socket)
            .args(extra)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start dmm serve");
        let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
        let mut line = String::new();
        stderr
            .read_line(&mut line)
            .expect("first line of dmm serve");
        std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
        assert!(socket.exists(), "dmm serve did not start: {line}");
        Serve {
            child: Some(child),
            socket,
            stderr_first_line: line,
        }
    }

    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn stop(mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        terminate(&child);
        wait_with_timeout(&mut child, Duration::from_secs(20)).expect("dmm serve did not stop")
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn terminate(child: &Child) {
    let pid = rustix::process::Pid::from_raw(child.id() as i32).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
}

pub fn wait_with_timeout(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(status) = child.try_wait().expect("wait") {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// A sparse image of `size` bytes with `pieces` of data: (offset, length,
/// byte value).
pub fn image_with(dir: &Path, name: &str, size: u64, pieces: &[(u64, usize, u8)]) -> PathBuf {
    use std::os::unix::fs::FileExt;
    let path = dir.join(name);
    let file = std::fs::File::create(&path).expect("create image");
    file.set_len(size).expect("size image");
    for &(offset, len, value) in pieces {
        file.write_all_at(&vec![value; len], offset)
            .expect("write image");
    }
    file.sync_all().expect("sync image");
    path
}

/// A scratch directory under the target directory (a real disk filesystem,
/// where holes behave as on a production host).
pub fn scratch() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("scratch dir")
}

/// Runs fio's random-write verification job (crc32c) with `args` added;
/// fails the test unless fio reports no error.
pub fn fio(args: &[&str]) -> String {
    let output = stdout(
        tool("fio")
            .args([
                "--rw=randwrite",
                "--bs=4k",
                "--verify=crc32c",
                "--verify_state_save=0",
            ])
            .args(args),
    );
    assert!(
        output.contains("err= 0"),
        "fio reported an error:\n{output}"
    );
    output
}

/// The bytes qemu-io reads from `target` (`read -v`, its hex dump).
pub fn qemu_io_bytes(target: &str, offset: u64, len: u64) -> Vec<u8> {
    let text = stdout(
        tool("qemu-io")
            .args(["-r", "-f", "raw", "-c"])
            .arg(format!("read -v {offset} {len}"))
            .arg(target),
    );
    let bytes: Vec<u8> = text
        .lines()
        .filter_map(|line| line.split_once(":  "))
        .flat_map(|(_, rest)| {
            // 16 bytes as hex pairs, then their characters.
            rest.split(' ')
                .take(16)
                .map_while(|pair| u8::from_str_radix(pair, 16).ok())
                .collect::<Vec<u8>>()
        })
        .collect();
    assert_eq!(
        bytes.len() as u64,
        len,
        "qemu-io read -v of {target}:\n{text}"
    );
    bytes
}

/// Runs qemu-io with many `-c` commands (in batches) on `target`; fails the
/// test if a pattern check fails.
pub fn qemu_io_checks(target: &str, read_only: bool, commands: &[String], what: &str) {
    for batch in commands.chunks(200) {
        let mut qemu_io = tool("qemu-io");
        if read_only {
            qemu_io.arg("-r");
        }
        qemu_io.args(["-f", "raw"]);
        for command in batch {
            qemu_io.args(["-c", command]);
        }
        let output = qemu_io.arg(target).output().expect("qemu-io runs");
        let text = String::from_utf8_lossy(&output.stdout);
        let failed: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("verification failed"))
            .collect();
        assert!(failed.is_empty(), "{what}:\n{}", failed.join("\n"));
        assert!(
            output.status.success(),
            "{what}: qemu-io failed\n{text}{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// A `dmm daemon` on a state directory.
pub struct Daemon {
    child: Option<Child>,
    pub state: PathBuf,
}

impl Daemon {
    pub fn start(state: &Path, extra: &[&str]) -> Daemon {
        Daemon::start_with(state, extra, |command| command)
    }

    /// Starts the daemon through `wrap`, which may put the command under
    /// another one (e.g. to drop capabilities).
    pub fn start_with(
        state: &Path,
        extra: &[&str],
        wrap: impl FnOnce(Command) -> Command,
    ) -> Daemon {
        let mut command = Command::new(DMM);
        command
            .arg("daemon")
            .arg("--state-dir")
            .arg(state)
            .args(extra);
        // Its log, next to the state directory, for a test that fails.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(state.with_extension("log"))
            .expect("daemon log");
        let child = wrap(command)
            .stdin(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start dmm daemon");
        let daemon = Daemon {
            child: Some(child),
            state: state.to_owned(),
        };
        let started = Instant::now();
        while daemon.cli(&["list"]).status.code() != Some(0) {
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "the daemon did not come up"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        daemon
    }

    /// The daemon's process ID.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(DMM)
            .arg("--state-dir")
            .arg(&self.state)
            .args(args)
            .output()
            .expect("run dmm")
    }

    /// Runs a verb that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let output = self.cli(args);
        assert!(
            output.status.success(),
            "dmm {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut with_json = vec!["--json"];
        with_json.extend(args);
        serde_json::from_str(&self.ok(&with_json)).expect("JSON output")
    }

    pub fn state_of(&self, migid: &str) -> String {
        self.json(&["stat", migid])["state"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    pub fn wait_state(&self, migid: &str, wanted: &[&str], limit: Duration) -> String {
        let started = Instant::now();
        loop {
            let state = self.state_of(migid);
            if wanted.contains(&state.as_str()) {
                return state;
            }
            assert!(
                state != "failed",
                "migration {migid} failed: {}",
                self.ok(&["log", migid])
            );
            assert!(
                started.elapsed() < limit,
                "migration {migid} stuck in {state}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn export_uri(&self, export: &str) -> String {
        format!(
            "nbd+unix:///{export}?socket={}",
            self.state.join("nbd.sock").display()
        )
    }

    pub fn stop(self) -> std::process::ExitStatus {
        self.stop_within(Duration::from_secs(30))
            .expect("the daemon stops")
    }

    /// SIGTERM, then its exit status if it exits within `limit` (else it
    /// is killed).
    pub fn stop_within(mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take().unwrap();
        terminate(&child);
        let status = wait_with_timeout(&mut child, limit);
        if status.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        status
    }

    pub fn kill(mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            // The test failed: what the daemon said is the first clue.
            let log = std::fs::read_to_string(self.state.with_extension("log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- daemon log (last lines) ---");
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// What a writer sent: the writes acknowledged, in order, and the one it
/// was waiting for when it stopped (which may or may not have landed).
#[derive(Default)]
pub struct Sent {
    pub acked: Vec<(u64, u8)>,
    pub in_flight: Option<(u64, u8)>,
}

impl Sent {
    /// Offset -> the value that must read back (the last acknowledged).
    pub fn latest(&self) -> std::collections::HashMap<u64, u8> {
        self.acked.iter().copied().collect()
    }

    /// The values `offset` may legitimately hold: the last acknowledged
    /// one, or the unacknowledged write in flight there at the kill.
    pub fn allowed(&self, offset: u64) -> Vec<u8> {
        let latest = self.latest();
        let mut values: Vec<u8> = latest.get(&offset).copied().into_iter().collect();
        match self.in_flight {
            Some((at, value)) if at == offset => values.push(value),
            _ => {}
        }
        values
    }
}

/// Writes through the export with FUA, one write at a time, and remembers
/// what was acknowledged, in the first `mebibytes` MiB of the volume (at
/// least 2). Offsets come back around, so later writes overwrite earlier
/// ones.
pub fn fua_writer(uri: String, mebibytes: u64, stop: Arc<Mutex<bool>>, sent: Arc<Mutex<Sent>>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        use dmm_store::BlockStore;
        // The export's socket can appear a moment before it accepts: the
        // first connection is tried for a few seconds. After that the
        // writer stops at the first error: a killed dmm is not waited for.
        let started = Instant::now();
        let store = loop {
            match dmm_nbd::NbdStore::connect_uri(&uri).await {
                Ok(store) => break store,
                Err(_) if started.elapsed() < Duration::from_secs(10) && !*stop.lock().unwrap() => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(_) => return,
            }
        };
        let store = store.reconnecting_within(Duration::ZERO);
        let mut value = 1u8;
        let mut slot = 0u64;
        while !*stop.lock().unwrap() {
            let offset = (slot % (mebibytes - 1)) * MIB + 12345 + slot * 4096 % (512 << 10);
            let data = dmm_store::Bytes::from(vec![value; 4096]);
            sent.lock().unwrap().in_flight = Some((offset, value));
            if store.write(offset, data, true).await.is_err() {
                return;
            }
            {
                let mut sent = sent.lock().unwrap();
                sent.in_flight = None;
                sent.acked.push((offset, value));
            }
            value = value % 250 + 1;
            slot += 1;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
}

/// The seed of a loop of random trials: `base`, varied by `DMM_SOAK_SEED`
/// so that soak jobs running side by side pick other instants.
pub fn soak_seed(base: u64) -> u64 {
    let salt = std::env::var("DMM_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(0);
    (base ^ salt.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1
}

/// A [`fua_writer`] on its own thread, until [`FuaWriter::finish`].
pub struct FuaWriter {
    stop: Arc<Mutex<bool>>,
    sent: Arc<Mutex<Sent>>,
    thread: std::thread::JoinHandle<()>,
}

impl FuaWriter {
    pub fn start(uri: String, mebibytes: u64) -> FuaWriter {
        let stop = Arc::new(Mutex::new(false));
        let sent = Arc::new(Mutex::new(Sent::default()));
        let thread = {
            let (stop, sent) = (stop.clone(), sent.clone());
            std::thread::spawn(move || fua_writer(uri, mebibytes, stop, sent))
        };
        FuaWriter { stop, sent, thread }
    }

    /// How many writes were acknowledged so far.
    pub fn acked(&self) -> usize {
        self.sent.lock().unwrap().acked.len()
    }

    /// Stops the writer; what it sent.
    pub fn finish(self) -> Sent {
        *self.stop.lock().unwrap() = true;
        self.thread.join().unwrap();
        std::mem::take(&mut *self.sent.lock().unwrap())
    }
}

/// Checks that every acknowledged write reads back from `target`; each
/// byte of the write in flight at the kill may hold either value (a kill
/// can tear it at a page boundary, and a mirrored one between the stores).
pub fn check_sent(target: &str, sent: &Sent, what: &str) {
    let in_flight = sent.in_flight.map(|(offset, _)| offset);
    let commands: Vec<String> = sent
        .latest()
        .iter()
        .filter(|(offset, _)| Some(**offset) != in_flight)
        .map(|(offset, value)| format!("read -P {value} {offset} 4096"))
        .collect();
    qemu_io_checks(target, true, &commands, what);
    if let Some(offset) = in_flight {
        let allowed = sent.allowed(offset);
        if allowed.len() > 1 {
            let bytes = qemu_io_bytes(target, offset, 4096);
            let stray = bytes.iter().position(|byte| !allowed.contains(byte));
            assert!(
                stray.is_none(),
                "{what}: byte {} of the write at {offset} is {:#x}, neither of {allowed:?}",
                stray.unwrap_or_default(),
                bytes[stray.unwrap_or_default()]
            );
        }
    }
}

// Volume migrations through the daemon.

/// A raw image with a pattern byte per MiB (`seed` + MiB), but every
/// third MiB a hole.
pub fn source_image(dir: &Path, name: &str, size: u64, seed: u8) -> PathBuf {
    let pieces: Vec<(u64, usize, u8)> = (0..size / MIB)
        .filter(|m| m % 3 != 2)
        .map(|m| (m * MIB, MIB as usize, seed.wrapping_add(m as u8) | 1))
        .collect();
    image_with(dir, name, size, &pieces)
}

pub fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Creates a volume migration from a fresh `size` source (pattern `seed`)
/// to an empty target, `source{tag}.raw` and `target{tag}.raw`, with more
/// properties (`name=value`); returns the migid and both images.
pub fn create_volume(
    daemon: &Daemon,
    dir: &Path,
    tag: &str,
    (size, seed): (u64, u8),
    properties: &[&str],
) -> (String, PathBuf, PathBuf) {
    let source = source_image(dir, &format!("source{tag}.raw"), size, seed);
    let target = image_with(dir, &format!("target{tag}.raw"), size, &[]);
    let source_property = format!("source={}", path(&source));
    let target_property = format!("target={}", path(&target));
    let mut args = vec!["create", "-p", &source_property, "-p", &target_property];
    for property in properties {
        args.extend(["-p", property]);
    }
    let migid = daemon.ok(&args).trim().to_owned();
    (migid, source, target)
}

// Tree migrations through the daemon.

/// The directories of a tree migration test, in a scratch directory.
pub struct Dirs {
    _dir: tempfile::TempDir,
    pub source: PathBuf,
    pub target: PathBuf,
    pub access: PathBuf,
    pub state: PathBuf,
}

pub fn dirs() -> Dirs {
    let dir = scratch();
    let at = |name: &str| dir.path().join(name);
    for name in ["source", "target", "access"] {
        fs::create_dir(at(name)).unwrap();
    }
    Dirs {
        source: at("source"),
        target: at("target"),
        access: at("access"),
        state: at("state"),
        _dir: dir,
    }
}

pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed))
        .collect()
}

/// Subtrees `keep` (left alone by the client), `moved` (renamed),
/// `gone` (deleted), plus large files and links.
pub fn build_source(root: &Path) {
    for sub in ["keep", "moved", "gone"] {
        for d in 0..4 {
            let dir = root.join(sub).join(format!("d{d}"));
            fs::create_dir_all(&dir).unwrap();
            for f in 0..25 {
                let len = 1000 + (d * 25 + f) * 97;
                fs::write(dir.join(format!("f{f}")), pattern(len, f as u8)).unwrap();
            }
        }
    }
    for i in 0..3 {
        fs::write(root.join(format!("keep/big{i}")), pattern(6 << 20, i)).unwrap();
    }
    fs::hard_link(root.join("keep/d0/f0"), root.join("keep/d1/hard")).unwrap();
    std::os::unix::fs::symlink("d0/f1", root.join("keep/soft")).unwrap();
}

pub fn p(path: &Path) -> String {
    path.display().to_string()
}

pub fn create_tree(daemon: &Daemon, d: &Dirs, extra: &[&str]) -> String {
    let mut args = vec![
        "create".to_owned(),
        "-p".into(),
        "kind=tree".into(),
        "-p".into(),
        format!("source={}", p(&d.source)),
        "-p".into(),
        format!("target={}", p(&d.target)),
        "-p".into(),
        format!("access={}", p(&d.access)),
    ];
    for e in extra {
        args.push("-p".into());
        args.push((*e).to_owned());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = daemon.ok(&args);
    out.split_whitespace().last().unwrap().to_owned()
}

pub fn is_mountpoint(path: &Path) -> bool {
    Command::new("mountpoint")
        .arg("-q")
        .arg(path)
        .status()
        .unwrap()
        .success()
}

pub fn rsync_differences(source: &Path, target: &Path) -> String {
    let output = tool("rsync")
        .args(["-aHAXn", "--checksum", "-i"])
        .arg(format!("{}/", source.display()))
        .arg(format!("{}/", target.display()))
        .output()
        .unwrap();
    assert!(output.status.success(), "rsync failed");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Waits (up to 20 s) until something listens on 127.0.0.1:`port`.
pub fn wait_for_port(port: u16) {
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "nothing listens on port {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Asserts that qemu-img finds two raw images equal.
pub fn assert_same_images(a: &Path, b: &Path) {
    let compared = tool("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(a)
        .arg(b)
        .output()
        .unwrap();
    assert!(
        compared.status.success(),
        "qemu-img compare {} {}: {compared:?}",
        a.display(),
        b.display()
    );
}

// Certificates for the tests between nodes.

fn dmm(args: &[&str]) {
    let output = Command::new(DMM).args(args).output().unwrap();
    assert!(output.status.success(), "dmm {args:?}: {output:?}");
}

/// A CA in `dir/ca` (made by `dmm tls`) and certificates for `names` (valid for 127.0.0.1
/// too), each in `dir/NAME`.
pub fn certificates(dir: &Path, names: &[&str]) -> Vec<PathBuf> {
    let ca = dir.join("ca");
    dmm(&["tls", "init", path(&ca)]);
    names
        .iter()
        .map(|name| {
            let out = dir.join(name);
            dmm(&[
                "tls",
                "issue",
                "--ca",
                path(&ca),
                name,
                "--also",
                "127.0.0.1",
                "--out",
                path(&out),
            ]);
            out
        })
        .collect()
}

/// A daemon started with `--node` and `--peer`: its API on TLS, its NBD
/// listener requiring TLS.
pub struct PeerNode {
    pub name: String,
    pub daemon: Daemon,
    pub api: String,
    pub nbd: String,
}

impl PeerNode {
    pub fn nbd(&self) -> &str {
        &self.nbd
    }
}

/// Starts node `name` with its certificates, its API on `api`, one peer
/// (`NAME=ADDR:PORT`) and `extra` arguments.
pub fn peer_daemon(
    dir: &Path,
    name: &str,
    certificates: &Path,
    api: &str,
    peer: &str,
    extra: &[&str],
) -> PeerNode {
    let token = dir.join("token");
    std::fs::write(&token, "correct-horse-battery-staple").unwrap();
    let nbd = format!("127.0.0.1:{}", dmm_testkit::free_loopback_port());
    let mut args = vec![
        "--node",
        name,
        "--listen",
        api,
        "--token-file",
        path(&token),
        "--tls-certificates",
        path(certificates),
        "--nbd-listen",
        &nbd,
        "--tls=require",
        "--peer",
        peer,
    ];
    args.extend_from_slice(extra);
    let daemon = Daemon::start(&dir.join(format!("{name}-state")), &args);
    PeerNode {
        name: name.to_owned(),
        daemon,
        api: api.to_owned(),
        nbd,
    }
}

/// Whether qemu-io succeeded with no command failing (it may exit 0 when
/// a pattern does not match).
pub fn clean(output: &Output) -> bool {
    let said = String::from_utf8_lossy(&output.stdout) + String::from_utf8_lossy(&output.stderr);
    output.status.success() && !said.contains("failed") && !said.contains("error")
}

/// qemu-io commands on `export` of `node` over TLS, with `certificates`.
pub fn qemu_io_on(node: &PeerNode, certificates: &Path, export: &str, commands: &[&str]) -> Output {
    let mut command = tool("qemu-io");
    command.args([
        "--object",
        &format!(
            "tls-creds-x509,id=tls0,endpoint=client,dir={}",
            path(certificates)
        ),
        "--image-opts",
        &format!(
            "driver=nbd,host=127.0.0.1,port={},export={export},tls-creds=tls0,tls-hostname={}",
            node.nbd().rsplit_once(':').unwrap().1,
            node.name
        ),
    ]);
    for c in commands {
        command.args(["-c", c]);
    }
    command.output().unwrap()
}
