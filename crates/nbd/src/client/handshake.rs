//! The client side of the fixed newstyle handshake.
//!
//! Asks for structured replies and `base:allocation` (both optional: a
//! server that refuses them still works, with simple replies and no
//! allocation map), then enters transmission with `NBD_OPT_GO`, or with
//! `NBD_OPT_EXPORT_NAME` on servers that do not know `GO`. Over TLS,
//! `NBD_OPT_STARTTLS` comes first ([`start_tls`]) and the rest runs over
//! the encrypted stream.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::proto::{
    ClientOption, InfoRequest, MetaQuery, OptionReplyHeader, ProtocolError, allocation, be_u16,
    be_u32, be_u64, handshake_flag, info, magic, rep,
};

/// Largest option reply payload accepted.
const MAX_REPLY: u32 = 64 * 1024;

/// What the server told us about the export.
#[derive(Debug, Clone)]
pub(crate) struct ExportInfo {
    pub size: u64,
    pub flags: u16,
    pub structured: bool,
    pub allocation: Option<u32>,
    pub min_block: u32,
    pub preferred_block: u32,
    pub max_block: u32,
}

/// Why the handshake failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("server refused: {0}")]
    Refused(String),
}

/// What the server's greeting said.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Greeting {
    /// Fixed newstyle: options may be refused and retried (TLS needs it).
    fixed: bool,
    no_zeroes: bool,
}

/// Reads the server's greeting and answers with the client's flags.
pub(crate) async fn greet<S>(stream: &mut S) -> Result<Greeting, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut greeting = [0u8; 18];
    stream.read_exact(&mut greeting).await?;
    let init = be_u64(&greeting, 0).unwrap_or_default();
    let second = be_u64(&greeting, 8).unwrap_or_default();
    if init != magic::INIT || second != magic::OPTS {
        return Err(HandshakeError::Refused(
            "not a newstyle NBD server (oldstyle servers are not supported)".into(),
        ));
    }
    let server_flags = be_u16(&greeting, 16).unwrap_or_default();
    let fixed = server_flags & handshake_flag::FIXED_NEWSTYLE != 0;
    let no_zeroes = server_flags & handshake_flag::NO_ZEROES != 0;
    let mut client_flags = 0;
    if fixed {
        client_flags |= handshake_flag::C_FIXED_NEWSTYLE;
    }
    if no_zeroes {
        client_flags |= handshake_flag::C_NO_ZEROES;
    }
    stream.write_u32(client_flags).await?;
    Ok(Greeting { fixed, no_zeroes })
}

/// Asks for TLS (`NBD_OPT_STARTTLS`); the TLS handshake comes next. A
/// server that does not acknowledge it is refused: never a fallback to
/// plaintext.
pub(crate) async fn start_tls<S>(stream: &mut S, greeting: Greeting) -> Result<(), HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if !greeting.fixed {
        return Err(HandshakeError::Refused(
            "the server cannot negotiate TLS (not fixed newstyle)".into(),
        ));
    }
    let mut options = Options { stream };
    let option = ClientOption::StartTls;
    options.send(&option).await?;
    match options.reply(option.code()).await? {
        (rep::ACK, _) => Ok(()),
        (_, message) => Err(HandshakeError::Refused(format!(
            "the server does not offer TLS: {}",
            String::from_utf8_lossy(&message)
        ))),
    }
}

/// Negotiates `export` (after the greeting, and after TLS if asked for).
pub(crate) async fn negotiate<S>(
    stream: &mut S,
    export: &str,
    greeting: Greeting,
) -> Result<ExportInfo, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if !greeting.fixed {
        return export_name(stream, export, greeting.no_zeroes, false).await;
    }
    let mut options = Options { stream };
    let structured = options.structured_replies().await?;
    let allocation = if structured {
        options.allocation_context(export).await?
    } else {
        None
    };
    match options.go(export).await? {
        Some(mut info) => {
            info.structured = structured;
            info.allocation = allocation;
            Ok(info)
        }
        None => export_name(options.stream, export, greeting.no_zeroes, structured).await,
    }
}

/// Enters transmission with `NBD_OPT_EXPORT_NAME` (no meta contexts then).
async fn export_name<S>(
    stream: &mut S,
    export: &str,
    no_zeroes: bool,
    structured: bool,
) -> Result<ExportInfo, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = Vec::new();
    ClientOption::ExportName(export.to_owned()).encode(&mut buf);
    stream.write_all(&buf).await?;
    let mut reply = vec![0u8; if no_zeroes { 10 } else { 134 }];
    stream.read_exact(&mut reply).await.map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            HandshakeError::Refused(format!("server hung up: no export named {export:?}?"))
        } else {
            e.into()
        }
    })?;
    Ok(ExportInfo {
        size: be_u64(&reply, 0).unwrap_or_default(),
        flags: be_u16(&reply, 8).unwrap_or_default(),
        structured,
        allocation: None,
        min_block: 1,
        preferred_block: 4096,
        max_block: 32 << 20,
    })
}

