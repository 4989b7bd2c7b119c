//! The body of `POST /api/migrations`, as any client of the daemon's API
//! (on its Unix socket, or on TCP once it has the token) may send it.
//!
//! No body may crash the checks the daemon runs before it opens anything,
//! or make them hang; a refusal is a reason, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = dmm_daemon::check_create_body(data);
});
