//! NBD over TLS: the `NBD_OPT_STARTTLS` upgrade, as qemu-nbd, nbdkit and
//! libnbd do it (X.509 certificates; see [`dmm_tls`] for the directory
//! they come from).
//!
//! A server either does not offer TLS, offers it (plaintext clients are
//! served too: nbdkit's `--tls=on`), or requires it (`--tls=require`, the
//! protocol's FORCEDTLS: a plaintext client gets `NBD_REP_ERR_TLS_REQD`
//! and never an export). A client that asked for TLS (`nbds://`) never
//! falls back to plaintext: a server that does not acknowledge STARTTLS is
//! an error, which is the protocol's protection against downgrades.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// Whether a server offers or requires TLS (the values of nbdkit's and
/// dmm's `--tls`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsMode {
    #[default]
    Off,
    On,
    Require,
}

impl FromStr for TlsMode {
    type Err = String;

    fn from_str(text: &str) -> Result<TlsMode, String> {
        match text {
            "off" => Ok(TlsMode::Off),
            "on" => Ok(TlsMode::On),
            "require" => Ok(TlsMode::Require),
            _ => Err(format!("{text:?} is not a TLS mode (off, on, require)")),
        }
    }
}

impl fmt::Display for TlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsMode::Off => "off",
            TlsMode::On => "on",
            TlsMode::Require => "require",
        })
    }
}

/// A server's TLS: its rustls configuration (identity, client checks) and
/// whether clients must use it.
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub config: Arc<rustls::ServerConfig>,
    pub required: bool,
}

impl ServerTls {
    /// TLS as `mode` says, with `config` (`None` for [`TlsMode::Off`]).
    pub fn new(mode: TlsMode, config: Arc<rustls::ServerConfig>) -> Option<ServerTls> {
        match mode {
            TlsMode::Off => None,
            TlsMode::On | TlsMode::Require => Some(ServerTls {
                config,
                required: mode == TlsMode::Require,
            }),
        }
    }
}
