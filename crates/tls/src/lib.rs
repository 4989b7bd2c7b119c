//! dmm's certificates.
//!
//! Every TLS endpoint of dmm (the NBD server and client, the daemon's API,
//! the daemons talking to each other) reads its identity and its trust
//! from one directory laid out as QEMU's `tls-creds-x509` and libnbd's
//! `tls-certificates` expect ([`CertificateDir`]), so that admins reuse the
//! certificates they have, and dmm's own ([`pki`]) work with QEMU's and
//! libnbd's tools. [`config`] builds rustls configurations from it: TLS
//! 1.3 (1.2 accepted), servers that verify their clients' certificates
//! against the directory's CA and, if asked, an allow-list of names.

mod config;
mod dir;
mod error;
pub mod pki;

pub use config::{PeerCheck, client_config, peer_names, server_config};
pub use dir::{CA_CERT, CLIENT_CERT, CLIENT_KEY, CertificateDir, SERVER_CERT, SERVER_KEY};
pub use error::{Error, Result};
