//! A stream store: the orbit, the journal, and every stream, opened after
//! a crash into a state the move can go on from (the crash contract of
//! `DESIGN.md`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::RwLock;

use crate::error::{Error, ErrorKind, Result, on};
use crate::extent_file::{ExtentFile, sync_dir};
use crate::extents::{Extent, ExtentMap, Move, Phase};
use crate::journal::{Figures, Journal, Owner, Saved};
use crate::orbit::{Format, Orbit};
use crate::stream::{Stream, View};

/// The longest stream name (a file name on every tier, with its suffix).
const NAME_BYTES: usize = 200;

/// An open stream store.
pub struct StreamStore {
    orbit: Orbit,
    journal: Journal,
    streams: RwLock<BTreeMap<String, Arc<Stream>>>,
}

impl StreamStore {
    /// Opens the store whose journal is at `journal` (creating both), and
    /// brings every stream to a state its move goes on from: a switch not
    /// recorded is found in the files, a link that happened is recorded,
    /// and files no map names are removed.
    pub fn open(orbit: Orbit, journal: &Path) -> Result<StreamStore> {
        for tier in orbit.tiers() {
            std::fs::create_dir_all(&tier.dir).map_err(on(
                ErrorKind::Tier,
                "create the tier directory",
                &tier.dir,
            ))?;
        }
        let journal = Journal::open(journal)?;
        let store = StreamStore {
            orbit,
            journal,
            streams: RwLock::new(BTreeMap::new()),
        };
        let saved = store.journal.streams()?;
        let mut streams = BTreeMap::new();
        for saved in saved {
            let stream = store.reopen(saved)?;
            streams.insert(stream.name().to_owned(), Arc::new(stream));
        }
        store.sweep(&streams)?;
        *store.streams.write() = streams;
        Ok(store)
    }

    pub fn orbit(&self) -> &Orbit {
        &self.orbit
    }

    pub(crate) fn journal(&self) -> &Journal {
        &self.journal
    }

    pub fn get(&self, name: &str) -> Option<Arc<Stream>> {
        self.streams.read().get(name).cloned()
    }

    /// Every stream, by name.
    pub fn list(&self) -> Vec<Arc<Stream>> {
        self.streams.read().values().cloned().collect()
    }

    pub fn figures(&self) -> Result<Figures> {
        self.journal.figures()
    }

