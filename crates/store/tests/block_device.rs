//! The conformance suite against a real block device: a loop device over a
//! sparse file (set up with `losetup`, which needs root). Block devices take
//! the paths files do not: size from the device, zeroing through the block
//! layer, no hole map.

use std::process::Command;
use std::sync::Arc;

use dmm_store::conformance::{Fixture, Subject};
use dmm_store::{FileStore, OpenOptions};

/// A loop device detached when dropped.
struct LoopDevice {
    path: String,
    _backing: tempfile::TempDir,
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.path]).status();
    }
}

async fn loop_device(fixture: Fixture) -> Subject {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let backing = dir.path().join("backing.raw");
    std::fs::File::create(&backing)
        .and_then(|f| f.set_len(fixture.size))
        .expect("backing file");
    let output = Command::new("losetup")
        .args(["--find", "--show"])
        .arg(&backing)
        .output()
        .expect("losetup (util-linux) is required");
    assert!(
        output.status.success(),
        "losetup failed (this test needs root and loop devices): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let device = LoopDevice {
        path: String::from_utf8(output.stdout)
            .expect("device path")
            .trim()
            .to_owned(),
        _backing: dir,
    };
    let options = OpenOptions {
        read_only: fixture.read_only,
    };
    let store = FileStore::open(&device.path, options).expect("open loop device");
    Subject::new(Arc::new(store), device)
}

mod loop_device {
    dmm_store::conformance_suite!(super::loop_device);
}
