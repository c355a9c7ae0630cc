//! The etcd client over TLS with client certificates, against three real
//! etcd members that demand them (`--client-cert-auth`), with certificates
//! made by the real `openssl`.

use std::path::PathBuf;
use std::time::Duration;

use warmspare_shared::config::{Endpoint, Etcd};
use warmspare_shared::etcd::{Client, EtcdError, TxnOutcome};

use warmspare_tests::{ClusterOptions, EtcdCluster, TestCluster, TestPki};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// An `[etcd]` table for `etcd` with the given TLS files.
fn table(etcd: &EtcdCluster, ca: PathBuf, cert: Option<PathBuf>, key: Option<PathBuf>) -> Etcd {
    Etcd {
        endpoints: etcd.endpoints().iter().map(|e| Endpoint::parse(e).unwrap()).collect(),
        prefix: "/warmspare/tls".into(),
        ttl: Duration::from_secs(30),
        loop_wait: Duration::from_secs(10),
        retry_timeout: Duration::from_secs(10),
        ca: Some(ca),
        cert,
        key,
        max_lag_on_failover: Duration::from_secs(60),
        failsafe: false,
    }
}

fn client(t: &Etcd) -> Client {
    Client::new(t, Duration::from_secs(5)).unwrap()
}

#[test]
fn the_client_works_with_the_right_client_certificate_and_fails_clearly_without() {
    let pki = TestPki::new();
    let etcd = EtcdCluster::start_tls(&pki);
    assert!(etcd.endpoints().iter().all(|e| e.starts_with("https://")));
    let rt = runtime();
    let (ca, cert, key) = (pki.path("ca.pem"), pki.path("client.pem"), pki.path("client.key"));

    // The right CA and client certificate: the role's transaction and the
    // members' status work.
    let good = client(&table(&etcd, ca.clone(), Some(cert.clone()), Some(key.clone())));
    rt.block_on(async {
        let lease = good.grant(Duration::from_secs(30)).await.unwrap();
        assert_eq!(good.take("a", lease, 0).await.unwrap(), TxnOutcome::Done(1));
        assert_eq!(good.role().await.unwrap().epoch, 1);
        for h in good.health().await {
            assert!(h.error.is_none() && h.has_leader, "{h:?}");
        }
    });

    // Without a client certificate, with one signed by another CA, or
    // trusting another CA: refused, saying so.
    let cases = [
        ("no client certificate", table(&etcd, ca.clone(), None, None), "alert"),
        (
            "a client certificate of another CA",
            table(
                &etcd,
                ca.clone(),
                Some(pki.path("wrong-client.pem")),
                Some(pki.path("wrong-client.key")),
            ),
            "alert",
        ),
        (
            "another CA trusted",
            table(&etcd, pki.path("wrong-ca.pem"), Some(cert.clone()), Some(key.clone())),
            "UnknownIssuer",
        ),
    ];
    for (what, t, says) in cases {
        let err: EtcdError = rt.block_on(client(&t).role()).unwrap_err();
        let text = err.to_string();
        assert!(text.contains(says), "{what}: {text}");
        let health = rt.block_on(client(&t).health());
        assert!(health.iter().all(|h| h.error.is_some()), "{what}: {health:?}");
    }
}

#[test]
fn tls_files_that_cannot_be_used_name_their_key() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.pem");
    std::fs::write(
        &junk,
        "-----BEGIN CERTIFICATE-----\nnot base64 !!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let endpoints = vec![Endpoint::parse("https://127.0.0.1:1").unwrap()];
    let t = |ca: PathBuf, cert: PathBuf, key: PathBuf| Etcd {
        endpoints: endpoints.clone(),
        prefix: "/warmspare/tls".into(),
        ttl: Duration::from_secs(30),
        loop_wait: Duration::from_secs(10),
        retry_timeout: Duration::from_secs(10),
        ca: Some(ca),
        cert: Some(cert),
        key: Some(key),
        max_lag_on_failover: Duration::from_secs(60),
        failsafe: false,
    };
    let (ca, cert, key) = (pki.path("ca.pem"), pki.path("client.pem"), pki.path("client.key"));
    let missing = dir.path().join("missing.pem");
    let cases = [
        (t(missing.clone(), cert.clone(), key.clone()), "etcd.ca: cannot read"),
        (t(junk.clone(), cert.clone(), key.clone()), "etcd.ca:"),
        (t(ca.clone(), missing.clone(), key.clone()), "etcd.cert: cannot read"),
        (t(ca.clone(), junk.clone(), key.clone()), "etcd.cert:"),
        (t(ca.clone(), key.clone(), key.clone()), "etcd.cert:"),
        (t(ca.clone(), cert.clone(), missing.clone()), "etcd.key: cannot read"),
        (t(ca.clone(), cert.clone(), cert.clone()), "etcd.key:"),
        // A key that is not the certificate's.
        (t(ca.clone(), cert.clone(), pki.path("server.key")), "etcd.key"),
    ];
    for (table, says) in cases {
        match Client::new(&table, Duration::from_secs(1)) {
            Ok(_) => panic!("accepted: {table:?}"),
            Err(e) => assert!(e.to_string().contains(says), "{says}: {e}"),
        }
    }
}

#[test]
fn check_reports_etcd_health_over_tls() {
    let pki = TestPki::new();
    let etcd = EtcdCluster::start_tls(&pki);
    let run_check = |cert: &str, key: &str| {
        let tls = format!(
            "ca = {:?}\ncert = {:?}\nkey = {:?}",
            pki.path("ca.pem"),
            pki.path(cert),
            pki.path(key)
        );
        let c = TestCluster::new(ClusterOptions {
            nodes: vec!["a"],
            extra: etcd.toml(&tls),
            ..Default::default()
        });
        c.check("a", &[])
    };
    let (code, text) = run_check("client.pem", "client.key");
    assert_eq!(code, Some(0), "{text}");
    for e in etcd.endpoints() {
        assert!(text.contains(&format!("etcd {e}: ok (etcd 3.")), "{e}: {text}");
    }
    assert!(text.contains("3 of 3 members healthy, quorum"), "{text}");

    let (code, text) = run_check("wrong-client.pem", "wrong-client.key");
    assert_eq!(code, Some(3), "{text}");
    assert!(text.contains("0 of 3 members healthy, NO quorum"), "{text}");
}
