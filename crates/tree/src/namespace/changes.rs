//! Namespace changes made through the access point to tracked entries
//! (rename, unlink, rmdir, link), as phased commits: the intent is
//! journaled, the change is made in the target, the names are updated.
//! After a crash, [`Namespace::recover`] looks at the target to tell
//! whether each interrupted change happened.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;

use serde::{Deserialize, Serialize};

use super::Namespace;
use super::state::{Entry, State};
use crate::error::{Error, ErrorKind, Result};
use crate::journal::{Change, Durability, EntryId, EntryState};

/// A change under way, as journaled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Intent {
    /// Population of a directory that existed in the target before, with
    /// the names it held then.
    Populate {
        dir: EntryId,
        preexisting: Vec<Vec<u8>>,
    },
    /// `from` (a name in a directory) becomes `to`.
    Rename {
        from: (EntryId, Vec<u8>),
        to: (EntryId, Vec<u8>),
        /// Target inode that moves.
        ino: u64,
        exchange: bool,
    },
    /// A name disappears (unlink or rmdir).
    Remove { at: (EntryId, Vec<u8>), ino: u64 },
    /// A new name for an existing file.
    Link { to: (EntryId, Vec<u8>), ino: u64 },
}

impl Intent {
    pub(super) fn begin(&self, id: i64) -> Change {
        Change::BeginIntent {
            id,
            body: serde_json::to_string(self).expect("intents serialize"),
        }
    }
}

fn key(parent: EntryId, name: &OsStr) -> (EntryId, Vec<u8>) {
    (parent, name.as_bytes().to_vec())
}

impl Namespace {
    /// Tracks a directory the journal does not know (created through the
    /// access point): it may become the parent of tracked entries.
    pub fn track_dir(&self, parent: EntryId, name: &OsStr, target_ino: u64) -> Result<EntryId> {
        let mut state = self.lock();
        if let Some(id) = state.entry_of_ino(target_ino) {
            return Ok(id);
        }
        let id = state.allocate();
        let entry = Entry {
            state: EntryState::Populated,
            source: None,
            size: 0,
            source_ino: 0,
            source_ctime: 0,
            target_ino,
            changed: true,
            merged: false,
            names: Vec::new(),
            progress: None,
        };
        let row = entry.row(id);
        state.insert_entry(id, entry);
        let name_change = state.add_name(id, parent, name.to_os_string());
        state.journal([Change::Insert(row), name_change]);
        drop(state);
        self.flush()?;
        Ok(id)
    }

    /// Renames `name` in `parent` to `new_name` in `new_parent` through
    /// `act` (which performs it in the target), journaling it first if it
    /// concerns a tracked entry. `exchange` swaps the two names.
    pub fn rename(
        &self,
        (parent, name): (EntryId, &OsStr),
        (new_parent, new_name): (EntryId, &OsStr),
        exchange: bool,
        act: impl FnOnce() -> io::Result<()>,
    ) -> Result<io::Result<()>> {
        let (moved, replaced) = {
            let state = self.lock();
            (state.child(parent, name), state.child(new_parent, new_name))
        };
        // A directory replaced by a rename must really be empty, and one
        // being populated must not move under its population.
        for dir in moved.into_iter().chain(replaced) {
            self.ensure_populated(dir)?;
        }
        if moved.is_none() && replaced.is_none() {
            return Ok(act());
        }
        let ino = match moved {
            Some(id) => self.target_ino(id).unwrap_or(0),
            None => 0,
        };
        let intent = Intent::Rename {
            from: key(parent, name),
            to: key(new_parent, new_name),
            ino,
            exchange,
        };
        self.phased(intent, act, |state| {
            let mut changes = Vec::new();
            changes.extend(state.remove_name(parent, name));
            if let Some(change) = state.remove_name(new_parent, new_name) {
                changes.push(change);
            }
            if let Some(id) = moved {
                changes.push(state.add_name(id, new_parent, new_name.to_os_string()));
            }
            match replaced {
                Some(id) if exchange => {
                    changes.push(state.add_name(id, parent, name.to_os_string()))
                }
                Some(id) => changes.extend(state.forget_if_nameless(id)),
                None => {}
            }
            changes
        })
    }

    /// Removes `name` from `parent` (unlink or rmdir) through `act`.
    pub fn remove(
        &self,
        parent: EntryId,
        name: &OsStr,
        act: impl FnOnce() -> io::Result<()>,
    ) -> Result<io::Result<()>> {
        let Some(id) = self.child(parent, name) else {
            return Ok(act());
        };
        // rmdir of a directory not populated yet: its source entries
        // make it non-empty.
        self.ensure_populated(id)?;
        let ino = self.target_ino(id).unwrap_or(0);
        let intent = Intent::Remove {
            at: key(parent, name),
            ino,
        };
        self.phased(intent, act, |state| {
            let mut changes: Vec<Change> = state.remove_name(parent, name).into_iter().collect();
            changes.extend(state.forget_if_nameless(id));
            changes
        })
    }

