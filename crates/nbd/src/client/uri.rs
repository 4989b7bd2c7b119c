//! NBD URIs (the libnbd and QEMU convention): where an export lives.
//!
//! `nbd://HOST[:PORT]/EXPORT` reaches a TCP server (port 10809 by default);
//! `nbd+unix:///EXPORT?socket=PATH` a Unix socket. The export name is the
//! percent-decoded path without its leading slash; empty means the server's
//! default export.

use std::fmt;
use std::path::PathBuf;

/// The IANA port of NBD.
pub const DEFAULT_PORT: u16 = 10809;

/// How to reach the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

/// An export on a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdAddress {
    pub endpoint: Endpoint,
    pub export: String,
}

/// A string that is not a usable NBD URI, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{uri:?} is not a usable NBD URI: {reason}")]
pub struct UriError {
    pub uri: String,
    pub reason: String,
}

impl NbdAddress {
    /// Whether `text` looks like an NBD URI (rather than a path).
    pub fn is_uri(text: &str) -> bool {
        let scheme = text.split_once("://").map(|(scheme, _)| scheme);
        scheme.is_some_and(|s| s.starts_with("nbd"))
    }

    pub fn parse(text: &str) -> Result<NbdAddress, UriError> {
        let fail = |reason: &str| UriError {
            uri: text.to_owned(),
            reason: reason.to_owned(),
        };
        let url = url::Url::parse(text).map_err(|e| fail(&e.to_string()))?;
        let path = url.path().strip_prefix('/').unwrap_or(url.path());
        let export = percent_decode(path).ok_or_else(|| fail("export name is not UTF-8"))?;
        let endpoint = match url.scheme() {
            "nbd" => Endpoint::Tcp {
                host: url
                    .host_str()
                    .filter(|h| !h.is_empty())
                    .ok_or_else(|| fail("no host"))?
                    .trim_matches(['[', ']'])
                    .to_owned(),
                port: url.port().unwrap_or(DEFAULT_PORT),
            },
            "nbd+unix" => {
                let socket = url
                    .query_pairs()
                    .find(|(key, _)| key == "socket")
                    .map(|(_, value)| PathBuf::from(value.as_ref()))
                    .ok_or_else(|| fail("nbd+unix needs ?socket=PATH"))?;
                Endpoint::Unix(socket)
            }
            "nbds" | "nbds+unix" => return Err(fail("TLS is not supported yet")),
            other => return Err(fail(&format!("unknown scheme {other:?}"))),
        };
        Ok(NbdAddress { endpoint, export })
    }
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

impl fmt::Display for NbdAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.endpoint {
            Endpoint::Tcp { host, port } if host.contains(':') => {
                write!(f, "nbd://[{host}]:{port}/{}", self.export)
            }
            Endpoint::Tcp { host, port } => write!(f, "nbd://{host}:{port}/{}", self.export),
            Endpoint::Unix(path) => {
                write!(f, "nbd+unix:///{}?socket={}", self.export, path.display())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_uri_with_and_without_port() {
        let address = NbdAddress::parse("nbd://example.com:10900/vm%2Fdisk").unwrap();
        assert_eq!(
            address.endpoint,
            Endpoint::Tcp {
                host: "example.com".into(),
                port: 10900
            }
        );
        assert_eq!(address.export, "vm/disk");
        let address = NbdAddress::parse("nbd://[::1]/").unwrap();
        assert_eq!(
            address.endpoint,
            Endpoint::Tcp {
                host: "::1".into(),
                port: DEFAULT_PORT
            }
        );
        assert_eq!(address.export, "");
        assert_eq!(address.to_string(), "nbd://[::1]:10809/");
    }

    #[test]
    fn unix_uri_needs_a_socket() {
        let address = NbdAddress::parse("nbd+unix:///disk0?socket=/run/a.sock").unwrap();
        assert_eq!(address.endpoint, Endpoint::Unix("/run/a.sock".into()));
        assert_eq!(address.export, "disk0");
        assert!(NbdAddress::parse("nbd+unix:///disk0").is_err());
    }

    #[test]
    fn other_schemes_are_refused() {
        assert!(NbdAddress::parse("nbds://host/x").is_err());
        assert!(NbdAddress::parse("http://host/x").is_err());
        assert!(NbdAddress::is_uri("nbd+unix:///?socket=x"));
        assert!(!NbdAddress::is_uri("/var/lib/image.raw"));
    }
}
