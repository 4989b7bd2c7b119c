//! A log of sequence-numbered records, a shell that appends it line by
//! line (each `>>` an open, a write and a close, as a script's log does),
//! and `tail -F` following it: the readers of a stream must see every
//! record once and in order.

use std::path::Path;
use std::process::{Child, Command, Stdio};

/// Record `n`: its number and a line of text.
pub fn record(n: u64) -> String {
    format!(
        "{n:08} 2026-12-04T13:00:00Z app[42]: request {n} served in {} ms\n",
        n % 97
    )
}

/// Records `0..count`.
pub fn records(count: u64) -> String {
    (0..count).map(record).collect()
}

/// bash appending records `0..count` to `file`, one `printf >>` each.
pub fn records_writer(file: &Path, count: u64) -> Command {
    let mut bash = crate::tool("bash");
    bash.arg("-c").arg(format!(
        "for ((n = 0; n < {count}; n++)); do \
           printf '%08d 2026-12-04T13:00:00Z app[42]: request %d served in %d ms\\n' \
             $n $n $((n % 97)) >> '{}'; \
         done",
        file.display()
    ));
    bash
}

/// `tail -F` of `file` from its first byte (polling every 50 ms), into
/// `out`.
pub fn tail_follow(file: &Path, out: &Path) -> Child {
    crate::tool("tail")
        .args(["-F", "-s", "0.05", "-c", "+1"])
        .arg(file)
        .stdout(std::fs::File::create(out).expect("tail's output"))
        .stderr(Stdio::null())
        .spawn()
        .expect("start tail -F")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shell_writes_the_records_the_tests_expect() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("log");
        let status: std::process::ExitStatus = records_writer(&file, 120).status().unwrap();
        assert!(status.success());
        assert_eq!(std::fs::read_to_string(&file).unwrap(), records(120));
    }
}
