//! A small PKI for a dmm cluster, built on rcgen: [`init`] makes the
//! cluster's CA, [`issue`] a node's certificates (a node serves and is a
//! client of the others, so it gets both), written in the directory layout
//! every dmm, QEMU and libnbd endpoint reads. Keys are ECDSA P-256 and
//! written owner-only; the key usages are the ones GnuTLS checks (QEMU,
//! qemu-img, nbdkit and libnbd use it): `keyCertSign` for the CA,
//! `digitalSignature` and `keyEncipherment` with `serverAuth` or
//! `clientAuth` for the others.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

use crate::dir::{CA_CERT, CLIENT_CERT, CLIENT_KEY, CertificateDir, SERVER_CERT, SERVER_KEY};
use crate::error::{Error, Result};

/// The CA's private key, next to its certificate in the CA's directory
/// (never copied into a node's).
pub const CA_KEY: &str = "ca-key.pem";

/// How long the CA is valid.
const CA_VALIDITY: Duration = Duration::days(3650);
/// How long a node's certificates are valid (issue them again before).
const NODE_VALIDITY: Duration = Duration::days(825);

/// Makes a CA named `name` in `dir` (`ca-cert.pem`, `ca-key.pem`).
/// Refuses a directory that already has a CA key.
pub fn init(dir: &Path, name: &str) -> Result<()> {
    let ca = CertificateDir::new(dir);
    refuse_existing(&ca, &[CA_KEY, CA_CERT])?;
    let mut params = CertificateParams::new(Vec::<String>::new())
        .map_err(|e| Error::new("CA parameters").because(e))?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    valid_for(&mut params, CA_VALIDITY);
    let key = KeyPair::generate().map_err(|e| Error::new("cannot make a key").because(e))?;
    let certificate = params
        .self_signed(&key)
        .map_err(|e| Error::new("cannot sign the CA").because(e))?;
    std::fs::create_dir_all(dir).map_err(|e| Error::at("cannot create", dir).because(e))?;
    write(&ca, CA_KEY, &key.serialize_pem(), true)?;
    write(&ca, CA_CERT, &certificate.pem(), false)
}

/// Issues certificates for `name` (and `also`: more DNS names or IP
/// addresses it is reached by) signed by the CA in `ca_dir`, into `out`:
/// `server-cert.pem`, `server-key.pem`, `client-cert.pem`,
/// `client-key.pem` and a copy of `ca-cert.pem`. Refuses to replace
/// existing certificates.
pub fn issue(ca_dir: &Path, out: &Path, name: &str, also: &[String]) -> Result<()> {
    let ca = CertificateDir::new(ca_dir);
    let node = CertificateDir::new(out);
    refuse_existing(&node, &[SERVER_CERT, SERVER_KEY, CLIENT_CERT, CLIENT_KEY])?;
    let issuer = issuer(&ca)?;
    let mut names = vec![name.to_owned()];
    names.extend(also.iter().cloned());
    if let Some(bad) = names
        .iter()
        .find(|n| rustls::pki_types::ServerName::try_from(n.as_str()).is_err())
    {
        return Err(Error::new(format!(
            "{bad:?} is not a DNS name or an IP address"
        )));
    }
    std::fs::create_dir_all(out).map_err(|e| Error::at("cannot create", out).because(e))?;
    for (purpose, cert, key) in [
        (ExtendedKeyUsagePurpose::ServerAuth, SERVER_CERT, SERVER_KEY),
        (ExtendedKeyUsagePurpose::ClientAuth, CLIENT_CERT, CLIENT_KEY),
    ] {
        let (certificate, private) = leaf(&issuer, name, &names, purpose)?;
        write(&node, key, &private, true)?;
        write(&node, cert, &certificate, false)?;
    }
    let ca_pem = std::fs::read_to_string(ca.file(CA_CERT))
        .map_err(|e| Error::at("cannot read", &ca.file(CA_CERT)).because(e))?;
    if out != ca_dir {
        write(&node, CA_CERT, &ca_pem, false)?;
    }
    Ok(())
}

