//! The dmm NBD server's transmission phase: requests after a valid
//! handshake.
//!
//! `server_session` has to discover the option framing, magic numbers and
//! export name before it reaches a single request, so it rarely gets deep
//! into the request decoder and the command handlers. This target writes a
//! valid handshake itself and hands the fuzzer the transmission bytes. The
//! first input byte chooses the handshake (see
//! `dmm_fuzz::Handshake::from_byte`: bit 0 structured replies, bit 1
//! `base:allocation`, bit 2 `NBD_OPT_EXPORT_NAME` instead of `NBD_OPT_GO`);
//! the rest is sent as raw requests. Bits 3 to 7 choose whether the input
//! goes out at once or in pieces (`dmm_fuzz::fragment`): at once, the whole
//! input is already in the pipe when the server starts reading, so it never
//! waits for the rest of a request or payload.
#![no_main]

use dmm_fuzz::Handshake;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&choice, requests)) = data.split_first() else {
        return;
    };
    let mut input = Vec::with_capacity(128 + requests.len());
    Handshake::from_byte(choice).encode(&mut input);
    input.extend_from_slice(requests);
    let fragment = dmm_fuzz::fragment(choice);
    dmm_fuzz::serve_fragmented("server_transmission", &input, fragment);
});
