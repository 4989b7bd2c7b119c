//! The dense tiers' format read back by the standard `zstd` tool and by
//! offset: appends of any size, a reopen, the link of two files, and any
//! range read from the frames that hold it.

use std::path::Path;

use dmm_stream::seekable::{FRAME_BYTES, SeekableFile};
use proptest::prelude::*;

/// A log of numbered lines, `bytes` long at least.
fn text_log(bytes: usize, first: usize) -> Vec<u8> {
    let mut log = Vec::new();
    let mut line = first;
    while log.len() < bytes {
        log.extend_from_slice(
            format!(
                "2026-12-04T11:{:02}:{:02}Z node-a dmm: record {line} appended to stream vm1.log\n",
                line / 60 % 60,
                line % 60
            )
            .as_bytes(),
        );
        line += 1;
    }
    log
}

/// What the standard `zstd -d` makes of `path`.
fn zstd_d(path: &Path) -> Vec<u8> {
    dmm_testkit::run(dmm_testkit::tool("zstd").args(["-d", "-c", "-q"]).arg(path)).stdout
}

#[test]
fn zstd_reads_back_every_append_and_a_reopen_finds_every_frame() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm1.log.zst");
    let mut file = SeekableFile::create(&path).unwrap();
    assert_eq!(zstd_d(&path), b"", "an empty one is a valid zstd file");
    let log = text_log(3 * FRAME_BYTES + 1234, 0);
    let mut written = 0;
    for size in [1, 4096, 100, FRAME_BYTES + 7, 60_000].into_iter().cycle() {
        let end = (written + size).min(log.len());
        file.append(&log[written..end]).unwrap();
        file.sync().unwrap();
        written = end;
        if written == log.len() {
            break;
        }
    }
    assert_eq!(zstd_d(&path), log);
    let reopened = SeekableFile::open(&path).unwrap();
    assert_eq!(reopened.frames(), file.frames());
    assert_eq!(reopened.len(), log.len() as u64);
    assert_eq!(
        reopened.read_at(100_000, 70_000).unwrap(),
        &log[100_000..170_000]
    );
    let density = log.len() as f64 / std::fs::metadata(&path).unwrap().len() as f64;
    assert!(density > 3.0, "a text log compresses: {density:.1}x");
}

#[test]
fn a_linked_file_reads_as_both_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (first, second) = (text_log(300_000, 0), text_log(200_000, 5000));
    let mut receiving = SeekableFile::create(&dir.path().join("receiving.zst")).unwrap();
    receiving.append(&first).unwrap();
    let mut target = SeekableFile::create(&dir.path().join("target.zst")).unwrap();
    target.append(&second[..1000]).unwrap();
    target.append(&second[1000..]).unwrap();
    receiving.link(&target).unwrap();
    receiving.sync().unwrap();
    let whole = [first.clone(), second.clone()].concat();
    assert_eq!(zstd_d(&dir.path().join("receiving.zst")), whole);
    let across = first.len() as u64 - 10;
    assert_eq!(
        receiving.read_at(across, 20).unwrap(),
        &whole[across as usize..][..20]
    );
    let reopened = SeekableFile::open(&dir.path().join("receiving.zst")).unwrap();
    assert_eq!(reopened.len(), whole.len() as u64);
}

#[test]
fn a_file_without_a_seek_table_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plain");
    std::fs::write(&path, text_log(10_000, 0)).unwrap();
    let err = SeekableFile::open(&path).err().expect("refused");
    assert!(err.to_string().contains("no seek table"), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn any_range_reads_back(
        sizes in prop::collection::vec(1usize..(FRAME_BYTES + 5000), 1..6),
        reads in prop::collection::vec((0u64..1_500_000, 0usize..300_000), 8),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut file = SeekableFile::create(&dir.path().join("s.zst")).unwrap();
        let total: usize = sizes.iter().sum();
        let log = text_log(total, 0);
        let mut at = 0;
        for size in sizes {
            file.append(&log[at..at + size]).unwrap();
            at += size;
        }
        for (offset, len) in reads {
            let offset = offset % (total as u64 + 1);
            let end = (offset as usize + len).min(total);
            prop_assert_eq!(file.read_at(offset, len).unwrap(), &log[offset as usize..end]);
        }
    }
}
