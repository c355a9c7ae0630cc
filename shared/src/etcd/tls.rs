//! The TLS side of `[etcd]`: the CA that signed the members' server
//! certificates and this node's client certificate, read from PEM files
//! into a rustls client configuration (aws-lc-rs, the crypto provider the
//! SSH transport already builds, so there is one provider in the tree).

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, RootCertStore};
use tokio_rustls::TlsConnector;

use super::EtcdError;
use crate::config::Etcd;

/// The connector for `https` endpoints, or `None` when `[etcd]` names no
/// CA. Each error names the key of `[etcd]` whose file is at fault.
pub(super) fn connector(etcd: &Etcd) -> Result<Option<TlsConnector>, EtcdError> {
    let Some(ca) = &etcd.ca else {
        return Ok(None);
    };
    let mut roots = RootCertStore::empty();
    for cert in certificates("etcd.ca", ca)? {
        roots
            .add(cert)
            .map_err(|e| EtcdError::Tls(format!("etcd.ca: {}: {e}", ca.display())))?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| EtcdError::Tls(format!("the TLS provider: {e}")))?
        .with_root_certificates(roots);
    let config = match (&etcd.cert, &etcd.key) {
        (Some(cert), Some(key)) => {
            let chain = certificates("etcd.cert", cert)?;
            let private = private_key(key)?;
            builder
                .with_client_auth_cert(chain, private)
                .map_err(|e| EtcdError::Tls(format!("etcd.cert and etcd.key do not go together: {e}")))?
        }
        // Validation of the cluster file allows only both or neither.
        _ => builder.with_no_client_auth(),
    };
    Ok(Some(TlsConnector::from(Arc::new(config))))
}

/// Reads `path`; the error names `key` and the path.
fn read(key: &str, path: &Path) -> Result<Vec<u8>, EtcdError> {
    std::fs::read(path).map_err(|e| EtcdError::Tls(format!("{key}: cannot read {}: {e}", path.display())))
}

/// Every certificate of the PEM file at `path`: at least one.
fn certificates(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, EtcdError> {
    let bytes = read(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| EtcdError::Tls(format!("{key}: {} is not PEM: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(EtcdError::Tls(format!(
            "{key}: {} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(certs)
}

/// The private key of the PEM file at `path` (PKCS#8, PKCS#1 or SEC1).
fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, EtcdError> {
    let bytes = read("etcd.key", path)?;
    PrivateKeyDer::from_pem_slice(&bytes)
        .map_err(|e| EtcdError::Tls(format!("etcd.key: {} holds no PEM private key: {e}", path.display())))
}

#[cfg(test)]
mod tests;
