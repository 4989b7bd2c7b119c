//! Everything a client sends to a dmm NBD server that requires TLS, from
//! the first byte of the handshake on: options in clear (each refused with
//! `NBD_REP_ERR_TLS_REQD`, `NBD_OPT_EXPORT_NAME` hung up on), `STARTTLS`,
//! and whatever follows it as a TLS handshake.
//!
//! No input may crash or hang the server, or get an export (or any of its
//! data) out of it without TLS.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let output = dmm_fuzz::serve_tls_input("server_tls_session", data);
    dmm_fuzz::assert_no_export_in_clear(&output);
});