    /// Gives tracked file `id` another name through `act`.
    pub fn link(
        &self,
        id: EntryId,
        (parent, name): (EntryId, &OsStr),
        act: impl FnOnce() -> io::Result<()>,
    ) -> Result<io::Result<()>> {
        let Some(ino) = self.target_ino(id) else {
            return Ok(act());
        };
        let intent = Intent::Link {
            to: key(parent, name),
            ino,
        };
        self.phased(intent, act, |state| {
            vec![state.add_name(id, parent, name.to_os_string())]
        })
    }

    /// Intent, act, then the name changes `finish` returns (only if the
    /// act succeeded). The intent is on disk before the act: a power cut
    /// that keeps the act finds it, and recovery looks at the target. The
    /// names are journaled once the act is on disk (`apply` syncs first).
    fn phased(
        &self,
        intent: Intent,
        act: impl FnOnce() -> io::Result<()>,
        finish: impl FnOnce(&mut State) -> Vec<Change>,
    ) -> Result<io::Result<()>> {
        let intent_id = self.lock().next_intent();
        self.commit(vec![intent.begin(intent_id)], Durability::Durable)?;
        let outcome = act();
        let mut changes = match outcome {
            Ok(()) => finish(&mut self.lock()),
            Err(_) => Vec::new(),
        };
        changes.push(Change::FinishIntent(intent_id));
        self.commit(changes, Durability::Lazy)?;
        Ok(outcome)
    }

    /// Resolves the intents a crash left: a change that reached the target
    /// gets its names updated, one that did not is dropped.
    pub(super) fn recover(&self, intents: Vec<(i64, String)>) -> Result<()> {
        for (id, body) in intents {
            let intent: Intent = serde_json::from_str(&body).map_err(|e| {
                Error::new(ErrorKind::Journal, format!("unreadable intent {id}")).with_source(e)
            })?;
            let mut changes = Vec::new();
            match intent {
                Intent::Populate { dir, preexisting } => {
                    let names = preexisting.into_iter().map(OsString::from_vec).collect();
                    self.lock().set_premerge(dir, id, names);
                    continue; // finished by the population redone later
                }
                Intent::Rename {
                    from,
                    to,
                    ino,
                    exchange,
                } => {
                    if ino != 0 && self.inode_at(&to) == Some(ino) {
                        let mut state = self.lock();
                        let moved = state.child(from.0, OsStr::from_bytes(&from.1));
                        let replaced = state.child(to.0, OsStr::from_bytes(&to.1));
                        changes.extend(state.remove_name(from.0, OsStr::from_bytes(&from.1)));
                        changes.extend(state.remove_name(to.0, OsStr::from_bytes(&to.1)));
                        if let Some(moved) = moved {
                            changes.push(state.add_name(
                                moved,
                                to.0,
                                OsString::from_vec(to.1.clone()),
                            ));
                        }
                        match replaced {
                            Some(r) if exchange => {
                                changes.push(state.add_name(r, from.0, OsString::from_vec(from.1)))
                            }
                            Some(r) => changes.extend(state.forget_if_nameless(r)),
                            None => {}
                        }
                    }
                }
                Intent::Remove { at, ino } => {
                    if self.inode_at(&at) != Some(ino) {
                        let mut state = self.lock();
                        let gone = state.child(at.0, OsStr::from_bytes(&at.1));
                        changes.extend(state.remove_name(at.0, OsStr::from_bytes(&at.1)));
                        if let Some(gone) = gone {
                            changes.extend(state.forget_if_nameless(gone));
                        }
                    }
                }
                Intent::Link { to, ino } => {
                    if self.inode_at(&to) == Some(ino) {
                        let mut state = self.lock();
                        if let Some(entry) = state.entry_of_ino(ino) {
                            changes.push(state.add_name(entry, to.0, OsString::from_vec(to.1)));
                        }
                    }
                }
            }
            changes.push(Change::FinishIntent(id));
            self.apply(&changes, Durability::Lazy)?;
        }
        Ok(())
    }

    /// The target inode at a (parent, name), if the parent is tracked and
    /// the name exists.
    fn inode_at(&self, (parent, name): &(EntryId, Vec<u8>)) -> Option<u64> {
        let dir = self.target_path(*parent)?;
        fs::symlink_metadata(dir.join(OsStr::from_bytes(name)))
            .ok()
            .map(|m| m.ino())
    }
}
