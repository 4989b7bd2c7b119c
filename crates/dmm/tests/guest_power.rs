//! Trees under real power cuts. The daemon and a tree migration run in a
//! QEMU guest (`scripts/guest`) whose virtual disk holds dmm, its state
//! directory, the source and the target; a client in the guest reads and
//! writes through the access point, each write fsynced. The host kills
//! QEMU with kill -9 at a random instant after the migration started: the
//! guest's page cache is lost, as in a power cut. The guest boots again on
//! the same disk and `tests/guest/guest-run` checks, in the guest, that the
//! daemon resumed the migration, that it completed, that the target equals
//! the source (no entry lost, duplicated or brought back, links kept) and
//! that every file written and fsynced through the access point in an
//! earlier boot is there. The host then checks the file system.
//!
//! `DMM_GUEST_TRIALS` trials (3 by default; `scripts/soak guest` runs more).

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// How long one boot may take under TCG on a busy machine.
const BOOT_LIMIT: Duration = Duration::from_secs(420);

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn guest() -> Command {
    Command::new(repository().join("scripts/guest"))
}

/// The guest kit (kernel, initramfs, QEMU), built once per target
/// directory; its downloads are kept.
fn kit() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("guest-kit");
    run(guest().arg("kit").arg(&dir));
    dir
}

/// What the guest's disk starts with: a stripped dmm, the script the guest
/// runs, the source tree, empty target, access point and state directory.
fn payload(dir: &Path) -> PathBuf {
    let payload = dir.join("payload");
    for sub in ["src", "dst", "access", "state"] {
        std::fs::create_dir_all(payload.join(sub)).unwrap();
    }
    run(tool("strip").arg("-o").arg(payload.join("dmm")).arg(DMM));
    let script = repository().join("crates/dmm/tests/guest/guest-run");
    std::fs::copy(script, payload.join("guest-run")).unwrap();
    std::fs::write(payload.join("guest-env"), "RATE=2M\nDEADLINE=300\n").unwrap();
    let src = payload.join("src");
    for d in 0..10u8 {
        let dir = src.join(format!("d{d}"));
        std::fs::create_dir(&dir).unwrap();
        for f in 0..30usize {
            let len = (f * 2347 + usize::from(d) * 977) % 70_000;
            std::fs::write(dir.join(format!("f{f}")), pattern(len, d ^ f as u8)).unwrap();
        }
    }
    for i in 0..4u8 {
        let len = (usize::from(i) + 1) << 20;
        std::fs::write(src.join(format!("big{i}")), pattern(len, 200 + i)).unwrap();
    }
    std::os::unix::fs::symlink("d1/f1", src.join("link")).unwrap();
    std::fs::hard_link(src.join("d2/f1"), src.join("d2/hardlink")).unwrap();
    payload
}

/// A booted guest, its console lines collected.
struct Boot {
    qemu: Child,
    lines: Arc<Mutex<Vec<String>>>,
    reader: std::thread::JoinHandle<()>,
}

impl Boot {
    fn start(kit: &Path, image: &Path) -> Boot {
        let mut qemu = guest()
            .arg("boot")
            .arg(kit)
            .arg(image)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("boot the guest");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let console = BufReader::new(qemu.stdout.take().unwrap());
        let sink = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in console.lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line.trim_end().to_owned());
            }
        });
        Boot {
            qemu,
            lines,
            reader,
        }
    }

    fn console(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Everything the guest printed, once QEMU has exited.
    fn collected(self) -> String {
        self.reader.join().unwrap();
        let lines = self.lines.lock().unwrap();
        lines.join("\n")
    }

    /// Waits for a console line ending with `end`.
    fn wait_for(&mut self, end: &str) {
        let started = Instant::now();
        loop {
            if self.lines.lock().unwrap().iter().any(|l| l.ends_with(end)) {
                return;
            }
            let exited = self.qemu.try_wait().unwrap();
            assert!(
                exited.is_none() && started.elapsed() < BOOT_LIMIT,
                "the guest never printed {end:?}:\n{}",
                self.console()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The power cut.
    fn kill(mut self) -> String {
        self.qemu.kill().unwrap();
        self.qemu.wait().unwrap();
        self.collected()
    }

    /// Waits for the guest to power off.
    fn finish(mut self) -> String {
        let status = wait_with_timeout(&mut self.qemu, BOOT_LIMIT);
        if status.is_none() {
            let _ = self.qemu.kill();
            let _ = self.qemu.wait();
        }
        let console = self.collected();
        assert!(
            status.is_some_and(|s| s.success()),
            "the guest did not power off within {BOOT_LIMIT:?}:\n{console}"
        );
        console
    }
}

fn trials() -> u64 {
    std::env::var("DMM_GUEST_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
}

#[test]
fn tree_migrations_in_a_guest_survive_power_cuts_at_random_instants() {
    let kit = kit();
    let dir = scratch();
    let payload = payload(dir.path());
    let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(std::process::id());
    let (trials, mut fsynced) = (trials(), 0);
    for trial in 0..trials {
        let image = dir.path().join("disk.raw");
        run(guest()
            .arg("disk")
            .arg(&kit)
            .arg(&image)
            .arg("256")
            .arg(&payload));
        let mut first = Boot::start(&kit, &image);
        first.wait_for(" migrating");
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        // During the copy (about 8 s at 2 MB/s), the verification or the
        // checks after it.
        let delay = Duration::from_millis(seed % 14_000);
        std::thread::sleep(delay);
        let before = first.kill();
        let last = before.lines().rfind(|l| l.starts_with("run:"));
        eprintln!(
            "trial {trial}: power cut {:.1} s after the migration started, at {last:?}",
            delay.as_secs_f64()
        );

        let console = Boot::start(&kit, &image).finish();
        assert!(
            console
                .lines()
                .any(|l| l.starts_with("run:") && l.ends_with("RESULT ok")),
            "trial {trial}: after the power cut:\n{console}"
        );
        fsynced += console
            .lines()
            .filter(|l| l.contains("wrote written-"))
            .count()
            + before
                .lines()
                .filter(|l| l.contains("wrote written-"))
                .count();
        let fsck = tool("e2fsck").arg("-fn").arg(&image).output().unwrap();
        assert!(
            fsck.status.success(),
            "trial {trial}: e2fsck after the second boot:\n{}",
            String::from_utf8_lossy(&fsck.stdout)
        );
    }
    eprintln!(
        "tree power cuts in a guest: {trials} trials, {fsynced} writes fsynced through the \
         access point checked, 0 lost; every migration resumed and completed"
    );
}
