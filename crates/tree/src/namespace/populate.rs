//! Populating a directory: a placeholder in the target for every entry of
//! the source directory, with the source's metadata, recorded in the
//! journal before anyone can see it.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};

use super::changes::Intent;
use super::progress::FileProgress;
use super::state::Entry;
use super::{Collision, Namespace};
use crate::error::{Error, ErrorKind, Result, on};
use crate::fidelity;
use crate::journal::{Change, Durability, EntryId, EntryState, NameRow};
use crate::source::{Child, Kind};

/// A child placed in the target, to be recorded.
enum Placed {
    /// A directory or regular file, tracked from now on (`dev`: its source
    /// device, which with the entry's source inode identifies hard links).
    New {
        name: OsString,
        id: EntryId,
        entry: Entry,
        dev: u64,
    },
    /// Another name of an entry already placed (a hard link).
    Link(OsString, EntryId),
    /// A symbolic link or special file: complete once created.
    Complete,
}

impl Placed {
    /// A new regular file with other names.
    fn is_linked(&self) -> bool {
        matches!(self, Placed::New { entry, .. } if entry.source_ino != 0)
    }
}

impl Namespace {
    /// Makes sure directory `id` is populated: populates it in this thread,
    /// or waits for the thread that is doing it. Untracked or already
    /// populated directories return at once.
    pub fn ensure_populated(&self, id: EntryId) -> Result<()> {
        let mut state = self.lock();
        loop {
            if !state.is_unpopulated(id) {
                return Ok(());
            }
            if !state.is_populating(id) {
                break;
            }
            self.wait(&mut state)?;
        }
        state.begin_population(id);
        drop(state);
        let populating = Populating {
            namespace: self,
            id,
        };
        let result = self.populate(id);
        drop(populating);
        match &result {
            Ok(()) => self.lock().clear_failure(id),
            Err(err) => self.record_failure(id, err),
        }
        result
    }

    fn populate(&self, id: EntryId) -> Result<()> {
        let (source_dir, merged, target_ino) = {
            let state = self.lock();
            let Some(entry) = state.entry(id) else {
                return Ok(()); // forgotten meanwhile
            };
            (entry.source.clone(), entry.merged, entry.target_ino)
        };
        let Some((dir, shown)) = self.open_target_dir(id, target_ino)? else {
            return Ok(()); // deleted meanwhile
        };
        let Some(source_dir) = &source_dir else {
            // Made by a client: nothing to bring from the source.
            return self.record_population(id, Vec::new(), Vec::new());
        };
        let target_dir = proc_path(&dir);
        self.populate_in(id, source_dir, &target_dir, merged)
            .map_err(|err| err.at_path(&target_dir, &shown))
    }

    /// Populates directory `id` of the target, reached at `target_dir`.
    fn populate_in(
        &self,
        id: EntryId,
        source_dir: &Path,
        target_dir: &Path,
        merged: bool,
    ) -> Result<()> {
        let children = self.source.list(source_dir)?;
        let mut changes = Vec::new();
        let preexisting = if merged {
            self.merge_list(id, target_dir, &mut changes)?
        } else {
            HashSet::new()
        };
        let mut placed = Vec::new();
        for child in &children {
            self.check_open()?;
            let was_there = preexisting.contains(&child.name);
            placed.push(self.place(source_dir, target_dir, child, was_there)?);
        }
        let _linking = placed
            .iter()
            .any(Placed::is_linked)
            .then(|| self.linking.lock());
        self.link_duplicates(target_dir, &mut placed)?;
        // Last, as linking changes the directory's times.
        let meta = self.source.stat(source_dir)?;
        fidelity::set_times(target_dir, &meta).map_err(on(
            ErrorKind::Target,
            "set times of",
            target_dir,
        ))?;
        self.record_population(id, placed, changes)
    }

    /// Opens directory `id` in the target (`None` once it has no name), and
    /// checks it is the directory recorded: the population then works in
    /// it through its descriptor, wherever clients move it meanwhile. Also
    /// returns its path, for messages.
    fn open_target_dir(&self, id: EntryId, ino: u64) -> Result<Option<(OwnedFd, PathBuf)>> {
        let Some(path) = self.target_path(id) else {
            return Ok(None);
        };
        let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::open(&path, flags, Mode::empty())
            .map_err(|e| on(ErrorKind::Target, "open", &path)(e.into()))?;
        let found = rustix::fs::fstat(&fd)
            .map_err(|e| on(ErrorKind::Target, "stat", &path)(e.into()))?
            .st_ino;
        if found != ino {
            return Err(Error::on(ErrorKind::Target, "open", &path)
                .with_detail("replaced while dmm opened it"));
        }
        Ok(Some((fd, path)))
    }