struct Options<'a, S> {
    stream: &'a mut S,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Options<'_, S> {
    async fn send(&mut self, option: &ClientOption) -> io::Result<()> {
        let mut buf = Vec::new();
        option.encode(&mut buf);
        self.stream.write_all(&buf).await?;
        self.stream.flush().await
    }

    async fn reply(&mut self, option: u32) -> Result<(u32, Vec<u8>), HandshakeError> {
        let mut header = [0u8; OptionReplyHeader::SIZE];
        self.stream.read_exact(&mut header).await?;
        let header = OptionReplyHeader::parse(&header)?;
        if header.option != option {
            let found = format!("reply to option {} (asked {option})", header.option);
            return Err(ProtocolError::Unexpected(found).into());
        }
        if header.length > MAX_REPLY {
            let (what, len, limit) = ("option reply", header.length.into(), MAX_REPLY.into());
            return Err(ProtocolError::TooLarge { what, len, limit }.into());
        }
        let mut payload = vec![0u8; header.length as usize];
        self.stream.read_exact(&mut payload).await?;
        Ok((header.reply, payload))
    }

    async fn structured_replies(&mut self) -> Result<bool, HandshakeError> {
        let option = ClientOption::StructuredReply;
        self.send(&option).await?;
        let (reply, _) = self.reply(option.code()).await?;
        Ok(reply == rep::ACK)
    }

    async fn allocation_context(&mut self, export: &str) -> Result<Option<u32>, HandshakeError> {
        let option = ClientOption::SetMetaContext(MetaQuery {
            export: export.to_owned(),
            queries: vec![allocation::CONTEXT.to_owned()],
        });
        self.send(&option).await?;
        let mut id = None;
        loop {
            let (reply, payload) = self.reply(option.code()).await?;
            match reply {
                rep::META_CONTEXT if payload.get(4..) == Some(allocation::CONTEXT.as_bytes()) => {
                    id = be_u32(&payload, 0);
                }
                rep::META_CONTEXT => {}
                // Errors (unknown export included) surface again at GO.
                _ => return Ok(id.filter(|_| reply == rep::ACK)),
            }
        }
    }

    /// `Ok(None)` if the server does not know `NBD_OPT_GO`.
    async fn go(&mut self, export: &str) -> Result<Option<ExportInfo>, HandshakeError> {
        let option = ClientOption::Go(InfoRequest {
            name: export.to_owned(),
            requests: vec![info::BLOCK_SIZE],
        });
        self.send(&option).await?;
        let mut info = ExportInfo {
            size: 0,
            flags: 0,
            structured: false,
            allocation: None,
            min_block: 1,
            preferred_block: 4096,
            max_block: 32 << 20,
        };
        let mut have_export = false;
        loop {
            let (reply, payload) = self.reply(option.code()).await?;
            match reply {
                rep::ACK if have_export => return Ok(Some(info)),
                rep::ACK => return Err(ProtocolError::Malformed("GO without export info").into()),
                rep::INFO => have_export |= apply_info(&mut info, &payload)?,
                rep::ERR_UNSUP => return Ok(None),
                error if rep::is_error(error) => {
                    let message = String::from_utf8_lossy(&payload).into_owned();
                    return Err(HandshakeError::Refused(if message.is_empty() {
                        format!("option error {:#x} for export {export:?}", error)
                    } else {
                        message
                    }));
                }
                other => {
                    return Err(ProtocolError::Unexpected(format!("GO reply {other}")).into());
                }
            }
        }
    }
}

/// Records one `NBD_REP_INFO`; `true` if it was the export information.
fn apply_info(info: &mut ExportInfo, payload: &[u8]) -> Result<bool, ProtocolError> {
    let malformed = ProtocolError::Malformed("info reply");
    match be_u16(payload, 0).ok_or(malformed.clone())? {
        info::EXPORT => {
            info.size = be_u64(payload, 2).ok_or(malformed.clone())?;
            info.flags = be_u16(payload, 10).ok_or(malformed)?;
            Ok(true)
        }
        info::BLOCK_SIZE => {
            info.min_block = be_u32(payload, 2).ok_or(malformed.clone())?.max(1);
            info.preferred_block = be_u32(payload, 6).ok_or(malformed.clone())?.max(1);
            info.max_block = be_u32(payload, 10).ok_or(malformed)?.max(info.min_block);
            Ok(false)
        }
        _ => Ok(false),
    }
}
