//! State files that can lose power, for crash tests: the file-system
//! counterpart of `dmm_store::CrashStore`, on the same [`Power`] rail, so
//! that one cut stops the journal, the checkpoint and the data at the same
//! instant.
//!
//! The model is what POSIX promises and no more: a file's bytes survive a
//! power cut as they were when it was last synced, a directory's names as
//! they were when it was last synced. A file created (or renamed) since is
//! gone, whatever was synced into it; a file removed since is back.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use dmm_store::{Blackout, Cut, Power, splitmix64};
use parking_lot::Mutex;

use super::files::{StateFile, StateFiles};

/// One file's bytes: what reads see and what a cut leaves.
#[derive(Default)]
struct Contents {
    live: Vec<u8>,
    durable: Vec<u8>,
}

type Inode = Arc<Mutex<Contents>>;

/// A directory's names, live and durable.
#[derive(Default)]
struct Directory {
    live: BTreeMap<String, Inode>,
    durable: BTreeMap<String, Inode>,
}

/// A directory of state files in memory, on a power rail.
pub struct CrashFiles {
    power: Power,
    location: PathBuf,
    directory: Mutex<Directory>,
}

impl CrashFiles {
    /// An empty directory on `power`; `location` names it in messages.
    pub fn new(location: &Path, power: &Power) -> CrashFiles {
        CrashFiles {
            power: power.clone(),
            location: location.to_owned(),
            directory: Mutex::new(Directory::default()),
        }
    }

    /// What this directory holds after the power cut `_blackout` of its
    /// rail, on `power`. With [`Cut::TearLast`], each file keeps a part
    /// of the bytes appended since it was last synced, chosen by the seed.
    pub fn survivor(&self, _blackout: &Blackout<'_>, cut: Cut, power: &Power) -> CrashFiles {
        let directory = self.directory.lock();
        let mut after = Directory::default();
        for (index, (name, inode)) in directory.durable.iter().enumerate() {
            let contents = inode.lock();
            let mut kept = contents.durable.clone();
            if let Cut::TearLast { seed } = cut {
                kept = torn_tail(&contents, seed.wrapping_add(index as u64));
            }
            let inode = Arc::new(Mutex::new(Contents {
                live: kept.clone(),
                durable: kept,
            }));
            after.live.insert(name.clone(), inode.clone());
            after.durable.insert(name.clone(), inode);
        }
        CrashFiles {
            power: power.clone(),
            location: self.location.clone(),
            directory: Mutex::new(after),
        }
    }

    fn live(&self, name: &str) -> Option<Inode> {
        self.directory.lock().live.get(name).cloned()
    }

    fn not_found(&self, name: &str) -> io::Error {
        let path = self.location.join(name);
        io::Error::new(io::ErrorKind::NotFound, path.display().to_string())
    }
}

/// The durable bytes plus a seeded part of what was appended after them
/// (when the live bytes only extend them: an append-only file).
fn torn_tail(contents: &Contents, seed: u64) -> Vec<u8> {
    let (live, durable) = (&contents.live, &contents.durable);
    if live.len() <= durable.len() || !live.starts_with(durable) {
        return durable.clone();
    }
    let mut state = seed;
    let extra = splitmix64(&mut state) % (live.len() - durable.len() + 1) as u64;
    live[..durable.len() + extra as usize].to_vec()
}

impl StateFiles for CrashFiles {
    fn location(&self) -> &Path {
        &self.location
    }

    fn read(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        let _on = self.power.on();
        Ok(self.live(name).map(|inode| inode.lock().live.clone()))
    }

    fn names(&self) -> io::Result<Vec<String>> {
        let _on = self.power.on();
        Ok(self.directory.lock().live.keys().cloned().collect())
    }

    fn create(&self, name: &str) -> io::Result<Arc<dyn StateFile>> {
        let _on = self.power.on();
        let inode = Inode::default();
        self.directory
            .lock()
            .live
            .insert(name.to_owned(), inode.clone());
        Ok(Arc::new(CrashFile {
            power: self.power.clone(),
            inode,
        }))
    }

