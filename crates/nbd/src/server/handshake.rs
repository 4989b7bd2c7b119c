//! The server side of the fixed newstyle handshake.
//!
//! Reads options one at a time, answers each, and ends with the export the
//! client chose (by `NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME`) and what was
//! negotiated on the way: structured replies and the `base:allocation`
//! metadata context. Anything malformed gets `NBD_REP_ERR_INVALID`; only a
//! broken framing (bad magic, absurd length) or an export-name option that
//! cannot be answered ends the connection.
//!
//! TLS (`NBD_OPT_STARTTLS`): on a server that offers it, the option is
//! acknowledged and the handshake ends with [`Ending::StartTls`]; the
//! caller runs the TLS handshake and calls [`options`] again over the
//! encrypted stream, with the options negotiated before forgotten (the
//! protocol requires it). A server that requires TLS answers every option
//! but `STARTTLS` and `ABORT` before it with `NBD_REP_ERR_TLS_REQD` (and
//! hangs up on `EXPORT_NAME`, which cannot be refused), so a plaintext
//! client never learns an export, let alone reads one.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::ConnectionError;
use super::exports::{Export, ExportTable};
use crate::proto::{
    ClientOption, InfoRequest, MetaQuery, ProtocolError, allocation, encode_option_reply,
    handshake_flag, info, magic, parse_option, rep, transmission_flag as tf,
};

/// Option data larger than this ends the connection.
const MAX_OPTION_DATA: u32 = 64 * 1024;
/// A client that sends more options than this is not negotiating.
const MAX_OPTIONS: usize = 128;
/// Id of `base:allocation` when selected.
pub(crate) const ALLOCATION_CONTEXT_ID: u32 = 1;

/// What the handshake agreed on.
pub(crate) struct Session {
    pub export: Arc<Export>,
    pub structured: bool,
    /// Context id of `base:allocation`, if the client selected it.
    pub allocation: Option<u32>,
    pub flags: u16,
    /// Largest request payload the client may send or ask for.
    pub max_payload: u32,
}

/// Where TLS stands for a connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TlsState {
    /// The server offers TLS.
    pub offered: bool,
    /// No option but STARTTLS or ABORT is answered before TLS.
    pub required: bool,
    /// The stream is encrypted already.
    pub active: bool,
}

/// How a handshake ended.
pub(crate) enum Ending {
    Session(Session),
    /// The client aborted.
    Aborted,
    /// STARTTLS was acknowledged: the TLS handshake comes next.
    StartTls,
}

/// Negotiation state between options.
struct Negotiation<'a, S> {
    stream: &'a mut S,
    exports: &'a ExportTable,
    max_payload: u32,
    no_zeroes: bool,
    structured: bool,
    /// Export name for which `base:allocation` was selected.
    allocation_for: Option<String>,
    tls: TlsState,
    /// The names the client's TLS certificate is valid for (none in clear).
    client: &'a [String],
    /// Exports the table's route made during this handshake, by name, so
    /// that each name finds the same one.
    routed: std::collections::HashMap<String, Arc<Export>>,
}

/// Sends the greeting and reads the client's flags; whether the client
/// asked for no zeroes after `NBD_OPT_EXPORT_NAME`'s reply.
pub(crate) async fn greet<S>(stream: &mut S) -> Result<bool, ConnectionError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&magic::INIT.to_be_bytes());
    greeting.extend_from_slice(&magic::OPTS.to_be_bytes());
    let flags = handshake_flag::FIXED_NEWSTYLE | handshake_flag::NO_ZEROES;
    greeting.extend_from_slice(&flags.to_be_bytes());
    stream.write_all(&greeting).await?;
    stream.flush().await?;

    let client_flags = stream.read_u32().await?;
    let known = handshake_flag::C_FIXED_NEWSTYLE | handshake_flag::C_NO_ZEROES;
    if client_flags & !known != 0 {
        return Err(ProtocolError::Unexpected(format!("client flags {client_flags:#x}")).into());
    }
    Ok(client_flags & handshake_flag::C_NO_ZEROES != 0)
}

/// Answers options until the handshake ends.
pub(crate) async fn options<S>(
    stream: &mut S,
    exports: &ExportTable,
    max_payload: u32,
    no_zeroes: bool,
    tls: TlsState,
    client: &[String],
) -> Result<Ending, ConnectionError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut negotiation = Negotiation {
        stream,
        exports,
        max_payload,
        no_zeroes,
        structured: false,
        allocation_for: None,
        tls,
        client,
        routed: std::collections::HashMap::new(),
    };
    for _ in 0..MAX_OPTIONS {
        if let Some(ending) = negotiation.next_option().await? {
            return Ok(ending);
        }
    }
    Err(ProtocolError::Unexpected(format!("more than {MAX_OPTIONS} options")).into())
}

/// How the handshake ends after an option, if it does.
type Outcome = Option<Ending>;

