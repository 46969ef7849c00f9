//! TLS to PostgreSQL, for servers that require it (managed services do, and any server whose
//! `pg_hba.conf` says `hostssl`): rustls, the server's certificate verified, host name
//! included, against the system's root certificates plus `--database-ca-file`.
//!
//! It is used when the URL says `sslmode=require`. Without it (tokio-postgres' default is
//! `prefer`) or with `sslmode=disable`, connections are plain, as they always were: libpq's
//! `prefer` encrypts without verifying anything, and verifying there would refuse the servers
//! `prefer` exists for (Debian's own PostgreSQL answers TLS with a self-signed certificate).

use std::error::Error;
use std::path::{Path, PathBuf};

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::causes::Causes;

/// Why TLS to PostgreSQL cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the certificates of --database-ca-file {}: {source}", path.display())]
    CaFile {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("--database-ca-file {} holds no certificate", path.display())]
    NoCertificate { path: PathBuf },
    #[error(
        "no root certificate to verify the server with: the system has none readable and no \
         --database-ca-file is given"
    )]
    NoRoots,
    #[error("a certificate of --database-ca-file {} cannot be used: {source}", path.display())]
    BadCertificate {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
}

/// A connection refused because the server's certificate was: the reason, and what to do.
#[derive(Debug, thiserror::Error)]
#[error("{}; {hint}", Causes(.error))]
pub struct Untrusted {
    error: tokio_postgres::Error,
    hint: &'static str,
}

/// `error`, with what to do if it is a refusal of the server's certificate that tally's
/// settings or the server's can mend.
pub fn explained(error: tokio_postgres::Error) -> Result<Untrusted, tokio_postgres::Error> {
    match refused_certificate(&error).and_then(hint) {
        Some(hint) => Ok(Untrusted { error, hint }),
        None => Err(error),
    }
}

/// What to do about a certificate rustls refused, when there is something to say.
fn hint(refusal: &rustls::CertificateError) -> Option<&'static str> {
    use rustls::CertificateError as E;
    Some(match refusal {
        E::UnknownIssuer => {
            "the server's certificate is not vouched for by the system's roots or \
             --database-ca-file: give the certificate of the CA that signed it with \
             --database-ca-file (docs/operations.md, Faults)"
        }
        E::NotValidForName | E::NotValidForNameContext { .. } => {
            "the server's certificate does not name the URL's host: connect by a host name it \
             names (docs/operations.md, Faults)"
        }
        E::Expired | E::ExpiredContext { .. } | E::NotValidYet | E::NotValidYetContext { .. } => {
            "the server's certificate is out of its validity period: renew it on the server, \
             or check this host's clock"
        }
        _ => return None,
    })
}

/// The reason rustls refused the server's certificate, if that is what ended `error`. The
/// TLS stream reports it as an `io::Error` around the `rustls::Error`, whose `source()`
/// skips it, so each `io::Error` of the chain is looked into.
fn refused_certificate<'a>(
    error: &'a (dyn Error + 'static),
) -> Option<&'a rustls::CertificateError> {
    let mut cause = Some(error);
    while let Some(error) = cause {
        let rustls = error.downcast_ref::<rustls::Error>().or_else(|| {
            error
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(rustls::Error::InvalidCertificate(refusal)) = rustls {
            return Some(refusal);
        }
        cause = error.source();
    }
    None
}

/// The certificates (PEM) of `path`, `--database-ca-file`.
///
/// # Errors
///
/// If the file cannot be read or holds no certificate.
pub fn ca_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let failed = |source| TlsError::CaFile {
        path: path.to_owned(),
        source,
    };
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(failed)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(failed)?;
    if certificates.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certificates)
}

/// A connector that verifies the server against the system's roots and `ca_file`'s
/// certificates (PEM).
///
/// # Errors
///
/// If `ca_file` cannot be read or holds no certificate, or there is no root at all.
pub fn connector(ca_file: Option<&Path>) -> Result<MakeRustlsConnect, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    let system = rustls_native_certs::load_native_certs();
    for error in &system.errors {
        tracing::debug!(%error, "A system root certificate could not be loaded.");
    }
    let (added, _) = roots.add_parsable_certificates(system.certs);
    if let Some(path) = ca_file {
        for certificate in ca_certificates(path)? {
            roots
                .add(certificate)
                .map_err(|source| TlsError::BadCertificate {
                    path: path.to_owned(),
                    source,
                })?;
        }
    } else if added == 0 {
        return Err(TlsError::NoRoots);
    }
    // The process's default crypto provider: `ring`, the only one this build enables
    // (Cargo.toml), so the builder always finds it.
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_file_without_a_certificate_is_an_error_that_names_it() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate\n").expect("write the file");
        let error = connector(Some(&path)).err().expect("an error");
        assert!(matches!(error, TlsError::NoCertificate { .. }), "{error}");
        assert!(error.to_string().contains("ca.pem"), "{error}");

        let missing = dir.path().join("missing.pem");
        let error = connector(Some(&missing)).err().expect("an error");
        assert!(matches!(error, TlsError::CaFile { .. }), "{error}");
    }
}
