//! Handshake options: what a client may ask for before transmission.
//!
//! `parse_option` is the server's view (bytes in, typed option out, or the
//! reason it is invalid); `ClientOption::encode` is the client's.

use bytes::BufMut;

use super::{MAX_STRING, be_u16, be_u32, magic, opt};

/// The body of `NBD_OPT_INFO` and `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    /// `NBD_INFO_*` types the client asks for.
    pub requests: Vec<u16>,
}

/// The body of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaQuery {
    pub export: String,
    pub queries: Vec<String>,
}

/// An option sent by a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    ExportName(String),
    Abort,
    List,
    StartTls,
    Info(InfoRequest),
    Go(InfoRequest),
    StructuredReply,
    ListMetaContext(MetaQuery),
    SetMetaContext(MetaQuery),
    ExtendedHeaders,
    Unknown(u32),
}

/// Why an option's data was refused (answered with `NBD_REP_ERR_INVALID`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct OptionError(pub &'static str);

/// A cursor over option data that refuses to read past the end.
struct Cursor<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn u16(&mut self) -> Result<u16, OptionError> {
        let value = be_u16(self.data, self.at).ok_or(OptionError("option data too short"))?;
        self.at += 2;
        Ok(value)
    }

    fn u32(&mut self) -> Result<u32, OptionError> {
        let value = be_u32(self.data, self.at).ok_or(OptionError("option data too short"))?;
        self.at += 4;
        Ok(value)
    }

    fn string(&mut self, len: usize) -> Result<String, OptionError> {
        if len > MAX_STRING {
            return Err(OptionError("string longer than 4096 bytes"));
        }
        let end = self
            .at
            .checked_add(len)
            .filter(|&end| end <= self.data.len());
        let bytes = &self.data[self.at..end.ok_or(OptionError("string runs past option data"))?];
        self.at += len;
        utf8(bytes)
    }

    /// A 32-bit length followed by that many bytes of string.
    fn prefixed_string(&mut self) -> Result<String, OptionError> {
        let len = self.u32()? as usize;
        self.string(len)
    }

    fn finish(&self) -> Result<(), OptionError> {
        if self.at == self.data.len() {
            Ok(())
        } else {
            Err(OptionError("trailing bytes after option data"))
        }
    }
}

fn utf8(bytes: &[u8]) -> Result<String, OptionError> {
    let text = std::str::from_utf8(bytes).map_err(|_| OptionError("string is not UTF-8"))?;
    if text.contains('\0') {
        return Err(OptionError("string contains NUL"));
    }
    Ok(text.to_owned())
}

fn no_data(data: &[u8], option: ClientOption) -> Result<ClientOption, OptionError> {
    if data.is_empty() {
        Ok(option)
    } else {
        Err(OptionError("option takes no data"))
    }
}

fn info_request(data: &[u8]) -> Result<InfoRequest, OptionError> {
    let mut cursor = Cursor { data, at: 0 };
    let name = cursor.prefixed_string()?;
    let count = cursor.u16()?;
    let requests = (0..count)
        .map(|_| cursor.u16())
        .collect::<Result<Vec<_>, _>>()?;
    cursor.finish()?;
    Ok(InfoRequest { name, requests })
}

fn meta_query(data: &[u8]) -> Result<MetaQuery, OptionError> {
    let mut cursor = Cursor { data, at: 0 };
    let export = cursor.prefixed_string()?;
    let count = cursor.u32()?;
    // Each query takes at least its 4-byte length: bound the loop by the
    // data actually present, not by the count the client claims.
    if count as usize > data.len() / 4 {
        return Err(OptionError("more queries than option data"));
    }
    let queries = (0..count)
        .map(|_| cursor.prefixed_string())
        .collect::<Result<Vec<_>, _>>()?;
    cursor.finish()?;
    Ok(MetaQuery { export, queries })
}

/// Parses the data of option `code`.
pub fn parse_option(code: u32, data: &[u8]) -> Result<ClientOption, OptionError> {
    match code {
        opt::EXPORT_NAME => {
            if data.len() > MAX_STRING {
                return Err(OptionError("export name longer than 4096 bytes"));
            }
            utf8(data).map(ClientOption::ExportName)
        }
        opt::ABORT => no_data(data, ClientOption::Abort),
        opt::LIST => no_data(data, ClientOption::List),
        opt::STARTTLS => no_data(data, ClientOption::StartTls),
        opt::INFO => info_request(data).map(ClientOption::Info),
        opt::GO => info_request(data).map(ClientOption::Go),
        opt::STRUCTURED_REPLY => no_data(data, ClientOption::StructuredReply),
        opt::LIST_META_CONTEXT => meta_query(data).map(ClientOption::ListMetaContext),
        opt::SET_META_CONTEXT => meta_query(data).map(ClientOption::SetMetaContext),
        opt::EXTENDED_HEADERS => no_data(data, ClientOption::ExtendedHeaders),
        other => Ok(ClientOption::Unknown(other)),
    }
}

