//! A block store backed by a remote NBD export.
//!
//! qemu-nbd, nbdkit, another dmm, or any NBD server can then be a
//! migration's source or destination. Requests larger than the server's
//! maximum block size are split; commands the server does not offer are
//! emulated where the store contract allows (zeroing by writing zeroes,
//! discard as a no-op) and refused where it does not (fast zero).

mod connection;
mod handshake;
mod link;
mod uri;

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use dmm_store::{
    BlockStore, Capabilities, Error, ErrorKind, Extent, ExtentKind, Op, Result, ZeroMode,
    check_range, check_writable,
};
use futures::future::try_join_all;
use tokio::io::{AsyncRead, AsyncWrite};

use self::connection::{Connection, Failure, Response};
use self::handshake::{ExportInfo, HandshakeError};
pub use self::link::RECONNECT_WITHIN;
use self::link::{Dial, Link, Request};
pub use self::uri::{Endpoint, NbdAddress, TlsTarget, UriError};
use crate::proto::{Command, cmd_flag, errno, transmission_flag as tf};

/// Trims, zeroing and block status go out in pieces of at most this size
/// (their length field is 32 bits).
const MAX_UNPAYLOADED: u64 = 1 << 30;

/// A remote NBD export as a [`BlockStore`]. One connected to an address
/// survives a restart of the server (see [`link`](self::link)).
pub struct NbdStore {
    link: Link,
    info: ExportInfo,
    target: Arc<str>,
}

impl NbdStore {
    /// Connects to the export named by an NBD URI.
    pub async fn connect_uri(uri: &str) -> Result<NbdStore> {
        let address = NbdAddress::parse(uri)
            .map_err(|e| Error::new(ErrorKind::InvalidInput, Op::Connect, uri).with_source(e))?;
        NbdStore::connect(&address).await
    }

    /// Connects to an export and negotiates. The store dials the address
    /// again if the server goes away.
    pub async fn connect(address: &NbdAddress) -> Result<NbdStore> {
        let (connection, info) = dial(address).await?;
        let again = address.clone();
        let redial: Dial = Box::new(move || {
            let address = again.clone();
            Box::pin(async move { dial(&address).await.map_err(|e| format!("{e:?}")) })
        });
        Ok(NbdStore {
            link: Link::new(connection, &info, Some(redial)),
            info,
            target: address.to_string().into(),
        })
    }

    /// How long a request waits for a lost server to come back before it
    /// fails ([`RECONNECT_WITHIN`] by default).
    pub fn reconnecting_within(mut self, window: std::time::Duration) -> NbdStore {
        self.link.set_window(window);
        self
    }

    /// How long a request waits for its reply before the connection is
    /// presumed dead and dialed again (by default, as long as TCP keeps
    /// it: a cut network can take many minutes to notice).
    pub fn replies_within(mut self, limit: std::time::Duration) -> NbdStore {
        self.link.set_reply_within(limit);
        self
    }

    /// Negotiates `export` over an already-connected stream (a store that
    /// cannot dial again: a lost connection fails its requests).
    pub async fn over<S>(stream: S, export: &str, target: String) -> Result<NbdStore>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (connection, info) = negotiate(stream, export, &target, None).await?;
        Ok(NbdStore {
            link: Link::new(connection, &info, None),
            info,
            target: target.into(),
        })
    }

    fn has(&self, flag: u16) -> bool {
        self.info.flags & flag != 0
    }

    fn error(&self, op: Op, offset: u64, len: u64, failure: Failure) -> Error {
        let target = self.target.clone();
        match failure {
            Failure::Server { errno, message } => {
                let err = Error::new(kind_of(errno), op, target).at(offset, len);
                let detail = format!("server error {errno}");
                match message.is_empty() {
                    true => err.with_detail(detail),
                    false => err.with_detail(format!("{detail}: {message}")),
                }
            }
            Failure::Lost(reason) => Error::new(ErrorKind::Disconnected, op, target)
                .at(offset, len)
                .with_detail(reason),
        }
    }

    /// Sends one request whose range the caller has checked.
    async fn send(
        &self,
        op: Op,
        command: Command,
        flags: u16,
        offset: u64,
        length: u64,
        payload: Option<Bytes>,
    ) -> Result<Response> {
        self.check_alignment(op, offset, length)?;
        let request = Request {
            command,
            flags,
            offset,
            length: length as u32,
            payload,
        };
        self.link
            .send(request)
            .await
            .map_err(|failure| self.error(op, offset, length, failure))
    }

    fn check_alignment(&self, op: Op, offset: u64, len: u64) -> Result<()> {
        let align = u64::from(self.info.min_block);
        if align > 1 && (!offset.is_multiple_of(align) || !len.is_multiple_of(align)) {
            return Err(Error::new(ErrorKind::InvalidInput, op, self.target.clone())
                .at(offset, len)
                .with_detail(format!("the export requires {align}-byte alignment")));
        }
        Ok(())
    }

    /// Splits `offset..offset+len` into pieces of at most `piece` bytes.
    fn pieces(offset: u64, len: u64, piece: u64) -> impl Iterator<Item = (u64, u64)> {
        (0..len.div_ceil(piece)).map(move |i| {
            let at = offset + i * piece;
            (at, piece.min(offset + len - at))
        })
    }

    fn max_payload(&self) -> u64 {
        u64::from(self.info.max_block.max(4096))
    }

    async fn write_zero_buffers(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        let piece = self.max_payload().min(1 << 20);
        let zeroes = Bytes::from(vec![0u8; piece.min(len) as usize]);
        for (at, n) in Self::pieces(offset, len, piece) {
            self.write(at, zeroes.slice(..n as usize), fua).await?;
        }
        Ok(())
    }
}

