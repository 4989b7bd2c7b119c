//! Extent files in both formats: the dense tiers' read back by the
//! standard `zstd` tool and by offset (appends of any size, a reopen, a
//! torn frame cut, a target's head filled while appends follow it), and
//! any range of either format read back, from frames and from the bytes a
//! tail holds in memory.

use std::path::Path;

use dmm_stream::ExtentFile;
use dmm_stream::orbit::Format;
use dmm_stream::seekable::FRAME_BYTES;
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
    let file = ExtentFile::create(&path, Format::Zstd).unwrap();
    file.seal().unwrap();
    assert_eq!(zstd_d(&path), b"", "an empty one is a valid zstd file");
    let log = text_log(3 * FRAME_BYTES + 1234, 0);
    let mut written = 0;
    for size in [1, 4096, 100, FRAME_BYTES + 7, 60_000].into_iter().cycle() {
        let end = (written + size).min(log.len());
        file.append(&log[written..end]).unwrap();
        if size != 100 {
            file.sync().unwrap();
        }
        written = end;
        if written == log.len() {
            break;
        }
    }
    assert_eq!(zstd_d(&path), log, "an unsealed tail reads back whole");
    file.seal().unwrap();
    assert_eq!(zstd_d(&path), log, "a sealed one too");
    let reopened = ExtentFile::open(&path, Format::Zstd, None).unwrap();
    assert_eq!(reopened.stored_bytes(), file.stored_bytes());
    assert_eq!(reopened.len(), log.len() as u64);
    assert_eq!(
        reopened.read_at(100_000, 70_000).unwrap(),
        &log[100_000..170_000]
    );
    let density = log.len() as f64 / std::fs::metadata(&path).unwrap().len() as f64;
    assert!(density > 3.0, "a text log compresses: {density:.1}x");
}

#[test]
fn a_target_holds_the_drained_head_then_the_appends_in_one_file() {
    let dir = tempfile::tempdir().unwrap();
    let (drained, appended) = (text_log(600_000, 0), text_log(200_000, 9000));
    let whole = [drained.clone(), appended.clone()].concat();
    for format in [Format::Plain, Format::Zstd] {
        let path = dir.path().join(format.as_str());
        let target = ExtentFile::create(&path, format).unwrap();
        target.reserve_head(drained.len() as u64);
        // Appends go on while the drain fills the head.
        target.append(&appended[..1000]).unwrap();
        target.sync().unwrap();
        target.fill_head(&drained[..FRAME_BYTES]).unwrap();
        target.append(&appended[1000..]).unwrap();
        assert!(
            target.close_head().is_err(),
            "{format:?}: a head not filled stays open"
        );
        target.fill_head(&drained[FRAME_BYTES..]).unwrap();
        target.close_head().unwrap();
        assert_eq!(target.read_at(0, whole.len()).unwrap(), whole, "{format:?}");
        target.seal().unwrap();
        let reopened = ExtentFile::open(&path, format, None).unwrap();
        assert_eq!(reopened.len(), whole.len() as u64, "{format:?}");
        let across = drained.len() as u64 - 10;
        assert_eq!(
            reopened.read_at(across, 20).unwrap(),
            &whole[across as usize..][..20]
        );
    }
    let dense = dir.path().join("zstd");
    assert_eq!(zstd_d(&dense), whole, "zstd -d skips the padding");
    let stored = ExtentFile::open(&dense, Format::Zstd, None)
        .unwrap()
        .stored_bytes();
    assert!(
        stored * 3 < whole.len() as u64,
        "the padding takes no room: {stored} bytes stored"
    );
}

#[test]
fn a_torn_frame_is_cut_and_the_frames_before_it_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("torn.zst");
    let log = text_log(3 * FRAME_BYTES / 2, 0);
    let file = ExtentFile::create(&path, Format::Zstd).unwrap();
    file.append(&log[..FRAME_BYTES]).unwrap();
    file.append(&log[FRAME_BYTES..]).unwrap();
    file.sync().unwrap();
    let size = file.stored_bytes();
    drop(file);
    // A crash tore the last frame: half of it reached the disk.
    let bytes = std::fs::read(&path).unwrap();
    let first_frame = zstd::zstd_safe::find_frame_compressed_size(&bytes).unwrap() as u64;
    let torn = first_frame + (size - first_frame) / 2;
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(torn)
        .unwrap();
    let reopened = ExtentFile::open(&path, Format::Zstd, None).unwrap();
    assert_eq!(
        reopened.len(),
        FRAME_BYTES as u64,
        "the whole frame is kept"
    );
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        first_frame,
        "the torn one cut"
    );
    reopened.append(&log[FRAME_BYTES..]).unwrap();
    reopened.sync().unwrap();
    assert_eq!(zstd_d(&path), log);
}

#[test]
fn a_tail_reads_back_what_it_holds_in_memory_and_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let log = text_log(FRAME_BYTES + 50_000, 0);
    for format in [Format::Plain, Format::Zstd] {
        let file = ExtentFile::create(&dir.path().join(format.as_str()), format).unwrap();
        file.append(&log).unwrap();
        assert_eq!(file.len(), log.len() as u64);
        let across = FRAME_BYTES as u64 - 100;
        assert_eq!(
            file.read_at(across, 1000).unwrap(),
            &log[across as usize..][..1000],
            "{format:?}: across the last frame and the bytes after it"
        );
        assert_eq!(
            file.read_at(log.len() as u64 - 10, 100).unwrap(),
            &log[log.len() - 10..]
        );
        assert_eq!(file.read_at(log.len() as u64, 10).unwrap(), b"");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn any_range_reads_back(
        sizes in prop::collection::vec(1usize..(FRAME_BYTES + 5000), 1..6),
        reads in prop::collection::vec((0u64..1_500_000, 0usize..300_000), 8),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let file = ExtentFile::create(&dir.path().join("s.zst"), Format::Zstd).unwrap();
        let total: usize = sizes.iter().sum();
        let log = text_log(total, 0);
        let mut at = 0;
        for size in sizes {
            file.append(&log[at..at + size]).unwrap();
            if size % 3 == 0 {
                file.sync().unwrap();
            }
            at += size;
        }
        for (offset, len) in reads {
            let offset = offset % (total as u64 + 1);
            let end = (offset as usize + len).min(total);
            prop_assert_eq!(file.read_at(offset, len).unwrap(), &log[offset as usize..end]);
        }
    }
}