    /// Creates an empty stream on the first tier.
    pub fn create(&self, name: &str, owner: Owner) -> Result<Arc<Stream>> {
        check_name(name)?;
        let mut streams = self.streams.write();
        if streams.contains_key(name) {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!("stream {name} exists"),
            ));
        }
        let map = ExtentMap::new(0);
        let path = self.path(name, map.tail().file, 0);
        let _ = std::fs::remove_file(&path);
        let file = ExtentFile::create(&path, self.orbit.tiers()[0].format)?;
        sync_dir(&self.orbit.tiers()[0].dir)?;
        let now = SystemTime::now();
        self.journal.create(name, owner, seconds(now), &map)?;
        let view = View {
            files: BTreeMap::from([(map.tail().file, Arc::new(file))]),
            map,
            owner,
            created: now,
            modified: now,
        };
        let stream = Arc::new(Stream::new(name.to_owned(), view));
        streams.insert(name.to_owned(), stream.clone());
        Ok(stream)
    }

    /// Removes a stream and its files; refused while it moves.
    pub fn remove(&self, name: &str) -> Result<()> {
        let mut streams = self.streams.write();
        let stream = streams
            .get(name)
            .ok_or_else(|| Error::new(ErrorKind::NotFound, name.to_owned()))?;
        if let Some(moving) = stream.map().moving() {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "{name} is moving to tier {} ({}); remove it once the move is linked",
                    self.orbit.tiers()[moving.tier].name,
                    moving.phase.as_str()
                ),
            ));
        }
        self.journal.remove(name)?;
        for extent in stream.map().extents() {
            self.remove_file(name, extent.file, extent.tier)?;
        }
        streams.remove(name);
        Ok(())
    }

    pub fn set_owner(&self, stream: &Stream, owner: Owner) -> Result<()> {
        self.journal.set_owner(stream.name(), owner)?;
        stream.set_owner(owner);
        Ok(())
    }

    /// Seals every stream's extents (a zstd tail gets its seek table) and
    /// syncs them: what a stop or a commit leaves on the tiers.
    pub fn seal(&self) -> Result<()> {
        for stream in self.list() {
            stream.seal()?;
        }
        Ok(())
    }

    /// The path of a stream's file on a tier.
    pub(crate) fn path(&self, name: &str, file: u64, tier: usize) -> PathBuf {
        let tier = &self.orbit.tiers()[tier];
        tier.dir
            .join(format!("{name}.{file}.{}", suffix(tier.format)))
    }

    pub(crate) fn remove_file(&self, name: &str, file: u64, tier: usize) -> Result<()> {
        let path = self.path(name, file, tier);
        match std::fs::remove_file(&path) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                return Err(Error::on(ErrorKind::Tier, "remove", &path).with_source(err));
            }
            _ => {}
        }
        sync_dir(&self.orbit.tiers()[tier].dir)
    }

    /// Opens a stream the journal holds, resolving what a crash left.
    fn reopen(&self, saved: Saved) -> Result<Stream> {
        let Saved {
            name,
            owner,
            created,
            mut map,
        } = saved;
        let mut files = BTreeMap::new();
        let mut wanted: Vec<(u64, usize)> =
            map.extents().iter().map(|e| (e.file, e.tier)).collect();
        if let Some(moving) = map.moving() {
            wanted.push((moving.receiving, moving.tier));
            wanted.push((moving.target, moving.tier));
        }
        for (file, tier) in wanted {
            let path = self.path(&name, file, tier);
            let format = self.orbit.tiers()[tier].format;
            files.insert(file, Arc::new(ExtentFile::open(&path, format)?));
        }
        set_ends(&mut map, &files);
        let changed = resolve_move(&mut map, &files)?;
        if changed {
            self.journal.record(&name, &map)?;
        }
        let created = UNIX_EPOCH + Duration::from_secs(created.max(0) as u64);
        let view = View {
            map,
            files,
            owner,
            created,
            modified: SystemTime::now(),
        };
        Ok(Stream::new(name, view))
    }

    /// Removes the files on the tiers that no stream's map or move names
    /// (left by a crash between a file's creation or removal and the
    /// journal's record of it).
    fn sweep(&self, streams: &BTreeMap<String, Arc<Stream>>) -> Result<()> {
        let mut named = BTreeSet::new();
        for stream in streams.values() {
            let map = stream.map();
            for extent in map.extents() {
                named.insert((stream.name().to_owned(), extent.file));
            }
            if let Some(moving) = map.moving() {
                named.insert((stream.name().to_owned(), moving.receiving));
                named.insert((stream.name().to_owned(), moving.target));
            }
        }
        for (index, tier) in self.orbit.tiers().iter().enumerate() {
            let entries =
                std::fs::read_dir(&tier.dir).map_err(on(ErrorKind::Tier, "list", &tier.dir))?;
            for entry in entries.flatten() {
                let file_name = entry.file_name();
                let Some((name, file)) = file_name.to_str().and_then(|n| parse(n, tier.format))
                else {
                    continue;
                };
                if !named.contains(&(name.to_owned(), file)) {
                    self.remove_file(name, file, index)?;
                }
            }
        }
        Ok(())
    }
}

/// Sets each extent's end from its file: the stream is the contiguous
/// prefix the files hold (an extent whose file is shorter than the next
/// extent's start ends the stream there: what follows was never fsynced).
fn set_ends(map: &mut ExtentMap, files: &BTreeMap<u64, Arc<ExtentFile>>) {
    let extents: Vec<Extent> = map.extents().to_vec();
    for (index, extent) in extents.iter().enumerate() {
        let held = extent.start + files[&extent.file].len();
        let end = match extents.get(index + 1) {
            Some(next) => held.min(next.start),
            None => held,
        };
        map.set_end(index, end);
    }
}

/// Brings a move that a crash interrupted to a phase the mover goes on
/// from; true if the map changed (the caller records it).
fn resolve_move(map: &mut ExtentMap, files: &BTreeMap<u64, Arc<ExtentFile>>) -> Result<bool> {
    let Some(moving) = map.moving().copied() else {
        return Ok(false);
    };
    let target = &files[&moving.target];
    let receiving = &files[&moving.receiving];
    match moving.phase {
        // The switch happened if the target holds bytes: they continue
        // the stream from the source's end.
        Phase::Prepared if !target.is_empty() => {
            let len = target.len();
            map.switch()?;
            map.appended(len);
            Ok(true)
        }
        // A source shorter than the switch offset lost bytes never
        // fsynced (a power cut: every fsync after the switch syncs it):
        // the switch is undone and the target's bytes dropped, so that the
        // stream stays one contiguous prefix.
        Phase::Switched if map.extents()[0].end < moving.switched_at.unwrap_or(0) => {
            target.cut(0)?;
            let source = map.extents()[0];
            let prepared = Move {
                phase: Phase::Prepared,
                switched_at: None,
                ..moving
            };
            *map = ExtentMap::restore(vec![source], Some(prepared), map.next_file());
            Ok(true)
        }
        Phase::Prepared | Phase::Switched => Ok(false),
        Phase::Drained => {
            let extent = map.extents()[0];
            let switched_at = moving.switched_at.expect("a drained move was switched");
            let target_end = switched_at + target.len();
            let receiving_end = extent.start + receiving.len();
            if receiving_end >= target_end {
                // The link's swap happened: the receiving extent holds
                // everything, and maybe appends made after it.
                map.linked()?;
                map.set_end(0, receiving_end);
                Ok(true)
            } else {
                receiving.cut(switched_at - extent.start)?;
                Ok(false)
            }
        }
        Phase::Linked => Ok(false),
    }
}