/// Opens a connection to `address` and negotiates its export.
async fn dial(address: &NbdAddress) -> Result<(Connection, ExportInfo)> {
    let target = address.to_string();
    let failed = |e: std::io::Error| Error::io(Op::Connect, target.as_str(), e);
    let tls = address
        .tls
        .as_ref()
        .map(|tls| ClientTls::new(tls, &target))
        .transpose()?;
    match &address.endpoint {
        Endpoint::Unix(path) => {
            let stream = tokio::net::UnixStream::connect(path)
                .await
                .map_err(failed)?;
            negotiate(stream, &address.export, &target, tls).await
        }
        Endpoint::Tcp { host, port } => {
            let stream = tokio::net::TcpStream::connect((host.as_str(), *port))
                .await
                .map_err(failed)?;
            let _ = stream.set_nodelay(true);
            negotiate(stream, &address.export, &target, tls).await
        }
    }
}

/// A TLS client's configuration and the name its server must prove.
struct ClientTls {
    config: std::sync::Arc<rustls::ClientConfig>,
    server: rustls::pki_types::ServerName<'static>,
}

impl ClientTls {
    fn new(tls: &TlsTarget, target: &str) -> Result<ClientTls> {
        let invalid = || Error::new(ErrorKind::InvalidInput, Op::Connect, target);
        let certificates = dmm_tls::CertificateDir::new(&tls.certificates);
        let config = dmm_tls::client_config(&certificates).map_err(|e| invalid().with_source(e))?;
        let server = rustls::pki_types::ServerName::try_from(tls.hostname.clone())
            .map_err(|_| invalid().with_detail(format!("{:?} is not a host name", tls.hostname)))?;
        Ok(ClientTls { config, server })
    }
}

/// Negotiates `export` over `stream` (through TLS when `tls` is given)
/// and starts the connection.
async fn negotiate<S>(
    mut stream: S,
    export: &str,
    target: &str,
    tls: Option<ClientTls>,
) -> Result<(Connection, ExportInfo)>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let failed = |e| handshake_error(target, e);
    let greeting = handshake::greet(&mut stream).await.map_err(failed)?;
    let Some(tls) = tls else {
        let info = handshake::negotiate(&mut stream, export, greeting)
            .await
            .map_err(failed)?;
        return Ok((Connection::start(stream, &info), info));
    };
    handshake::start_tls(&mut stream, greeting)
        .await
        .map_err(failed)?;
    let connector = tokio_rustls::TlsConnector::from(tls.config);
    let mut secure = connector.connect(tls.server, stream).await.map_err(|e| {
        Error::new(ErrorKind::PermissionDenied, Op::Connect, target)
            .with_detail(format!("TLS handshake failed: {e}"))
    })?;
    let info = handshake::negotiate(&mut secure, export, greeting)
        .await
        .map_err(failed)?;
    Ok((Connection::start(secure, &info), info))
}

fn handshake_error(target: &str, err: HandshakeError) -> Error {
    match err {
        HandshakeError::Io(e) => Error::io(Op::Connect, target, e),
        HandshakeError::Protocol(e) => {
            Error::new(ErrorKind::Protocol, Op::Connect, target).with_source(e)
        }
        HandshakeError::Refused(message) => {
            Error::new(ErrorKind::NotFound, Op::Connect, target).with_detail(message)
        }
    }
}

/// The store error kind for an NBD error value.
fn kind_of(value: u32) -> ErrorKind {
    match value {
        errno::EPERM => ErrorKind::PermissionDenied,
        errno::EINVAL | errno::EOVERFLOW => ErrorKind::InvalidInput,
        errno::ENOSPC => ErrorKind::NoSpace,
        errno::ENOTSUP => ErrorKind::Unsupported,
        errno::ESHUTDOWN => ErrorKind::Shutdown,
        _ => ErrorKind::Io,
    }
}

