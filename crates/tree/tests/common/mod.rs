//! What the tree tests share: a source, target, access point and journal
//! in a scratch directory, data patterns, bounded waits; and the external
//! tools that judge the result (from `dmm-testkit`).

#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dmm_control::{Controls, Priority};
#[allow(unused_imports)] // Not every test binary uses every one.
pub use dmm_testkit::{run, tool};
use dmm_tree::{AccessUsers, Collision, TreeConfig, TreeMigration};

/// A scratch directory (in /var/tmp: a real file system, not tmpfs) with
/// `source`, `target`, `access` and `state`, and the migration's config.
pub struct Setup {
    _dir: tempfile::TempDir,
    pub config: TreeConfig,
}

impl Setup {
    pub fn new(build: impl FnOnce(&Path)) -> Setup {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let path = |name: &str| dir.path().join(name);
        for name in ["source", "target", "access", "state"] {
            fs::create_dir(path(name)).unwrap();
        }
        build(&path("source"));
        let config = TreeConfig {
            migid: 1,
            source: path("source"),
            target: path("target"),
            access: path("access"),
            journal: path("state").join("journal.db"),
            segsize: 1 << 20,
            collision: Collision::Error,
            // pjdfstest and the unprivileged checks work as other users.
            access_users: AccessUsers::All,
            rate: None,
            priority: Priority::Normal,
            dir_workers: 2,
            file_workers: 2,
        };
        Setup { _dir: dir, config }
    }

    pub fn access(&self, relative: &str) -> PathBuf {
        self.config.access.join(relative)
    }

    pub fn start(&self, paused: bool) -> TreeMigration {
        let controls = Controls::new(None, 1, Priority::Normal);
        if paused {
            controls.pause();
        }
        self.start_with(controls)
    }

    /// Starts the migration with `controls` (a rate, a priority).
    pub fn start_with(&self, controls: Controls) -> TreeMigration {
        dmm_tree::check(&self.config, true).unwrap();
        TreeMigration::start(&self.config, Arc::new(controls)).unwrap()
    }
}

pub fn write(path: &Path, data: &[u8]) {
    fs::write(path, data).unwrap();
}

pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

pub fn wait_complete(migration: &TreeMigration) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !migration.is_complete() {
        assert!(
            Instant::now() < deadline,
            "not complete: {:?}",
            migration.progress()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn rsync_differences(source: &Path, target: &Path) -> String {
    let output = Command::new("rsync")
        .args(["-aHAXn", "--checksum", "-i", "--delete"])
        .arg(format!("{}/", source.display()))
        .arg(format!("{}/", target.display()))
        .output()
        .expect("rsync runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs `op` on another thread and fails the test if it has not returned
/// within `limit` (a hung access point must fail, not hang, the test).
pub fn within<T: Send + 'static>(
    limit: Duration,
    what: &str,
    op: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (done, result) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(op());
    });
    result
        .recv_timeout(limit)
        .unwrap_or_else(|_| panic!("{what} did not return within {limit:?}"))
}
