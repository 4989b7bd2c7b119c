//! Everything a client sends to the dmm NBD server, from the first byte of
//! the handshake on.
//!
//! The server faces untrusted clients (any process that can reach its
//! socket), so no byte sequence may crash it, make it hang, or make it hold
//! memory the input did not pay for. The input is written to an in-memory
//! connection whose write side is then shut; the server must answer and hang
//! up within the run limit (see `dmm_fuzz::run`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    dmm_fuzz::serve_input("server_session", data);
});
