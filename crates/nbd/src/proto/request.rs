//! Transmission-phase requests: the 28-byte header a client sends before
//! every command (and the payload of a write).

use bytes::BufMut;

use super::{ProtocolError, be_u16, be_u32, be_u64, magic};

/// A command type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    Read,
    Write,
    Disconnect,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
    Unknown(u16),
}

impl Command {
    pub fn from_wire(code: u16) -> Command {
        match code {
            0 => Command::Read,
            1 => Command::Write,
            2 => Command::Disconnect,
            3 => Command::Flush,
            4 => Command::Trim,
            5 => Command::Cache,
            6 => Command::WriteZeroes,
            7 => Command::BlockStatus,
            other => Command::Unknown(other),
        }
    }

    pub fn to_wire(self) -> u16 {
        match self {
            Command::Read => 0,
            Command::Write => 1,
            Command::Disconnect => 2,
            Command::Flush => 3,
            Command::Trim => 4,
            Command::Cache => 5,
            Command::WriteZeroes => 6,
            Command::BlockStatus => 7,
            Command::Unknown(code) => code,
        }
    }

    /// Whether `length` bytes of payload follow the header.
    pub fn has_payload(self) -> bool {
        self == Command::Write
    }
}

/// A request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub command: Command,
    /// Opaque value the reply echoes (the protocol's "handle").
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl RequestHeader {
    pub const SIZE: usize = 28;

    /// Parses a header; fails only on a wrong magic (the stream is lost).
    pub fn parse(buf: &[u8; Self::SIZE]) -> Result<RequestHeader, ProtocolError> {
        let found = be_u32(buf, 0).unwrap_or_default();
        if found != magic::REQUEST {
            return Err(ProtocolError::BadMagic {
                expected: magic::REQUEST.into(),
                found: found.into(),
            });
        }
        Ok(RequestHeader {
            flags: be_u16(buf, 4).unwrap_or_default(),
            command: Command::from_wire(be_u16(buf, 6).unwrap_or_default()),
            cookie: be_u64(buf, 8).unwrap_or_default(),
            offset: be_u64(buf, 16).unwrap_or_default(),
            length: be_u32(buf, 24).unwrap_or_default(),
        })
    }

    pub fn encode(&self, out: &mut impl BufMut) {
        out.put_u32(magic::REQUEST);
        out.put_u16(self.flags);
        out.put_u16(self.command.to_wire());
        out.put_u64(self.cookie);
        out.put_u64(self.offset);
        out.put_u32(self.length);
    }

    /// The byte range the request covers, if it does not overflow.
    pub fn end(&self) -> Option<u64> {
        self.offset.checked_add(self.length.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let header = RequestHeader {
            flags: 3,
            command: Command::WriteZeroes,
            cookie: 0xdead_beef_0102_0304,
            offset: 1 << 40,
            length: 65536,
        };
        let mut buf = Vec::new();
        header.encode(&mut buf);
        let parsed = RequestHeader::parse(buf.as_slice().try_into().unwrap()).unwrap();
        assert_eq!(parsed, header);
    }

    #[test]
    fn bad_magic_is_refused() {
        let buf = [0u8; RequestHeader::SIZE];
        assert!(matches!(
            RequestHeader::parse(&buf),
            Err(ProtocolError::BadMagic { .. })
        ));
    }

    #[test]
    fn unknown_command_is_kept() {
        assert_eq!(Command::from_wire(42), Command::Unknown(42));
        assert_eq!(Command::Unknown(42).to_wire(), 42);
    }
}
