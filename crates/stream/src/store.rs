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
        let moving = map.moving().copied();
        let mut files = BTreeMap::new();
        for extent in map.extents() {
            if moving.is_none_or(|m| m.target != extent.file) {
                let format = self.orbit.tiers()[extent.tier].format;
                let path = self.path(&name, extent.file, extent.tier);
                files.insert(
                    extent.file,
                    Arc::new(ExtentFile::open(&path, format, None)?),
                );
            }
        }
        set_ends(&mut map, &files);
        let mut changed = false;
        if let Some(moving) = moving {
            let path = self.path(&name, moving.target, moving.tier);
            let format = self.orbit.tiers()[moving.tier].format;
            let source = map.extents()[0];
            let head = match moving.phase {
                // The switch happened if the target holds bytes (a crash
                // came before its record): its head is the source's bytes.
                Phase::Prepared => {
                    (file_size(&path)? > 0).then_some((source.end - source.base, false))
                }
                Phase::Switched | Phase::Drained => Some((
                    moving.switched_at.expect("a switched move") - source.base,
                    moving.phase == Phase::Drained,
                )),
                Phase::Linked => None,
            };
            let target = Arc::new(ExtentFile::open(&path, format, head)?);
            files.insert(moving.target, target.clone());
            changed = resolve_move(&mut map, &target)?;
            if changed && map.moving().is_some_and(|m| m.phase == Phase::Prepared) {
                // The switch was undone: the target starts again, empty.
                std::fs::remove_file(&path).map_err(on(ErrorKind::Tier, "remove", &path))?;
                files.insert(moving.target, Arc::new(ExtentFile::create(&path, format)?));
            }
            set_ends(&mut map, &files);
        }
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
/// extent's start ends there: what follows was never fsynced).
fn set_ends(map: &mut ExtentMap, files: &BTreeMap<u64, Arc<ExtentFile>>) {
    let extents: Vec<Extent> = map.extents().to_vec();
    for (index, extent) in extents.iter().enumerate() {
        // A target is opened after the source's end is known.
        let Some(file) = files.get(&extent.file) else {
            continue;
        };
        let held = extent.base + file.len();
        let end = match extents.get(index + 1) {
            Some(next) => held.min(next.start),
            None => held,
        };
        map.set_end(index, end);
    }
}

/// Brings a move that a crash interrupted to a phase the mover goes on
/// from; true if the map changed (the caller records it).
fn resolve_move(map: &mut ExtentMap, target: &ExtentFile) -> Result<bool> {
    let Some(moving) = map.moving().copied() else {
        return Ok(false);
    };
    match moving.phase {
        // The target holds bytes: the switch happened, at the source's
        // end (the target's head, reserved when it was opened).
        Phase::Prepared if !target.is_empty() => {
            map.switch()?;
            Ok(true)
        }
        // A source shorter than the switch offset lost bytes never
        // fsynced (a power cut: every fsync after the switch syncs it):
        // the switch is undone and the target's bytes dropped, so that the
        // stream stays one contiguous prefix.
        Phase::Switched if map.extents()[0].end < moving.switched_at.unwrap_or(0) => {
            let source = map.extents()[0];
            let prepared = Move {
                phase: Phase::Prepared,
                switched_at: None,
                ..moving
            };
            *map = ExtentMap::restore(vec![source], Some(prepared), map.next_file());
            Ok(true)
        }
        // A drain goes on from the head's frames found (a plain head
        // starts again); a link is done again (it is idempotent).
        Phase::Prepared | Phase::Switched | Phase::Drained | Phase::Linked => Ok(false),
    }
}

fn file_size(path: &Path) -> Result<u64> {
    match std::fs::metadata(path) {
        Ok(meta) => Ok(meta.len()),
        Err(err) => Err(Error::on(ErrorKind::Tier, "stat", path).with_source(err)),
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
    use crate::orbit::Format;

    /// A source of 100 bytes (file 0, plain) and a target (file 1, zstd)
    /// with `head` reserved and `tail` bytes appended after it.
    fn files(dir: &Path, head: Option<u64>, tail: usize) -> BTreeMap<u64, Arc<ExtentFile>> {
        let source = ExtentFile::create(&dir.join("0"), Format::Plain).unwrap();
        source.append(&[b's'; 100]).unwrap();
        let target = ExtentFile::create(&dir.join("1"), Format::Zstd).unwrap();
        if let Some(bytes) = head {
            target.reserve_head(bytes);
        }
        target.append(&vec![b't'; tail]).unwrap();
        target.sync().unwrap();
        BTreeMap::from([(0, Arc::new(source)), (1, Arc::new(target))])
    }

    fn prepared() -> ExtentMap {
        let mut map = ExtentMap::new(0);
        map.appended(100);
        map.prepare(1).unwrap();
        map
    }

    #[test]
    fn a_switch_not_recorded_is_found_in_the_target() {
        let dir = tempfile::tempdir().unwrap();
        drop(files(dir.path(), Some(100), 30));
        // As a restart opens it: the head is the source's bytes.
        let target =
            ExtentFile::open(&dir.path().join("1"), Format::Zstd, Some((100, false))).unwrap();
        assert_eq!(target.len(), 130);
        assert_eq!(target.head_filled(), Some(0));
        let mut map = prepared();
        assert!(resolve_move(&mut map, &target).unwrap());
        assert_eq!(map.moving().unwrap().phase, Phase::Switched);
        assert_eq!(map.moving().unwrap().switched_at, Some(100));
        let files = BTreeMap::from([
            (
                0,
                Arc::new(ExtentFile::open(&dir.path().join("0"), Format::Plain, None).unwrap()),
            ),
            (1, Arc::new(target)),
        ]);
        set_ends(&mut map, &files);
        assert_eq!(map.len(), 130);
        assert_eq!(map.tail().base, 0);
    }

    #[test]
    fn a_target_without_bytes_leaves_the_move_prepared() {
        let dir = tempfile::tempdir().unwrap();
        let files = files(dir.path(), None, 0);
        let mut map = prepared();
        assert!(!resolve_move(&mut map, &files[&1]).unwrap());
        assert_eq!(map.moving().unwrap().phase, Phase::Prepared);
    }

    #[test]
    fn a_head_filled_before_a_crash_is_found_and_the_tail_after_its_room() {
        let dir = tempfile::tempdir().unwrap();
        let files = files(dir.path(), Some(300_000), 0);
        let target = &files[&1];
        target.fill_head(&vec![b'h'; 262_144]).unwrap();
        target.append(&[b't'; 10]).unwrap();
        target.sync().unwrap();
        let reopened =
            ExtentFile::open(&dir.path().join("1"), Format::Zstd, Some((300_000, false))).unwrap();
        assert_eq!(
            reopened.head_filled(),
            Some(262_144),
            "the whole frame of the head"
        );
        assert_eq!(reopened.len(), 300_010);
        assert_eq!(reopened.read_at(300_000, 100).unwrap(), [b't'; 10]);
        reopened.fill_head(&vec![b'h'; 300_000 - 262_144]).unwrap();
        reopened.close_head().unwrap();
        reopened.sync().unwrap();
        let linked = ExtentFile::open(&dir.path().join("1"), Format::Zstd, None).unwrap();
        assert_eq!(linked.len(), 300_010, "a scan crosses the padding");
        let mut expected = vec![b'h'; 300_000];
        expected.extend_from_slice(&[b't'; 10]);
        assert_eq!(linked.read_at(0, 400_000).unwrap(), expected);
    }
}
