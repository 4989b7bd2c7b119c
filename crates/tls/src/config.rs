//! rustls configurations from a [`CertificateDir`]: TLS 1.3 with 1.2
//! accepted, the ring provider, servers that verify their clients against
//! the directory's CA (and, if asked, an allow-list of names) and clients
//! that verify their server and present their own certificate when the
//! directory has one.

use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::dir::{CLIENT_CERT, CLIENT_KEY, CertificateDir, SERVER_CERT, SERVER_KEY};
use crate::error::{Error, Result};

/// Which clients a server accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerCheck {
    /// Any client: none is asked for a certificate.
    Anyone,
    /// Any client, but one that presents a certificate must have it signed
    /// by the directory's CA (a daemon's API: peers prove themselves by
    /// certificate, admins by their bearer token).
    Optional,
    /// Clients presenting a certificate signed by the directory's CA; with
    /// names, only one valid for at least one of them (a DNS name or IP
    /// address in its subject alternative names, as `dmm tls issue` puts
    /// there).
    Verified { allow: Vec<String> },
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// The server side: `server-cert.pem` and `server-key.pem`, and for
/// [`PeerCheck::Verified`] `ca-cert.pem`.
pub fn server_config(dir: &CertificateDir, peers: &PeerCheck) -> Result<Arc<rustls::ServerConfig>> {
    let chain = dir.certificates(SERVER_CERT)?;
    let key = dir.key(SERVER_KEY)?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| Error::new("TLS versions").because(e))?;
    let builder = match peers {
        PeerCheck::Anyone => builder.with_no_client_auth(),
        PeerCheck::Optional => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(dir.roots()?), provider())
                    .allow_unauthenticated()
                    .build()
                    .map_err(|e| {
                        Error::at("cannot verify clients with", &dir.file(crate::CA_CERT))
                            .because(e)
                    })?;
            builder.with_client_cert_verifier(verifier)
        }
        PeerCheck::Verified { allow } => {
            let inner =
                WebPkiClientVerifier::builder_with_provider(Arc::new(dir.roots()?), provider())
                    .build()
                    .map_err(|e| {
                        Error::at("cannot verify clients with", &dir.file(crate::CA_CERT))
                            .because(e)
                    })?;
            let verifier: Arc<dyn ClientCertVerifier> = match allow.is_empty() {
                true => inner,
                false => Arc::new(AllowList::new(inner, allow)?),
            };
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder.with_single_cert(chain, key).map_err(|e| {
        Error::at(
            "the certificate and key do not make a server identity in",
            dir.path(),
        )
        .because(e)
    })?;
    Ok(Arc::new(config))
}

/// The client side: trusts `ca-cert.pem`; presents `client-cert.pem` and
/// `client-key.pem` when the directory has them.
pub fn client_config(dir: &CertificateDir) -> Result<Arc<rustls::ClientConfig>> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| Error::new("TLS versions").because(e))?
        .with_root_certificates(dir.roots()?);
    let config = match dir.has(CLIENT_CERT) {
        true => builder
            .with_client_auth_cert(dir.certificates(CLIENT_CERT)?, dir.key(CLIENT_KEY)?)
            .map_err(|e| {
                Error::at("the client certificate and key do not match in", dir.path()).because(e)
            })?,
        false => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// The DNS names and IP addresses a certificate is valid for (its subject
/// alternative names), for messages and allow-lists.
pub fn peer_names(certificate: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(certificate) else {
        return Vec::new();
    };
    let Ok(Some(names)) = parsed.subject_alternative_name() else {
        return Vec::new();
    };
    names
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => Some((*dns).to_owned()),
            GeneralName::IPAddress(bytes) => ip_text(bytes),
            _ => None,
        })
        .collect()
}

fn ip_text(bytes: &[u8]) -> Option<String> {
    match bytes.len() {
        4 => Some(std::net::Ipv4Addr::from(<[u8; 4]>::try_from(bytes).ok()?).to_string()),
        16 => Some(std::net::Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?).to_string()),
        _ => None,
    }
}

/// A client verifier that also requires the certificate to be valid for
/// one of a list of names: a client of the right CA but the wrong name
/// fails the handshake itself, before a byte of NBD.
#[derive(Debug)]
struct AllowList {
    inner: Arc<dyn ClientCertVerifier>,
    names: Vec<ServerName<'static>>,
}

impl AllowList {
    fn new(inner: Arc<dyn ClientCertVerifier>, allow: &[String]) -> Result<AllowList> {
        let names = allow
            .iter()
            .map(|name| {
                ServerName::try_from(name.clone()).map_err(|e| {
                    Error::new(format!("{name:?} is not a DNS name or an IP address")).because(e)
                })
            })
            .collect::<Result<_>>()?;
        Ok(AllowList { inner, names })
    }
}

impl ClientCertVerifier for AllowList {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let certificate = webpki::EndEntityCert::try_from(end_entity).map_err(|_| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
        })?;
        if self
            .names
            .iter()
            .any(|name| certificate.verify_is_valid_for_subject_name(name).is_ok())
        {
            return Ok(verified);
        }
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::NotValidForName,
        ))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