    fn open_append(&self, name: &str) -> io::Result<Arc<dyn StateFile>> {
        let _on = self.power.on();
        let inode = self
            .directory
            .lock()
            .live
            .entry(name.to_owned())
            .or_default()
            .clone();
        Ok(Arc::new(CrashFile {
            power: self.power.clone(),
            inode,
        }))
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let _on = self.power.on();
        let mut directory = self.directory.lock();
        let inode = directory
            .live
            .remove(from)
            .ok_or_else(|| self.not_found(from))?;
        directory.live.insert(to.to_owned(), inode);
        Ok(())
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        let _on = self.power.on();
        let removed = self.directory.lock().live.remove(name);
        removed.map(drop).ok_or_else(|| self.not_found(name))
    }

    fn sync_directory(&self) -> io::Result<()> {
        let _on = self.power.on();
        let mut directory = self.directory.lock();
        directory.durable = directory.live.clone();
        Ok(())
    }
}

/// An open file of a [`CrashFiles`] directory.
struct CrashFile {
    power: Power,
    inode: Inode,
}

impl StateFile for CrashFile {
    fn append(&self, bytes: &[u8]) -> io::Result<()> {
        let _on = self.power.on();
        self.inode.lock().live.extend_from_slice(bytes);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        let _on = self.power.on();
        let mut contents = self.inode.lock();
        contents.durable = contents.live.clone();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cut(files: &CrashFiles, cut: Cut) -> CrashFiles {
        let power = files.power.clone();
        let blackout = power.cut();
        files.survivor(&blackout, cut, &Power::new())
    }

    #[test]
    fn a_cut_keeps_synced_bytes_under_synced_names_only() {
        let files = CrashFiles::new(Path::new("/state"), &Power::new());
        let kept = files.open_append("kept").unwrap();
        kept.append(b"one").unwrap();
        files.sync_directory().unwrap();
        kept.sync().unwrap();
        kept.append(b"two").unwrap();
        let unnamed = files.create("unnamed").unwrap();
        unnamed.append(b"x").unwrap();
        unnamed.sync().unwrap();
        assert_eq!(files.read("kept").unwrap().unwrap(), b"onetwo");
        let after = cut(&files, Cut::DurableOnly);
        assert_eq!(after.read("kept").unwrap().unwrap(), b"one");
        assert_eq!(
            after.read("unnamed").unwrap(),
            None,
            "a name never synced is lost"
        );
    }

    #[test]
    fn a_rename_or_removal_is_undone_until_the_directory_is_synced() {
        let files = CrashFiles::new(Path::new("/state"), &Power::new());
        let old = files.create("file").unwrap();
        old.append(b"old").unwrap();
        old.sync().unwrap();
        files.sync_directory().unwrap();
        let new = files.create("file.tmp").unwrap();
        new.append(b"new").unwrap();
        new.sync().unwrap();
        files.rename("file.tmp", "file").unwrap();
        assert_eq!(
            cut(&files, Cut::DurableOnly).read("file").unwrap().unwrap(),
            b"old"
        );
        files.sync_directory().unwrap();
        assert_eq!(
            cut(&files, Cut::DurableOnly).read("file").unwrap().unwrap(),
            b"new"
        );
        files.remove("file").unwrap();
        assert!(
            cut(&files, Cut::DurableOnly)
                .read("file")
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn a_torn_append_keeps_a_prefix_of_what_was_not_synced() {
        let files = CrashFiles::new(Path::new("/state"), &Power::new());
        let log = files.open_append("log").unwrap();
        files.sync_directory().unwrap();
        log.append(b"synced").unwrap();
        log.sync().unwrap();
        log.append(b"-pending").unwrap();
        let mut lengths = std::collections::BTreeSet::new();
        for seed in 0..32 {
            let bytes = cut(&files, Cut::TearLast { seed })
                .read("log")
                .unwrap()
                .unwrap();
            assert!(b"synced-pending".starts_with(&bytes) && bytes.starts_with(b"synced"));
            lengths.insert(bytes.len());
        }
        assert!(lengths.len() > 2, "seeds tear at different places");
    }
}
