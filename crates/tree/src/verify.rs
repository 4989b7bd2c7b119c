//! Proof at the end: every file that came from the source and was not
//! changed through the access point must hold the source's bytes. Files
//! are compared by BLAKE3 of their whole content.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::namespace::Namespace;

/// A file whose target content differs from its source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mismatch {
    pub source: PathBuf,
    pub target: PathBuf,
    pub reason: String,
}

/// Compares every migrated, unchanged file; returns the files checked and
/// the mismatches.
pub fn verify(namespace: &Namespace) -> (u64, Vec<Mismatch>) {
    let mut checked = 0;
    let mut mismatches = Vec::new();
    for (source, target) in namespace.unchanged_files() {
        checked += 1;
        let source_path = namespace.source().path(&source);
        let reason = match (digest(&source_path), digest(&target)) {
            (Ok(a), Ok(b)) if a == b => continue,
            (Ok(_), Ok(_)) => "content differs".to_string(),
            (Err(err), _) => format!("cannot read the source: {err}"),
            (_, Err(err)) => format!("cannot read the target: {err}"),
        };
        mismatches.push(Mismatch {
            source: source_path,
            target,
            reason,
        });
    }
    (checked, mismatches)
}

fn digest(path: &Path) -> io::Result<blake3::Hash> {
    let mut file = File::open(path)?;
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
