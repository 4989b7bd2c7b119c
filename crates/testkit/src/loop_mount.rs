//! A small ext4 file system on a loop device, for the tests of a full or
//! read-only file system under a migration's target or state.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::{run, tool};

/// A small ext4 file system on a loop device (no blocks reserved for root,
/// read-only after an error), unmounted when dropped.
pub struct LoopMount {
    image: PathBuf,
    mountpoint: PathBuf,
}

impl LoopMount {
    pub fn new(image: &Path, mountpoint: &Path, mebibytes: u64) -> LoopMount {
        fs::File::create(image)
            .unwrap()
            .set_len(mebibytes << 20)
            .unwrap();
        run(tool("mkfs.ext4").args(["-q", "-F", "-m", "0"]).arg(image));
        fs::create_dir_all(mountpoint).unwrap();
        let mount = LoopMount {
            image: image.to_owned(),
            mountpoint: mountpoint.to_owned(),
        };
        mount.mount();
        mount
    }

    fn mount(&self) {
        run(Command::new("mount")
            .args(["-o", "loop,errors=remount-ro"])
            .arg(&self.image)
            .arg(&self.mountpoint));
    }

    /// Fills the file system up to its last block, with a file `filler`.
    pub fn fill(&self) -> PathBuf {
        use std::io::Write;
        let filler = self.mountpoint.join("filler");
        let mut file = fs::File::create(&filler).unwrap();
        for block in [1 << 20, 4096, 512] {
            while file.write_all(&vec![0xf0; block]).is_ok() {}
        }
        let _ = file.sync_all();
        filler
    }

    /// Makes ext4 record an error, which turns it read-only
    /// (`errors=remount-ro`), as it does when it finds itself damaged.
    pub fn trigger_error(&self) {
        let mounts = fs::read_to_string("/proc/mounts").unwrap();
        let device = mounts
            .lines()
            .map(|line| line.split(' ').collect::<Vec<_>>())
            .find(|fields| Path::new(fields[1]) == self.mountpoint)
            .map(|fields| fields[0].trim_start_matches("/dev/").to_owned())
            .expect("mounted");
        fs::write(format!("/sys/fs/ext4/{device}/trigger_fs_error"), "1").unwrap();
    }

    /// Unmounts, repairs with e2fsck, and mounts again read-write.
    pub fn repair(&self) {
        run(Command::new("umount").arg(&self.mountpoint));
        let status = tool("e2fsck")
            .args(["-f", "-y"])
            .arg(&self.image)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        // 0: clean; 1: errors corrected.
        assert!(matches!(status.code(), Some(0 | 1)), "e2fsck: {status}");
        self.mount();
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.mountpoint)
            .status();
    }
}
