//! `name=value` properties, one per line, as `dmm create -p` and `dmm set
//! -p` pass them (and the API's bodies carry them): every value parser
//! (sizes, rates, strategies, priorities, paths, schedules…) and the checks
//! of a new migration's set. Any text gets a reason, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = dmm_daemon::check_property_lines(text);
    }
});