    /// The names the merged directory held before dmm put anything in it,
    /// from the intent of an interrupted population or read now (and then
    /// recorded in a new intent).
    fn merge_list(
        &self,
        id: EntryId,
        target_dir: &Path,
        changes: &mut Vec<Change>,
    ) -> Result<HashSet<OsString>> {
        if let Some(names) = self.lock().premerge(id) {
            return Ok(names.clone());
        }
        let listing =
            fs::read_dir(target_dir).map_err(on(ErrorKind::Target, "list", target_dir))?;
        let mut names = HashSet::new();
        for entry in listing {
            names.insert(
                entry
                    .map_err(on(ErrorKind::Target, "list", target_dir))?
                    .file_name(),
            );
        }
        let intent = Intent::Populate {
            dir: id,
            preexisting: names.iter().map(|n| n.clone().into_vec()).collect(),
        };
        let intent_id = {
            let mut state = self.lock();
            let intent_id = state.next_intent();
            state.set_premerge(id, intent_id, names.clone());
            intent_id
        };
        self.commit(vec![intent.begin(intent_id)], Durability::Durable)?;
        changes.push(Change::FinishIntent(intent_id));
        Ok(names)
    }

    /// Creates the placeholder of one source child.
    fn place(
        &self,
        source_dir: &Path,
        target_dir: &Path,
        child: &Child,
        preexisting: bool,
    ) -> Result<Placed> {
        let source = source_dir.join(&child.name);
        let target = target_dir.join(&child.name);
        let merge = self.clear_name(&target, child, preexisting)?;
        if child.meta.is_linked_file()
            && let Some(existing) = self.hard_link_of(child.meta.dev, child.meta.ino)
            && let Some(path) = self.target_path(existing)
        {
            match fs::hard_link(&path, &target) {
                Ok(()) => return Ok(Placed::Link(child.name.clone(), existing)),
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => return Err(on(ErrorKind::Target, "link", &target)(err)),
            }
        }
        let link_target = match child.meta.kind {
            Kind::Symlink => Some(self.source.read_link(&source)?),
            _ => None,
        };
        let exists = merge || matches!(fs::symlink_metadata(&target), Ok(m) if m.is_dir());
        if !exists {
            fidelity::create_placeholder(&target, &child.meta, link_target.as_deref())
                .map_err(on(ErrorKind::Target, "create", &target))?;
        }
        let xattrs = self.source.xattrs(&source)?;
        fidelity::apply_meta(&target, &child.meta, &xattrs).map_err(on(
            ErrorKind::Target,
            "set metadata of",
            &target,
        ))?;
        let target_ino = fs::symlink_metadata(&target)
            .map_err(on(ErrorKind::Target, "stat", &target))?
            .ino();
        let state = match child.meta.kind {
            Kind::Dir => EntryState::Unpopulated,
            Kind::File if child.meta.size > 0 => EntryState::Pending,
            Kind::File => EntryState::Done,
            // Links and special files are complete once created.
            _ => return Ok(Placed::Complete),
        };
        let entry = Entry {
            state,
            source: Some(source),
            size: if child.meta.kind == Kind::File {
                child.meta.size
            } else {
                0
            },
            source_ino: if child.meta.is_linked_file() {
                child.meta.ino
            } else {
                0
            },
            target_ino,
            source_ctime: child.meta.ctime.nanoseconds(),
            changed: false,
            merged: merge,
            names: Vec::new(),
            progress: (state == EntryState::Pending)
                .then(|| FileProgress::new(child.meta.size, Default::default())),
        };
        let id = self.lock().allocate();
        Ok(Placed::New {
            name: child.name.clone(),
            id,
            entry,
            dev: child.meta.dev,
        })
    }

    /// Makes room for a source child at `target`. Returns whether the name
    /// holds a directory that existed before and is merged with the source
    /// directory.
    fn clear_name(&self, target: &Path, child: &Child, preexisting: bool) -> Result<bool> {
        let existing = match fs::symlink_metadata(target) {
            Ok(existing) => existing,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(err) => return Err(on(ErrorKind::Target, "stat", target)(err)),
        };
        if existing.is_dir() && child.meta.kind == Kind::Dir {
            return Ok(preexisting);
        }
        if !preexisting {
            // Left by a population a crash interrupted: ours to redo.
            return remove(target).map(|()| false);
        }
        match self.settings.collision {
            Collision::Error => Err(Error::on(ErrorKind::Invalid, "create", target)
                .with_detail("it already exists in the target, collision=error")),
            Collision::Overwrite => remove(target).map(|()| false),
            Collision::Rename => {
                let mut aside = target.as_os_str().to_os_string();
                aside.push(format!(".dmm-{}", self.settings.migid));
                fs::rename(target, &aside).map_err(on(ErrorKind::Target, "move aside", target))?;
                Ok(false)
            }
        }
    }

