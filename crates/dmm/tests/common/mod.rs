//! Helpers for the end-to-end tests: run the real `dmm` binary and the real
//! clients (qemu-io, qemu-img, nbdinfo, nbdcopy, fio) against it.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

pub const DMM: &str = env!("CARGO_BIN_EXE_dmm");

#[allow(unused_imports)] // Not every test binary uses every one.
pub use dmm_testkit::{run, stdout, tool};

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

/// Whether qemu-io reads `len` bytes at `offset` of `target` as one of the
/// byte patterns in `values`.
pub fn qemu_io_reads_one_of(target: &str, offset: u64, len: u64, values: &[u8]) -> bool {
    values.iter().any(|value| {
        let output = tool("qemu-io")
            .args(["-r", "-f", "raw", "-c"])
            .arg(format!("read -P {value} {offset} {len}"))
            .arg(target)
            .output()
            .expect("qemu-io runs");
        let text = String::from_utf8_lossy(&output.stdout);
        output.status.success() && !text.contains("verification failed")
    })
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