impl ClientOption {
    pub fn code(&self) -> u32 {
        match self {
            ClientOption::ExportName(_) => opt::EXPORT_NAME,
            ClientOption::Abort => opt::ABORT,
            ClientOption::List => opt::LIST,
            ClientOption::StartTls => opt::STARTTLS,
            ClientOption::Info(_) => opt::INFO,
            ClientOption::Go(_) => opt::GO,
            ClientOption::StructuredReply => opt::STRUCTURED_REPLY,
            ClientOption::ListMetaContext(_) => opt::LIST_META_CONTEXT,
            ClientOption::SetMetaContext(_) => opt::SET_META_CONTEXT,
            ClientOption::ExtendedHeaders => opt::EXTENDED_HEADERS,
            ClientOption::Unknown(code) => *code,
        }
    }

    /// Encodes the whole option: magic, code, length and data.
    pub fn encode(&self, out: &mut impl BufMut) {
        let mut data = Vec::new();
        match self {
            ClientOption::ExportName(name) => data.put_slice(name.as_bytes()),
            ClientOption::Info(request) | ClientOption::Go(request) => {
                put_prefixed(&mut data, &request.name);
                data.put_u16(request.requests.len() as u16);
                request.requests.iter().for_each(|r| data.put_u16(*r));
            }
            ClientOption::ListMetaContext(query) | ClientOption::SetMetaContext(query) => {
                put_prefixed(&mut data, &query.export);
                data.put_u32(query.queries.len() as u32);
                query
                    .queries
                    .iter()
                    .for_each(|q| put_prefixed(&mut data, q));
            }
            _ => {}
        }
        out.put_u64(magic::OPTS);
        out.put_u32(self.code());
        out.put_u32(data.len() as u32);
        out.put_slice(&data);
    }
}

fn put_prefixed(out: &mut Vec<u8>, text: &str) {
    out.put_u32(text.len() as u32);
    out.put_slice(text.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(option: ClientOption) {
        let mut wire = Vec::new();
        option.encode(&mut wire);
        let code = u32::from_be_bytes(wire[8..12].try_into().unwrap());
        let len = u32::from_be_bytes(wire[12..16].try_into().unwrap()) as usize;
        assert_eq!(wire.len(), 16 + len);
        assert_eq!(parse_option(code, &wire[16..]), Ok(option));
    }

    #[test]
    fn options_round_trip() {
        round_trip(ClientOption::ExportName("disk0".into()));
        round_trip(ClientOption::Abort);
        round_trip(ClientOption::List);
        round_trip(ClientOption::StructuredReply);
        round_trip(ClientOption::Go(InfoRequest {
            name: "vm/root".into(),
            requests: vec![3, 1],
        }));
        round_trip(ClientOption::SetMetaContext(MetaQuery {
            export: String::new(),
            queries: vec!["base:allocation".into(), "qemu:dirty-bitmap:x".into()],
        }));
    }

    #[test]
    fn malformed_data_is_invalid() {
        // A name length that runs past the data.
        let data = [0, 0, 0, 9, b'a', 0, 0];
        assert!(parse_option(opt::GO, &data).is_err());
        // Trailing bytes.
        let data = [0, 0, 0, 0, 0, 0, 1];
        assert!(parse_option(opt::GO, &data).is_err());
        // A query count far beyond the data.
        let data = [0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff];
        assert!(parse_option(opt::SET_META_CONTEXT, &data).is_err());
        // Data on an option that takes none.
        assert!(parse_option(opt::LIST, &[1]).is_err());
        // Not UTF-8.
        assert!(parse_option(opt::EXPORT_NAME, &[0xff, 0xfe]).is_err());
    }

    #[test]
    fn unknown_option_is_not_an_error() {
        assert_eq!(parse_option(99, &[1, 2, 3]), Ok(ClientOption::Unknown(99)));
    }
}
