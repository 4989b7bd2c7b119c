//! Proof at the end: every file that came from the source and was not
//! changed through the access point must hold the source's bytes. Files
//! are compared by BLAKE3 of their whole content.
//!
//! Clients keep working while it runs. A file a client changes, renames or
//! deletes meanwhile is not a mismatch: every client change flags the file
//! before it reaches the target, so a file still unflagged after it was
//! read was read whole and unchanged; one found under another name (or
//! another inode under its name) is looked up again.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::namespace::{Namespace, UnchangedFile};

/// A file whose target content differs from its source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mismatch {
    pub source: PathBuf,
    pub target: PathBuf,
    pub reason: String,
}

/// How often a file renamed under the verifier is looked up again.
const ATTEMPTS: usize = 3;

/// What comparing one file found.
enum Verdict {
    Same,
    /// A client changed or removed it meanwhile: not dmm's copy any more.
    Skipped,
    Differs(Mismatch),
}

/// Compares every migrated, unchanged file; returns the files checked and
/// the mismatches.
pub fn verify(namespace: &Namespace) -> (u64, Vec<Mismatch>) {
    let mut checked = 0;
    let mut mismatches = Vec::new();
    for file in namespace.unchanged_files() {
        match verify_file(namespace, &file) {
            Verdict::Same => checked += 1,
            Verdict::Skipped => {}
            Verdict::Differs(mismatch) => {
                checked += 1;
                mismatches.push(mismatch);
            }
        }
    }
    (checked, mismatches)
}

fn verify_file(namespace: &Namespace, file: &UnchangedFile) -> Verdict {
    let source = namespace.source().path(&file.source);
    let source_digest = digest(&source, None);
    let mut last = None;
    for _ in 0..ATTEMPTS {
        let Some(target) = namespace.target_path(file.id) else {
            return Verdict::Skipped;
        };
        let target_digest = digest(&target, Some(file.target_ino));
        if !namespace.is_unchanged(file.id) {
            return Verdict::Skipped;
        }
        let reason = match (&source_digest, target_digest) {
            (Ok(a), Ok(b)) if *a == b => return Verdict::Same,
            (Ok(_), Ok(_)) => "content differs".to_string(),
            (Err(err), _) => format!("cannot read the source: {err}"),
            // Renamed, or replaced by another file: look it up again.
            (_, Err(err)) if err.kind() == io::ErrorKind::NotFound => {
                last = Some((target, format!("cannot read the target: {err}")));
                continue;
            }
            (_, Err(err)) => format!("cannot read the target: {err}"),
        };
        last = Some((target, reason));
        break;
    }
    match last {
        Some((target, reason)) => Verdict::Differs(Mismatch {
            source,
            target,
            reason,
        }),
        None => Verdict::Skipped,
    }
}

/// BLAKE3 of the file at `path`, which must be inode `ino` if given (else
/// it counts as not found).
fn digest(path: &Path, ino: Option<u64>) -> io::Result<blake3::Hash> {
    let mut file = File::open(path)?;
    if ino.is_some_and(|ino| file.metadata().is_ok_and(|m| m.ino() != ino)) {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{} is another file now", path.display()),
        ));
    }
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(hasher.finalize());
        }
        hasher.update(&buf[..n]);
    }
}