    /// An entry already recorded for source inode `ino` of device `dev`
    /// (another name of this file).
    fn hard_link_of(&self, dev: u64, ino: u64) -> Option<EntryId> {
        let (existing, source) = {
            let state = self.lock();
            let existing = state.entry_of_source_ino(ino)?;
            (existing, state.entry(existing)?.source.clone()?)
        };
        // Same inode number on another file system is another file.
        let meta = self.source.stat(&source).ok()?;
        (meta.dev == dev && meta.ino == ino).then_some(existing)
    }

    /// Makes every later name of a source inode a hard link of its first
    /// name. `place` links to names already recorded, but a population
    /// running at the same time may have recorded the inode since, and
    /// this directory may hold several names of it. Called under
    /// `linking`, so that this check and the recording are one step.
    fn link_duplicates(&self, target_dir: &Path, placed: &mut [Placed]) -> Result<()> {
        let mut firsts: HashMap<(u64, u64), (EntryId, PathBuf)> = HashMap::new();
        for item in placed.iter_mut().filter(|item| item.is_linked()) {
            let Placed::New {
                name,
                id,
                entry,
                dev,
            } = item
            else {
                continue;
            };
            let key = (*dev, entry.source_ino);
            let target = target_dir.join(&*name);
            let first = firsts.get(&key).cloned().or_else(|| {
                let existing = self.hard_link_of(key.0, key.1)?;
                Some((existing, self.target_path(existing)?))
            });
            let Some((first, first_path)) = first else {
                firsts.insert(key, (*id, target));
                continue;
            };
            fs::remove_file(&target).map_err(on(ErrorKind::Target, "remove", &target))?;
            fs::hard_link(&first_path, &target).map_err(on(ErrorKind::Target, "link", &target))?;
            *item = Placed::Link(name.clone(), first);
        }
        Ok(())
    }

    /// Journals the population, then makes it visible. Populations with
    /// hard-linked files call this under `linking`.
    fn record_population(
        &self,
        id: EntryId,
        placed: Vec<Placed>,
        mut changes: Vec<Change>,
    ) -> Result<()> {
        let mut rows = Vec::new();
        for item in &placed {
            match item {
                Placed::New {
                    name,
                    id: child,
                    entry,
                    ..
                } => {
                    rows.push(Change::Insert(entry.row(*child)));
                    rows.push(name_row(id, name, *child));
                }
                Placed::Link(name, existing) => rows.push(name_row(id, name, *existing)),
                Placed::Complete => {}
            }
        }
        rows.push(Change::State(id, EntryState::Populated));
        rows.append(&mut changes);
        self.commit(rows, Durability::Lazy)?;
        let mut state = self.lock();
        state.mark_populated(id);
        for item in placed {
            match item {
                Placed::New {
                    name,
                    id: child,
                    entry,
                    ..
                } => state.adopt(id, name, child, entry),
                Placed::Link(name, existing) => {
                    state.add_name(existing, id, name);
                }
                Placed::Complete => {}
            }
        }
        Ok(())
    }
}

/// Ends a population when dropped, however it ended: the directory is no
/// longer being populated, and whoever waits for it looks again.
struct Populating<'a> {
    namespace: &'a Namespace,
    id: EntryId,
}

impl Drop for Populating<'_> {
    fn drop(&mut self) {
        let mut state = self.namespace.lock();
        state.end_population(self.id);
        self.namespace.progress.notify_all();
    }
}

/// A path that reaches the directory `fd` is open on. It ends in `/.`, so
/// that calls which do not follow a final symbolic link act on the
/// directory, not on the `/proc` link.
fn proc_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}/.", fd.as_raw_fd()))
}

fn name_row(parent: EntryId, name: &OsString, entry: EntryId) -> Change {
    Change::AddName(NameRow {
        parent,
        name: name.clone().into_vec(),
        entry,
    })
}

fn remove(path: &Path) -> Result<()> {
    let result = match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(err) => Err(err),
    };
    result.map_err(on(ErrorKind::Target, "remove", path))
}