/// A stream name that is a file name on every tier.
fn check_name(name: &str) -> Result<()> {
    let bad = name.is_empty()
        || name == "."
        || name == ".."
        || name.contains('/')
        || name.contains('\0')
        || name.len() > NAME_BYTES;
    if bad {
        return Err(Error::new(
            ErrorKind::Invalid,
            format!("{name:?} cannot name a stream (a file name of at most {NAME_BYTES} bytes)"),
        ));
    }
    Ok(())
}

fn suffix(format: Format) -> &'static str {
    match format {
        Format::Plain => "log",
        Format::Zstd => "zst",
    }
}

/// The stream and file number of a file on a tier (`NAME.FILE.SUFFIX`).
fn parse(file_name: &str, format: Format) -> Option<(&str, u64)> {
    let rest = file_name.strip_suffix(suffix(format))?.strip_suffix('.')?;
    let (name, file) = rest.rsplit_once('.')?;
    Some((name, file.parse().ok()?))
}

fn seconds(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Files 0 (source, plain), 1 (receiving) and 2 (target, zstd) holding
    /// `lens` bytes each.
    fn files(dir: &Path, lens: [usize; 3]) -> BTreeMap<u64, Arc<ExtentFile>> {
        let mut files = BTreeMap::new();
        for (file, len) in lens.into_iter().enumerate() {
            let format = if file == 0 {
                Format::Plain
            } else {
                Format::Zstd
            };
            let extent = ExtentFile::create(&dir.join(file.to_string()), format).unwrap();
            extent.append(&vec![b'a'; len]).unwrap();
            extent.sync().unwrap();
            files.insert(file as u64, Arc::new(extent));
        }
        files
    }

    fn map_in(phase: Phase, files: &BTreeMap<u64, Arc<ExtentFile>>) -> ExtentMap {
        let mut map = ExtentMap::new(0);
        map.prepare(1).unwrap();
        if phase != Phase::Prepared {
            map.appended(100);
            map.switch().unwrap();
        }
        if phase == Phase::Drained {
            map.drained().unwrap();
        }
        // What the journal gives back: starts only.
        let mut saved = ExtentMap::restore(
            map.extents()
                .iter()
                .map(|e| Extent { end: e.start, ..*e })
                .collect(),
            map.moving().copied(),
            map.next_file(),
        );
        set_ends(&mut saved, files);
        saved
    }

    #[test]
    fn a_switch_not_recorded_is_found_in_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let files = files(dir.path(), [100, 0, 30]);
        let mut map = map_in(Phase::Prepared, &files);
        assert!(resolve_move(&mut map, &files).unwrap());
        assert_eq!(map.moving().unwrap().phase, Phase::Switched);
        assert_eq!(map.moving().unwrap().switched_at, Some(100));
        assert_eq!(map.len(), 130);
    }

    #[test]
    fn a_link_that_swapped_is_recorded_and_one_that_did_not_starts_again() {
        let dir = tempfile::tempdir().unwrap();
        // The receiving extent holds the drain, the target's 30 bytes
        // and 5 appended after the swap.
        let swapped = files(dir.path(), [0, 135, 30]);
        let mut map = map_in(Phase::Drained, &swapped);
        assert!(resolve_move(&mut map, &swapped).unwrap());
        assert_eq!((map.moving(), map.len()), (None, 135));
        let dir = tempfile::tempdir().unwrap();
        let files = dir.path().join("partly");
        std::fs::create_dir(&files).unwrap();
        let partly = self::files(&files, [0, 100, 30]);
        partly[&1].append(&[b'a'; 10]).unwrap();
        partly[&1].sync().unwrap();
        let mut map = map_in(Phase::Drained, &partly);
        assert!(!resolve_move(&mut map, &partly).unwrap());
        assert_eq!(
            partly[&1].len(),
            100,
            "the copy is cut at the switch offset"
        );
        assert_eq!(map.len(), 130);
    }
}
