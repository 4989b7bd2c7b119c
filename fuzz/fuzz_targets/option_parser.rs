//! The handshake option parser, `dmm_nbd::proto::parse_option`, on its own.
//!
//! It is the first code to see a client's option data, so it must refuse
//! anything malformed without panicking or allocating by the lengths and
//! counts the data claims. It also has to agree with
//! `ClientOption::encode`, which the dmm client sends: every option it
//! accepts must encode back to bytes that parse to the same option.
//! Input: option code (4 bytes, big-endian), then the option data.
#![no_main]

use dmm_nbd::proto::{ClientOption, parse_option};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((code, body)) = data.split_first_chunk::<4>() else {
        return;
    };
    let code = u32::from_be_bytes(*code);
    let Ok(option) = parse_option(code, body) else {
        return;
    };
    if matches!(option, ClientOption::Unknown(_)) {
        assert_eq!(option.code(), code, "unknown option keeps its code");
        return;
    }
    let mut wire = Vec::new();
    option.encode(&mut wire);
    assert!(wire.len() >= 16, "option shorter than its header");
    let magic = u64::from_be_bytes(wire[..8].try_into().unwrap());
    assert_eq!(magic, dmm_nbd::proto::magic::OPTS, "option magic");
    let wire_code = u32::from_be_bytes(wire[8..12].try_into().unwrap());
    let len = u32::from_be_bytes(wire[12..16].try_into().unwrap()) as usize;
    assert_eq!(wire_code, code, "encoded option code");
    assert_eq!(len, wire.len() - 16, "encoded option length");
    let again = parse_option(wire_code, &wire[16..]);
    assert_eq!(again.as_ref(), Ok(&option), "option does not round-trip");
});
