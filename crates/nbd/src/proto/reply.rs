//! Replies: option replies of the handshake, and the simple replies and
//! structured reply chunks of the transmission phase.

use bytes::BufMut;

use super::{ProtocolError, be_u16, be_u32, be_u64, magic};

/// Writes an option reply header and its payload.
pub fn encode_option_reply(out: &mut impl BufMut, option: u32, reply: u32, payload: &[u8]) {
    out.put_u64(magic::OPTION_REPLY);
    out.put_u32(option);
    out.put_u32(reply);
    out.put_u32(payload.len() as u32);
    out.put_slice(payload);
}

/// The header of an option reply, as a client reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply: u32,
    pub length: u32,
}

impl OptionReplyHeader {
    pub const SIZE: usize = 20;

    pub fn parse(buf: &[u8; Self::SIZE]) -> Result<OptionReplyHeader, ProtocolError> {
        let found = be_u64(buf, 0).unwrap_or_default();
        if found != magic::OPTION_REPLY {
            return Err(ProtocolError::BadMagic {
                expected: magic::OPTION_REPLY,
                found,
            });
        }
        Ok(OptionReplyHeader {
            option: be_u32(buf, 8).unwrap_or_default(),
            reply: be_u32(buf, 12).unwrap_or_default(),
            length: be_u32(buf, 16).unwrap_or_default(),
        })
    }
}

/// Writes a simple reply header (data, if any, follows).
pub fn encode_simple_reply(out: &mut impl BufMut, error: u32, cookie: u64) {
    out.put_u32(magic::SIMPLE_REPLY);
    out.put_u32(error);
    out.put_u64(cookie);
}

/// Writes a structured reply chunk header for a payload of `length` bytes.
pub fn encode_chunk_header(out: &mut impl BufMut, flags: u16, kind: u16, cookie: u64, length: u32) {
    out.put_u32(magic::STRUCTURED_REPLY);
    out.put_u16(flags);
    out.put_u16(kind);
    out.put_u64(cookie);
    out.put_u32(length);
}

/// A simple reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReplyHeader {
    pub error: u32,
    pub cookie: u64,
}

/// A structured reply chunk header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub length: u32,
}

/// Either kind of transmission reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    Simple(SimpleReplyHeader),
    Chunk(ChunkHeader),
}

impl ReplyHeader {
    /// Bytes of header that follow the 4-byte magic, or an error for an
    /// unknown magic.
    pub fn remaining_after_magic(magic_word: u32) -> Result<usize, ProtocolError> {
        match magic_word {
            magic::SIMPLE_REPLY => Ok(12),
            magic::STRUCTURED_REPLY => Ok(16),
            found => Err(ProtocolError::BadMagic {
                expected: magic::STRUCTURED_REPLY.into(),
                found: found.into(),
            }),
        }
    }

    /// Parses a whole header (magic included), 16 or 20 bytes.
    pub fn parse(buf: &[u8]) -> Result<ReplyHeader, ProtocolError> {
        let short = ProtocolError::Malformed("reply header");
        let magic_word = be_u32(buf, 0).ok_or(short.clone())?;
        if buf.len() != 4 + Self::remaining_after_magic(magic_word)? {
            return Err(short);
        }
        Ok(if magic_word == magic::SIMPLE_REPLY {
            ReplyHeader::Simple(SimpleReplyHeader {
                error: be_u32(buf, 4).ok_or(short.clone())?,
                cookie: be_u64(buf, 8).ok_or(short)?,
            })
        } else {
            ReplyHeader::Chunk(ChunkHeader {
                flags: be_u16(buf, 4).ok_or(short.clone())?,
                kind: be_u16(buf, 6).ok_or(short.clone())?,
                cookie: be_u64(buf, 8).ok_or(short.clone())?,
                length: be_u32(buf, 16).ok_or(short)?,
            })
        })
    }

    pub fn cookie(&self) -> u64 {
        match self {
            ReplyHeader::Simple(h) => h.cookie,
            ReplyHeader::Chunk(h) => h.cookie,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simple_and_chunk_headers_round_trip() {
        let mut buf = Vec::new();
        encode_simple_reply(&mut buf, 5, 77);
        assert_eq!(
            ReplyHeader::parse(&buf),
            Ok(ReplyHeader::Simple(SimpleReplyHeader {
                error: 5,
                cookie: 77
            }))
        );
        let mut buf = Vec::new();
        encode_chunk_header(&mut buf, 1, 2, 99, 12);
        assert_eq!(
            ReplyHeader::parse(&buf),
            Ok(ReplyHeader::Chunk(ChunkHeader {
                flags: 1,
                kind: 2,
                cookie: 99,
                length: 12
            }))
        );
    }

    #[test]
    fn option_reply_round_trips() {
        let mut buf = Vec::new();
        encode_option_reply(&mut buf, 7, 3, &[1, 2, 3]);
        let header = OptionReplyHeader::parse(buf[..20].try_into().unwrap()).unwrap();
        assert_eq!(
            header,
            OptionReplyHeader {
                option: 7,
                reply: 3,
                length: 3
            }
        );
        assert_eq!(&buf[20..], &[1, 2, 3]);
    }
}
