//! NBD URIs (the libnbd and QEMU convention): where an export lives.
//!
//! `nbd://HOST[:PORT]/EXPORT` reaches a TCP server (port 10809 by default);
//! `nbd+unix:///EXPORT?socket=PATH` a Unix socket. The export name is the
//! percent-decoded path without its leading slash; empty means the server's
//! default export. `nbds://` and `nbds+unix://` do the same over TLS, with
//! the certificates of `?tls-certificates=DIR` (libnbd's query parameter)
//! and the server's certificate checked against the host name, or against
//! `?tls-hostname=NAME` (for a Unix socket, or a server reached by
//! another name than its certificate's).

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
    /// TLS, for `nbds` URIs.
    pub tls: Option<TlsTarget>,
}

/// How a TLS client proves itself and checks its server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsTarget {
    /// The certificates directory (QEMU's layout).
    pub certificates: PathBuf,
    /// The name the server's certificate must be valid for (the host by
    /// default; `localhost` for a Unix socket).
    pub hostname: String,
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
        let query = |name: &str| {
            url.query_pairs()
                .find(|(key, _)| key == name)
                .map(|(_, value)| value.into_owned())
        };
        let (plain, secure) = match url.scheme() {
            "nbds" => ("nbd", true),
            "nbds+unix" => ("nbd+unix", true),
            other => (other, false),
        };
        let endpoint = match plain {
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
                let socket = query("socket").ok_or_else(|| fail("nbd+unix needs ?socket=PATH"))?;
                Endpoint::Unix(PathBuf::from(socket))
            }
            _ => return Err(fail(&format!("unknown scheme {:?}", url.scheme()))),
        };
        let tls = match secure {
            false => None,
            true => Some(TlsTarget {
                certificates: query("tls-certificates")
                    .map(PathBuf::from)
                    .ok_or_else(|| fail("nbds needs ?tls-certificates=DIR (ca-cert.pem, client-cert.pem, client-key.pem)"))?,
                hostname: match (query("tls-hostname"), &endpoint) {
                    (Some(name), _) => name,
                    (None, Endpoint::Tcp { host, .. }) => host.clone(),
                    (None, Endpoint::Unix(_)) => "localhost".to_owned(),
                },
            }),
        };
        Ok(NbdAddress {
            endpoint,
            export,
            tls,
        })
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
        let s = if self.tls.is_some() { "s" } else { "" };
        match &self.endpoint {
            Endpoint::Tcp { host, port } if host.contains(':') => {
                write!(f, "nbd{s}://[{host}]:{port}/{}", self.export)?
            }
            Endpoint::Tcp { host, port } => write!(f, "nbd{s}://{host}:{port}/{}", self.export)?,
            Endpoint::Unix(path) => write!(
                f,
                "nbd{s}+unix:///{}?socket={}",
                self.export,
                path.display()
            )?,
        }
        if let Some(tls) = &self.tls {
            let join = if matches!(self.endpoint, Endpoint::Unix(_)) {
                '&'
            } else {
                '?'
            };
            write!(f, "{join}tls-certificates={}", tls.certificates.display())?;
        }
        Ok(())
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
    fn tls_uris_name_their_certificates_and_the_server() {
        let address =
            NbdAddress::parse("nbds://node-b:10810/vm1?tls-certificates=/etc/dmm/tls").unwrap();
        let tls = address.tls.clone().unwrap();
        assert_eq!(tls.certificates, PathBuf::from("/etc/dmm/tls"));
        assert_eq!(tls.hostname, "node-b");
        assert_eq!(
            address.to_string(),
            "nbds://node-b:10810/vm1?tls-certificates=/etc/dmm/tls"
        );
        let unix =
            NbdAddress::parse("nbds+unix:///vm1?socket=/run/n.sock&tls-certificates=/t").unwrap();
        assert_eq!(unix.tls.unwrap().hostname, "localhost");
        let named = NbdAddress::parse("nbds://10.0.0.2/x?tls-certificates=/t&tls-hostname=node-b");
        assert_eq!(named.unwrap().tls.unwrap().hostname, "node-b");
        let bare = NbdAddress::parse("nbds://host/x").unwrap_err().to_string();
        assert!(bare.contains("tls-certificates=DIR"), "{bare}");
    }

    #[test]
    fn other_schemes_are_refused() {
        assert!(NbdAddress::parse("http://host/x").is_err());
        assert!(NbdAddress::is_uri("nbd+unix:///?socket=x"));
        assert!(!NbdAddress::is_uri("/var/lib/image.raw"));
    }
}