/// The CA of `ca` as an issuer.
fn issuer(ca: &CertificateDir) -> Result<Issuer<'static, KeyPair>> {
    let read = |name: &str| {
        let path = ca.file(name);
        std::fs::read_to_string(&path).map_err(|e| Error::at("cannot read", &path).because(e))
    };
    let key = KeyPair::from_pem(&read(CA_KEY)?)
        .map_err(|e| Error::at("not a private key:", &ca.file(CA_KEY)).because(e))?;
    Issuer::from_ca_cert_pem(&read(CA_CERT)?, key)
        .map_err(|e| Error::at("not a CA certificate:", &ca.file(CA_CERT)).because(e))
}

/// A certificate for `names` with `purpose`, and its key, in PEM.
fn leaf(
    issuer: &Issuer<'static, KeyPair>,
    name: &str,
    names: &[String],
    purpose: ExtendedKeyUsagePurpose,
) -> Result<(String, String)> {
    let mut params = CertificateParams::new(names.to_vec()).map_err(|e| {
        Error::new(format!("{names:?} are not DNS names or IP addresses")).because(e)
    })?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![purpose];
    params.use_authority_key_identifier_extension = true;
    valid_for(&mut params, NODE_VALIDITY);
    let key = KeyPair::generate().map_err(|e| Error::new("cannot make a key").because(e))?;
    let certificate = params
        .signed_by(&key, issuer)
        .map_err(|e| Error::new(format!("cannot sign a certificate for {name}")).because(e))?;
    Ok((certificate.pem(), key.serialize_pem()))
}

/// Valid from an hour ago (clocks differ a little) for `length`.
fn valid_for(params: &mut CertificateParams, length: Duration) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + length;
}

fn refuse_existing(dir: &CertificateDir, names: &[&str]) -> Result<()> {
    match names.iter().find(|name| dir.file(name).exists()) {
        Some(name) => Err(Error::at("refusing to replace", &dir.file(name))),
        None => Ok(()),
    }
}

/// Writes a new file (owner-only for a key), never through a link.
fn write(dir: &CertificateDir, name: &str, text: &str, secret: bool) -> Result<()> {
    let path = dir.file(name);
    let mode = if secret { 0o600 } else { 0o644 };
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&path)
        .and_then(|mut file| {
            file.write_all(text.as_bytes())
                .and_then(|()| file.sync_all())
        })
        .map_err(|e| Error::at("cannot write", &path).because(e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{PeerCheck, client_config, peer_names, server_config};

    #[test]
    fn a_node_issued_by_the_ca_is_trusted_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        init(&ca, "test cluster").unwrap();
        let refused = init(&ca, "again").unwrap_err().to_string();
        assert!(refused.contains("refusing to replace"), "{refused}");
        let node = dir.path().join("node-a");
        issue(&ca, &node, "node-a", &["127.0.0.1".to_owned()]).unwrap();
        let certs = CertificateDir::new(&node);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(certs.file(SERVER_KEY))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!certs.has(CA_KEY), "the CA's key stays with the CA");
        let leaf = &certs.certificates(CLIENT_CERT).unwrap()[0];
        assert_eq!(peer_names(leaf), ["node-a", "127.0.0.1"]);
        server_config(
            &certs,
            &PeerCheck::Verified {
                allow: vec!["node-a".into()],
            },
        )
        .unwrap();
        client_config(&certs).unwrap();
        let again = issue(&ca, &node, "node-a", &[]).unwrap_err().to_string();
        assert!(again.contains("refusing to replace"), "{again}");
        let bad = issue(&ca, &dir.path().join("x"), "not a name!", &[]).unwrap_err();
        assert!(bad.to_string().contains("not a DNS name"), "{bad}");
    }
}