impl<S: AsyncRead + AsyncWrite + Unpin> Negotiation<'_, S> {
    async fn next_option(&mut self) -> Result<Outcome, ConnectionError> {
        let mut header = [0u8; 16];
        self.stream.read_exact(&mut header).await?;
        let found = u64::from_be_bytes(header[..8].try_into().expect("8 bytes"));
        if found != magic::OPTS {
            let expected = magic::OPTS;
            return Err(ProtocolError::BadMagic { expected, found }.into());
        }
        let code = u32::from_be_bytes(header[8..12].try_into().expect("4 bytes"));
        let len = u32::from_be_bytes(header[12..16].try_into().expect("4 bytes"));
        if len > MAX_OPTION_DATA {
            let (what, limit) = ("option data", MAX_OPTION_DATA.into());
            return Err(ProtocolError::TooLarge {
                what,
                len: len.into(),
                limit,
            }
            .into());
        }
        let mut data = vec![0u8; len as usize];
        self.stream.read_exact(&mut data).await?;
        match parse_option(code, &data) {
            Ok(option) => self.answer(option).await,
            Err(_) if code == crate::proto::opt::EXPORT_NAME => {
                Err(ProtocolError::Malformed("export name").into())
            }
            Err(invalid) => {
                self.reply(code, rep::ERR_INVALID, invalid.0.as_bytes())
                    .await?;
                Ok(None)
            }
        }
    }

    async fn answer(&mut self, option: ClientOption) -> Result<Outcome, ConnectionError> {
        let code = option.code();
        if self.tls.required && !self.tls.active {
            match option {
                ClientOption::StartTls | ClientOption::Abort => {}
                ClientOption::ExportName(_) => {
                    let message = "NBD_OPT_EXPORT_NAME in clear on a server that requires TLS";
                    return Err(ProtocolError::Unexpected(message.into()).into());
                }
                _ => {
                    let message = b"TLS is required: negotiate NBD_OPT_STARTTLS first";
                    self.reply(code, rep::ERR_TLS_REQD, message).await?;
                    return Ok(None);
                }
            }
        }
        match option {
            ClientOption::ExportName(name) => {
                return Ok(Some(Ending::Session(self.export_name(&name).await?)));
            }
            ClientOption::Go(request) => return self.go(code, &request).await,
            ClientOption::Abort => {
                // The client may already be gone; the ack is a courtesy.
                let _ = self.reply(code, rep::ACK, &[]).await;
                return Ok(Some(Ending::Aborted));
            }
            ClientOption::List => self.list(code).await?,
            ClientOption::StartTls => return self.start_tls(code).await,
            ClientOption::Info(request) => {
                self.info(code, &request).await?;
            }
            ClientOption::StructuredReply => {
                self.structured = true;
                self.reply(code, rep::ACK, &[]).await?
            }
            ClientOption::ListMetaContext(query) => self.meta_context(code, &query, false).await?,
            ClientOption::SetMetaContext(query) => self.meta_context(code, &query, true).await?,
            ClientOption::ExtendedHeaders | ClientOption::Unknown(_) => {
                let message = format!("option {code} is not supported");
                self.reply(code, rep::ERR_UNSUP, message.as_bytes()).await?
            }
        }
        Ok(None)
    }

    /// The export `name`, if this client may see it.
    async fn find(&mut self, name: &str) -> Option<Arc<Export>> {
        if let Some(routed) = self.routed.get(name) {
            return Some(routed.clone());
        }
        let export = self.exports.find_for(name, self.client).await?;
        if self.exports.find(name).is_none() {
            self.routed.insert(name.to_owned(), export.clone());
        }
        Some(export)
    }

    async fn start_tls(&mut self, code: u32) -> Result<Outcome, ConnectionError> {
        let (reply, message): (u32, &[u8]) = match self.tls {
            TlsState { offered: false, .. } => {
                (rep::ERR_POLICY, b"TLS is not configured on this server")
            }
            TlsState { active: true, .. } => (rep::ERR_INVALID, b"TLS is already negotiated"),
            _ => {
                self.reply(code, rep::ACK, &[]).await?;
                return Ok(Some(Ending::StartTls));
            }
        };
        self.reply(code, reply, message).await?;
        Ok(None)
    }

    async fn reply(&mut self, option: u32, reply: u32, payload: &[u8]) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(20 + payload.len());
        encode_option_reply(&mut buf, option, reply, payload);
        self.stream.write_all(&buf).await?;
        self.stream.flush().await
    }

    async fn unknown_export(&mut self, option: u32, name: &str) -> std::io::Result<()> {
        let message = format!("no export named {name:?}");
        self.reply(option, rep::ERR_UNKNOWN, message.as_bytes())
            .await
    }

    async fn list(&mut self, code: u32) -> std::io::Result<()> {
        for export in self
            .exports
            .list()
            .into_iter()
            .filter(|e| e.admits(self.client))
        {
            let mut payload = Vec::new();
            payload.extend_from_slice(&(export.name.len() as u32).to_be_bytes());
            payload.extend_from_slice(export.name.as_bytes());
            payload.extend_from_slice(export.description.as_bytes());
            self.reply(code, rep::SERVER, &payload).await?;
        }
        self.reply(code, rep::ACK, &[]).await
    }

    /// Answers `NBD_OPT_INFO`/`NBD_OPT_GO`; the export if it was found.
    async fn info(
        &mut self,
        code: u32,
        request: &InfoRequest,
    ) -> std::io::Result<Option<Arc<Export>>> {
        let Some(export) = self.find(&request.name).await else {
            self.unknown_export(code, &request.name).await?;
            return Ok(None);
        };
        let flags = transmission_flags(&export, self.structured);
        let mut payload = info::EXPORT.to_be_bytes().to_vec();
        payload.extend_from_slice(&export.store.size().to_be_bytes());
        payload.extend_from_slice(&flags.to_be_bytes());
        self.reply(code, rep::INFO, &payload).await?;
        for &kind in &request.requests {
            if let Some(payload) = self.info_payload(kind, &export) {
                self.reply(code, rep::INFO, &payload).await?;
            }
        }
        self.reply(code, rep::ACK, &[]).await?;
        Ok(Some(export))
    }

    fn info_payload(&self, kind: u16, export: &Export) -> Option<Vec<u8>> {
        let mut payload = kind.to_be_bytes().to_vec();
        match kind {
            info::NAME => payload.extend_from_slice(export.name.as_bytes()),
            info::DESCRIPTION if !export.description.is_empty() => {
                payload.extend_from_slice(export.description.as_bytes())
            }
            info::BLOCK_SIZE => {
                let preferred = export.store.capabilities().preferred_block_size;
                let preferred = preferred.clamp(512, self.max_payload).next_power_of_two();
                for size in [1, preferred, self.max_payload] {
                    payload.extend_from_slice(&size.to_be_bytes());
                }
            }
            _ => return None,
        }
        Some(payload)
    }

    async fn go(&mut self, code: u32, request: &InfoRequest) -> Result<Outcome, ConnectionError> {
        let Some(export) = self.info(code, request).await? else {
            return Ok(None);
        };
        Ok(Some(Ending::Session(self.session(export).await)))
    }

    async fn export_name(&mut self, name: &str) -> Result<Session, ConnectionError> {
        let Some(export) = self.find(name).await else {
            // The option cannot be refused: the only answer is to hang up.
            return Err(ProtocolError::Unexpected(format!("unknown export {name:?}")).into());
        };
        let session = self.session(export).await;
        let mut buf = Vec::with_capacity(134);
        buf.extend_from_slice(&session.export.store.size().to_be_bytes());
        buf.extend_from_slice(&session.flags.to_be_bytes());
        if !self.no_zeroes {
            buf.extend_from_slice(&[0u8; 124]);
        }
        self.stream.write_all(&buf).await?;
        self.stream.flush().await?;
        Ok(session)
    }

    async fn session(&mut self, export: Arc<Export>) -> Session {
        let chosen = match self.allocation_for.clone() {
            Some(name) => self.find(&name).await,
            None => None,
        };
        let selected = chosen.is_some_and(|chosen| Arc::ptr_eq(&chosen, &export));
        Session {
            flags: transmission_flags(&export, self.structured),
            structured: self.structured,
            allocation: (self.structured && selected).then_some(ALLOCATION_CONTEXT_ID),
            export,
            max_payload: self.max_payload,
        }
    }

    async fn meta_context(
        &mut self,
        code: u32,
        query: &MetaQuery,
        set: bool,
    ) -> std::io::Result<()> {
        if !self.structured {
            let message = b"structured replies must be negotiated first";
            return self.reply(code, rep::ERR_INVALID, message).await;
        }
        if self.find(&query.export).await.is_none() {
            return self.unknown_export(code, &query.export).await;
        }
        let matches = |q: &str| q == allocation::CONTEXT || (!set && q == allocation::NAMESPACE);
        let selected = if set {
            query.queries.iter().any(|q| matches(q))
        } else {
            query.queries.is_empty() || query.queries.iter().any(|q| matches(q))
        };
        if set {
            self.allocation_for = selected.then(|| query.export.clone());
        }
        if selected {
            let id = if set { ALLOCATION_CONTEXT_ID } else { 0 };
            let mut payload = id.to_be_bytes().to_vec();
            payload.extend_from_slice(allocation::CONTEXT.as_bytes());
            self.reply(code, rep::META_CONTEXT, &payload).await?;
        }
        self.reply(code, rep::ACK, &[]).await
    }
}

/// The transmission flags of an export for a client.
pub(crate) fn transmission_flags(export: &Export, structured: bool) -> u16 {
    let caps = export.store.capabilities();
    let mut flags = tf::HAS_FLAGS | tf::SEND_FLUSH | tf::SEND_FUA | tf::SEND_CACHE;
    if export.is_read_only() {
        flags |= tf::READ_ONLY;
    } else {
        flags |= tf::SEND_TRIM | tf::SEND_WRITE_ZEROES;
        if caps.fast_zero {
            flags |= tf::SEND_FAST_ZERO;
        }
    }
    if caps.rotational {
        flags |= tf::ROTATIONAL;
    }
    if caps.flush_covers_all_handles {
        flags |= tf::CAN_MULTI_CONN;
    }
    if structured {
        flags |= tf::SEND_DF;
    }
    flags
}
