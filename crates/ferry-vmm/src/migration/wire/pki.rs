//! A small certificate authority for labs and tests (`ferry tls-certs`): one CA and, for each
//! host, a certificate that serves as both server and client, laid out as `--tls-dir` wants
//! it. Production sites use their own PKI; the files are the same three.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use super::{CA_FILE, CERT_FILE, KEY_FILE};

/// What went wrong making certificates.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("making a certificate for {what}: {source}")]
    Certificate {
        what: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("host name {0:?} cannot be a folder name")]
    HostName(String),
}

/// A host to certify: its folder's name, and the names and addresses peers dial it by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSpec {
    pub name: String,
    pub addresses: Vec<String>,
}

/// Makes a CA named `ca_name` and a certificate for each host, signed by it. Writes
/// `out/ca.pem` and `out/HOST/{ca.pem,cert.pem,key.pem}` (keys readable by the owner only);
/// returns each host's folder.
pub fn make(out: &Path, ca_name: &str, hosts: &[HostSpec]) -> Result<Vec<PathBuf>, PkiError> {
    let cert_error = |what: &str| {
        let what = what.to_string();
        move |source| PkiError::Certificate { what, source }
    };
    if let Some(bad) = hosts
        .iter()
        .find(|h| h.name.is_empty() || h.name.contains('/') || h.name.starts_with('.'))
    {
        return Err(PkiError::HostName(bad.name.clone()));
    }
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(cert_error(ca_name))?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, ca_name);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate().map_err(cert_error(ca_name))?;
    let ca_pem = ca.self_signed(&ca_key).map_err(cert_error(ca_name))?.pem();
    let issuer = Issuer::new(ca, ca_key);
    write(&out.join(CA_FILE), &ca_pem, false)?;
    let mut dirs = Vec::new();
    for host in hosts {
        let mut params =
            CertificateParams::new(host.addresses.clone()).map_err(cert_error(&host.name))?;
        params
            .distinguished_name
            .push(DnType::CommonName, host.name.as_str());
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().map_err(cert_error(&host.name))?;
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(cert_error(&host.name))?;
        let dir = out.join(&host.name);
        write(&dir.join(CA_FILE), &ca_pem, false)?;
        write(&dir.join(CERT_FILE), &cert.pem(), false)?;
        write(&dir.join(KEY_FILE), &key.serialize_pem(), true)?;
        dirs.push(dir);
    }
    Ok(dirs)
}

fn write(path: &Path, text: &str, secret: bool) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let failed = |source| PkiError::Write {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(failed)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .map_err(failed)?;
    file.write_all(text.as_bytes()).map_err(failed)
}