/// The extents that start before `end`, the last one cut at `end`.
fn clip(mut extents: Vec<Extent>, end: u64) -> Vec<Extent> {
    extents.retain(|e| e.offset < end);
    for extent in &mut extents {
        extent.len = extent.len.min(end - extent.offset);
    }
    extents
}

fn fua_flag(fua: bool) -> u16 {
    if fua { cmd_flag::FUA } else { 0 }
}

#[async_trait]
impl BlockStore for NbdStore {
    fn target(&self) -> &str {
        &self.target
    }

    fn size(&self) -> u64 {
        self.info.size
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: self.has(tf::READ_ONLY),
            preferred_block_size: self.info.preferred_block,
            rotational: self.has(tf::ROTATIONAL),
            discard: self.has(tf::SEND_TRIM),
            fast_zero: self.has(tf::SEND_WRITE_ZEROES) && self.has(tf::SEND_FAST_ZERO),
            // Every request of this store goes over one connection, so a
            // flush covers all of them.
            flush_covers_all_handles: true,
        }
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        check_range(self, Op::Read, offset, len as u64)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let pieces =
            Self::pieces(offset, len as u64, self.max_payload()).map(|(at, n)| async move {
                match self.send(Op::Read, Command::Read, 0, at, n, None).await? {
                    Response::Data(data) => Ok(data),
                    _ => unreachable!("a read answers with data"),
                }
            });
        let mut parts = try_join_all(pieces).await?;
        if parts.len() == 1 {
            return Ok(parts.pop().expect("one part"));
        }
        Ok(parts.concat())
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        let len = data.len() as u64;
        check_writable(self, Op::Write, offset, len)?;
        let native_fua = fua && self.has(tf::SEND_FUA);
        let pieces = Self::pieces(offset, len, self.max_payload()).map(|(at, n)| {
            let part = data.slice((at - offset) as usize..(at - offset + n) as usize);
            self.send(
                Op::Write,
                Command::Write,
                fua_flag(native_fua),
                at,
                n,
                Some(part),
            )
        });
        try_join_all(pieces).await?;
        if fua && !native_fua {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        if !self.has(tf::SEND_FLUSH) {
            return Ok(());
        }
        self.send(Op::Flush, Command::Flush, 0, 0, 0, None)
            .await
            .map(|_| ())
    }

    async fn discard(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        check_writable(self, Op::Discard, offset, len)?;
        if !self.has(tf::SEND_TRIM) {
            return Ok(());
        }
        let flags = fua_flag(fua && self.has(tf::SEND_FUA));
        for (at, n) in Self::pieces(offset, len, MAX_UNPAYLOADED) {
            self.send(Op::Discard, Command::Trim, flags, at, n, None)
                .await?;
        }
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode, fua: bool) -> Result<()> {
        check_writable(self, Op::WriteZeroes, offset, len)?;
        let fast = self.capabilities().fast_zero;
        if mode.fast_only && !fast {
            return Err(
                Error::new(ErrorKind::Unsupported, Op::WriteZeroes, self.target.clone())
                    .at(offset, len)
                    .with_detail("the server cannot zero quickly"),
            );
        }
        if !self.has(tf::SEND_WRITE_ZEROES) {
            return self.write_zero_buffers(offset, len, fua).await;
        }
        let mut flags = fua_flag(fua && self.has(tf::SEND_FUA));
        if !mode.may_punch {
            flags |= cmd_flag::NO_HOLE;
        }
        if mode.fast_only {
            flags |= cmd_flag::FAST_ZERO;
        }
        for (at, n) in Self::pieces(offset, len, MAX_UNPAYLOADED) {
            self.send(Op::WriteZeroes, Command::WriteZeroes, flags, at, n, None)
                .await?;
        }
        Ok(())
    }

    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(self, Op::Extents, offset, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        if self.info.allocation.is_none() {
            return Ok(vec![Extent::new(offset, len, ExtentKind::Data)]);
        }
        let len = len.min(MAX_UNPAYLOADED);
        match self
            .send(Op::Extents, Command::BlockStatus, 0, offset, len, None)
            .await?
        {
            // A server may describe past the range (nbdkit does, to the
            // end of the extent): callers must not learn beyond it.
            Response::Extents(extents) if !extents.is_empty() => Ok(clip(extents, offset + len)),
            // A server that sent no usable descriptor: say "data" (always
            // safe) for the whole range.
            _ => Ok(vec![Extent::new(offset, len, ExtentKind::Data)]),
        }
    }

    async fn cache(&self, offset: u64, len: u64) -> Result<()> {
        check_range(self, Op::Cache, offset, len)?;
        if !self.has(tf::SEND_CACHE) {
            return Ok(());
        }
        for (at, n) in Self::pieces(offset, len, MAX_UNPAYLOADED) {
            self.send(Op::Cache, Command::Cache, 0, at, n, None).await?;
        }
        Ok(())
    }
}
