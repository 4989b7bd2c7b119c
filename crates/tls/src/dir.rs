//! The certificates directory: QEMU's `tls-creds-x509` layout, which
//! libnbd's `--tls-certificates` and nbdkit's `--tls-certificates` read too.
//!
//! | file | what |
//! |---|---|
//! | `ca-cert.pem` | the CA that signs every peer (and whose peers this node trusts) |
//! | `server-cert.pem`, `server-key.pem` | this node as a server: the chain, leaf first, and its key |
//! | `client-cert.pem`, `client-key.pem` | this node as a client (optional for a client that is not asked for one) |

use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::{Error, Result};

pub const CA_CERT: &str = "ca-cert.pem";
pub const SERVER_CERT: &str = "server-cert.pem";
pub const SERVER_KEY: &str = "server-key.pem";
pub const CLIENT_CERT: &str = "client-cert.pem";
pub const CLIENT_KEY: &str = "client-key.pem";

/// A directory of certificates in QEMU's layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateDir {
    dir: PathBuf,
}

impl CertificateDir {
    pub fn new(dir: impl Into<PathBuf>) -> CertificateDir {
        CertificateDir { dir: dir.into() }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn has(&self, name: &str) -> bool {
        self.file(name).is_file()
    }

    /// The certificates in `name` (a chain, leaf first), at least one.
    pub fn certificates(&self, name: &str) -> Result<Vec<CertificateDer<'static>>> {
        let path = self.file(name);
        let chain = CertificateDer::pem_file_iter(&path)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| Error::at("cannot read the certificates in", &path).because(e))?;
        if chain.is_empty() {
            return Err(Error::at("no certificate in", &path));
        }
        Ok(chain)
    }

    /// The private key in `name` (PKCS#8, PKCS#1 or SEC1).
    pub fn key(&self, name: &str) -> Result<PrivateKeyDer<'static>> {
        let path = self.file(name);
        PrivateKeyDer::from_pem_file(&path)
            .map_err(|e| Error::at("cannot read the private key", &path).because(e))
    }

    /// The CA's certificates, as the roots a peer must chain to.
    pub fn roots(&self) -> Result<rustls::RootCertStore> {
        let mut roots = rustls::RootCertStore::empty();
        for certificate in self.certificates(CA_CERT)? {
            roots.add(certificate).map_err(|e| {
                Error::at("not a usable CA certificate:", &self.file(CA_CERT)).because(e)
            })?;
        }
        Ok(roots)
    }
}
