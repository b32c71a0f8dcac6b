//! PostgreSQL over TLS: a cluster of the test's own started with `ssl=on` and a
//! certificate made here (for `localhost`, signed by a CA made here). `verify-full`
//! connects with the right CA and refuses a wrong host name or an unknown CA, naming the
//! certificate; `verify-ca` accepts the name; `require` and the default `prefer`
//! encrypt; `disable` does not; and a real node sends over `verify-full`. The
//! PostgreSQL pass's test (the other tests of that pass run over TLS too: see
//! `.ci/with-postgres`).

use std::time::Duration;

use letterbox::store::{Location, Store};
use serde_json::json;

use crate::support::pg::PgCluster;
use crate::support::{SmtpServer, TestServer};

fn backend_is_postgres() -> bool {
    std::env::var("LETTERBOX_TEST_BACKEND").as_deref() == Ok("postgres")
}

/// A CA named `ca_name` (its certificate in PEM) and a certificate it signed for
/// `names` (PEM, and its key in PEM).
fn certificates(ca_name: &str, names: &[&str]) -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, ca_name);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let cert = rcgen::CertificateParams::new(names)
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    (ca.pem(), cert.pem(), key.serialize_pem())
}

/// Whether the session `url` opens is encrypted, as the server sees it.
async fn encrypted(url: &str) -> Result<bool, String> {
    let (client, _driver) = letterbox::store::postgres::connect(url)
        .await
        .map_err(|e| e.to_string())?;
    let row = client
        .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
        .await
        .map_err(|e| e.to_string())?;
    Ok(row.get(0))
}

#[tokio::test]
async fn sslmode_means_what_it_means_to_libpq() {
    if !backend_is_postgres() {
        eprintln!("skipped: PostgreSQL over TLS is the PostgreSQL pass's test");
        return;
    }
    let (ca, cert, key) = certificates("letterbox test database CA", &["localhost"]);
    // Another CA, by another name (one by the same name is taken for the issuer and
    // fails on the signature instead: `BadSignature`).
    let (other_ca, _, _) = certificates("another CA", &["localhost"]);
    let Some(cluster) = PgCluster::start_tls(&cert, &key) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca).unwrap();
    let other_ca_file = dir.path().join("other-ca.pem");
    std::fs::write(&other_ca_file, other_ca).unwrap();
    let (ca_file, other_ca_file) = (ca_file.display().to_string(), other_ca_file.display().to_string());

    // verify-full with the right CA and the name on the certificate: the store opens
    // (pool, migrations) and the session is encrypted.
    let full = cluster.url_via("localhost", &format!("sslmode=verify-full&sslrootcert={ca_file}"));
    Store::open(Location::Postgres(&full)).await.unwrap();
    assert_eq!(encrypted(&full).await, Ok(true));

    // The wrong name: refused, and the reason names the certificate and the name.
    let wrong_name = cluster.url_via("127.0.0.1", &format!("sslmode=verify-full&sslrootcert={ca_file}"));
    let refused = Store::open(Location::Postgres(&wrong_name))
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        refused.contains("certificate") && refused.contains("127.0.0.1"),
        "{refused}"
    );
    // A CA that did not sign it: refused, naming the certificate.
    let unknown_ca = cluster.url_via(
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={other_ca_file}"),
    );
    let refused_ca = Store::open(Location::Postgres(&unknown_ca))
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(refused_ca.contains("invalid peer certificate"), "{refused_ca}");
    assert!(refused_ca.contains("UnknownIssuer"), "{refused_ca}");

    // verify-ca checks the chain, not the name.
    let ca_only = cluster.url_via("127.0.0.1", &format!("sslmode=verify-ca&sslrootcert={ca_file}"));
    assert_eq!(encrypted(&ca_only).await, Ok(true));
    let ca_wrong = cluster.url_via(
        "127.0.0.1",
        &format!("sslmode=verify-ca&sslrootcert={other_ca_file}"),
    );
    assert!(encrypted(&ca_wrong).await.is_err());
    // require encrypts without checking; so does the default (prefer) when the server
    // offers TLS; disable does not encrypt.
    assert_eq!(
        encrypted(&cluster.url_via("127.0.0.1", "sslmode=require")).await,
        Ok(true)
    );
    assert_eq!(encrypted(&cluster.admin_url()).await, Ok(true));
    assert_eq!(
        encrypted(&cluster.url_via("127.0.0.1", "sslmode=disable")).await,
        Ok(false)
    );
    // require with a CA given checks the chain, as libpq does.
    let require_other = cluster.url_via(
        "127.0.0.1",
        &format!("sslmode=require&sslrootcert={other_ca_file}"),
    );
    assert!(encrypted(&require_other).await.is_err());
    eprintln!("verify-full, wrong name: {refused}\nverify-full, unknown CA: {refused_ca}");
}

/// `require` against a server without TLS is refused; `prefer` falls back to plain.
#[tokio::test]
async fn require_refuses_a_server_without_tls_and_prefer_does_not() {
    if !backend_is_postgres() {
        eprintln!("skipped: PostgreSQL over TLS is the PostgreSQL pass's test");
        return;
    }
    let Some(cluster) = PgCluster::start() else { return };
    assert_eq!(
        encrypted(&cluster.url_via("127.0.0.1", "sslmode=prefer")).await,
        Ok(false)
    );
    let refused = encrypted(&cluster.url_via("127.0.0.1", "sslmode=require")).await;
    assert!(refused.is_err(), "{refused:?}");
}

/// A node whose database is reached over `verify-full` sends a letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_sends_over_verify_full() {
    if !backend_is_postgres() {
        eprintln!("skipped: PostgreSQL over TLS is the PostgreSQL pass's test");
        return;
    }
    let (ca, cert, key) = certificates("letterbox test database CA", &["localhost"]);
    let Some(cluster) = PgCluster::start_tls(&cert, &key) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca).unwrap();
    let admin = cluster.url_via(
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={}", ca_file.display()),
    );
    let url = letterbox::store::postgres::scratch_database(&admin)
        .await
        .unwrap();
    assert!(url.contains("sslmode=verify-full"), "{url}");

    let smtp = SmtpServer::start().await;
    let data = tempfile::tempdir().unwrap();
    let mut config = letterbox::Config::new(data.path());
    config.smtp = Some(letterbox::Config::smtp_url(smtp.url()));
    config.database_url = Some(url);
    let server = TestServer::start_with(config, data).await;
    let letter = server.api.letter_to_many("tls", 200).await;
    let job = server.api.send(letter, json!({})).await;
    let done = server.api.wait_job(job, Duration::from_secs(60)).await;
    assert_eq!(done["state"], "completed", "{done}");
    assert_eq!(done["counts"]["delivered"], 200, "{done}");
    assert_eq!(smtp.count(), 200);
    server.stop().await;
}
