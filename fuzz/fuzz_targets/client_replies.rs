//! Everything an NBD server sends to the dmm client (`dmm_nbd::NbdStore`).
//!
//! dmm reads from and writes to remote exports it does not control (a
//! migration source may be any NBD server), so a broken or hostile server
//! must only ever produce errors: no panic, no hang, no allocation sized by
//! what the server claims. The input is the server's side of the
//! connection: greeting, option replies, then transmission replies. If the
//! handshake succeeds, the client reads 0..4096, asks for extents, writes
//! 512 bytes and flushes, all at once (cookies 1, 2, 3, 4 in that order;
//! without `base:allocation` no block status is sent: 1, 2, 3).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    dmm_fuzz::client_input(data);
});
