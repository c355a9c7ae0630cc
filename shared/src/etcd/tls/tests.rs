#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::Duration;

use super::*;
use crate::config::Endpoint;

fn etcd(ca: Option<PathBuf>, cert: Option<PathBuf>, key: Option<PathBuf>) -> Etcd {
    Etcd {
        endpoints: vec![Endpoint::parse("https://127.0.0.1:2379").unwrap()],
        prefix: "/warmspare/t".into(),
        ttl: Duration::from_secs(30),
        loop_wait: Duration::from_secs(10),
        retry_timeout: Duration::from_secs(10),
        ca,
        cert,
        key,
        max_lag_on_failover: Duration::from_secs(60),
        failsafe: false,
    }
}

fn message(r: Result<Option<TlsConnector>, EtcdError>) -> String {
    match r {
        Ok(_) => panic!("the TLS files were accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn no_ca_means_no_tls() {
    assert!(connector(&etcd(None, None, None)).unwrap().is_none());
}

#[test]
fn a_file_that_cannot_be_read_or_holds_no_pem_names_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pem");
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").unwrap();

    let e = message(connector(&etcd(Some(missing.clone()), None, None)));
    assert!(e.contains("etcd.ca: cannot read") && e.contains("missing.pem"), "{e}");
    let e = message(connector(&etcd(Some(junk.clone()), None, None)));
    assert!(e.contains("etcd.ca:") && e.contains("no PEM certificate"), "{e}");
}
