//! The NBD protocol for dmm.
//!
//! dmm fronts every volume it migrates as an NBD export, so that QEMU,
//! qemu-img, libnbd's tools, fio and the kernel's nbd-client use it
//! unchanged; and it reads and writes remote NBD exports as sources and
//! destinations. No Rust crate covers the protocol well, so it is written
//! here: [`proto`] is the wire format (pure, fuzzed), [`server`] serves
//! [`dmm_store::BlockStore`]s, and [`client`] is a store backed by a
//! remote export; both speak TLS ([`tls`](crate::TlsMode)).

mod client;
mod open;
pub mod proto;
mod server;
mod tls;
mod writer;

pub use client::{Endpoint, NbdAddress, NbdStore, RECONNECT_WITHIN, TlsTarget, UriError};
pub use open::{Access, OpenedStore, open_store};
pub use server::{Export, ExportExists, ExportTable, Route, Server, ServerConfig, bind_unix};
pub use tls::{ServerTls, TlsMode};
