//! One stream: its extent map and open extent files, the appender, and the
//! reader. The move changes the map through [`Stream::swap`], which is
//! where the wait-free switch happens.
//!
//! Locks, in the order they are taken:
//! 1. `appending`: held by the writer for one append or one sync (its own
//!    I/O on the tail), and by a move only to swap the tail (no I/O, a few
//!    pointer stores: the writer waits for that at most, never for a
//!    move's I/O);
//! 2. `view`: held to read or change the map and the table of open files,
//!    never across I/O;
//! 3. an extent file's own lock (`extent_file.rs`), held only to copy or
//!    update what the file holds.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use parking_lot::{Mutex, RwLock};

use crate::error::{Error, ErrorKind, Result};
use crate::extent_file::ExtentFile;
use crate::extents::ExtentMap;
use crate::journal::Owner;

/// An open stream.
pub struct Stream {
    name: String,
    appending: Mutex<()>,
    view: RwLock<View>,
}

/// The map and the files it names (and a move's receiving and target
/// files, once created).
pub(crate) struct View {
    pub map: ExtentMap,
    pub files: BTreeMap<u64, Arc<ExtentFile>>,
    pub owner: Owner,
    pub created: SystemTime,
    pub modified: SystemTime,
}

/// What `stat` shows of a stream.
#[derive(Debug, Clone, Copy)]
pub struct Attributes {
    pub len: u64,
    pub owner: Owner,
    pub created: SystemTime,
    pub modified: SystemTime,
    /// Bytes its extents take on their tiers.
    pub stored: u64,
}

impl Stream {
    pub(crate) fn new(name: String, view: View) -> Stream {
        Stream {
            name,
            appending: Mutex::new(()),
            view: RwLock::new(view),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn len(&self) -> u64 {
        self.view.read().map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// When it was last appended to (or opened).
    pub fn modified(&self) -> SystemTime {
        self.view.read().modified
    }

    /// A copy of its extent map.
    pub fn map(&self) -> ExtentMap {
        self.view.read().map.clone()
    }

    pub fn attributes(&self) -> Attributes {
        let view = self.view.read();
        let files: std::collections::BTreeSet<u64> =
            view.map.extents().iter().map(|e| e.file).collect();
        let stored = files
            .iter()
            .filter_map(|file| view.files.get(file))
            .map(|f| f.stored_bytes())
            .sum();
        Attributes {
            len: view.map.len(),
            owner: view.owner,
            created: view.created,
            modified: view.modified,
            stored,
        }
    }

    pub(crate) fn set_owner(&self, owner: Owner) {
        self.view.write().owner = owner;
    }

    /// Appends `data` at `offset`, which must be the stream's length;
    /// returns the new length.
    pub fn append(&self, offset: u64, data: &[u8]) -> Result<u64> {
        let _appending = self.appending.lock();
        let (tail, len) = {
            let view = self.view.read();
            (view.file(view.map.tail().file), view.map.len())
        };
        if offset != len {
            return Err(Error::new(
                ErrorKind::NotAppend,
                format!(
                    "{}: a write at {offset} is not at its end ({len}): streams are append-only",
                    self.name
                ),
            ));
        }
        tail.append(data)?;
        let mut view = self.view.write();
        view.map.appended(data.len() as u64);
        view.modified = SystemTime::now();
        Ok(view.map.len())
    }

    /// Makes every byte appended so far durable (`fsync`): the files of
    /// every extent in the map, so that after a switch the source's last
    /// bytes are synced with the new tail's.
    pub fn sync(&self) -> Result<()> {
        let _appending = self.appending.lock();
        self.view
            .read()
            .map_files()
            .iter()
            .try_for_each(|f| f.sync())
    }

    /// Syncs the stream's files and seals them (a zstd extent gets its
    /// seek table): what a stop or a commit leaves on the tiers.
    pub(crate) fn seal(&self) -> Result<()> {
        let _appending = self.appending.lock();
        self.view
            .read()
            .map_files()
            .iter()
            .try_for_each(|f| f.seal())
    }

    /// Up to `len` bytes from `offset`, each from the extent the map says
    /// holds it (fewer at the end of the stream).
    pub fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let parts: Vec<_> = {
            let view = self.view.read();
            let end = (offset + len as u64).min(view.map.len());
            let mut parts = Vec::new();
            let mut at = offset;
            while at < end {
                let extent = *view.map.locate(at).expect("an offset below the length");
                let upto = extent.end.min(end);
                parts.push((view.file(extent.file), at - extent.base, upto - at));
                at = upto;
            }
            parts
        };
        let mut out = Vec::with_capacity(len);
        for (file, at, len) in parts {
            let bytes = file.read_at(at, len as usize)?;
            if bytes.len() as u64 != len {
                return Err(
                    Error::on(ErrorKind::Tier, "read", file.path()).with_detail(format!(
                        "it holds {} bytes, the stream's map says {}",
                        file.len(),
                        at + len
                    )),
                );
            }
            out.extend_from_slice(&bytes);
        }
        Ok(out)
    }

    /// The open file numbered `file`.
    pub(crate) fn file(&self, file: u64) -> Arc<ExtentFile> {
        self.view.read().file(file)
    }

    /// Changes the view with no append or sync under way: the switch and
    /// the last step of a link. `change` must do no I/O (it runs with the
    /// writer held between two appends).
    pub(crate) fn swap<T>(&self, change: impl FnOnce(&mut View) -> T) -> T {
        let _appending = self.appending.lock();
        change(&mut self.view.write())
    }

    /// Changes the view (not the tail: appends go on meanwhile).
    pub(crate) fn update<T>(&self, change: impl FnOnce(&mut View) -> T) -> T {
        change(&mut self.view.write())
    }
}

impl View {
    pub(crate) fn file(&self, file: u64) -> Arc<ExtentFile> {
        self.files
            .get(&file)
            .cloned()
            .expect("every file of the map is open")
    }

    /// The files of the map's extents, each once, in stream order.
    fn map_files(&self) -> Vec<Arc<ExtentFile>> {
        let mut files: Vec<u64> = self.map.extents().iter().map(|e| e.file).collect();
        files.dedup();
        files.into_iter().map(|file| self.file(file)).collect()
    }
}
