//! TLS to SMTP: STARTTLS (`?tls=required`) and implicit TLS (`smtps://`), each with AUTH,
//! against the test SMTP server speaking TLS with a CA and certificate made here. A
//! certificate from a CA letterbox does not trust, or for another name, is refused;
//! `tls_ca` trusts a private CA and `tls_verify_hostname=false` accepts another name.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::smtp::TestCa;
use crate::support::{SmtpServer, TestServer};

/// Sends one letter to `n` subscribers through `url`, one attempt each; the job when done.
async fn send_through(url: String, n: usize) -> Value {
    let data = tempfile::tempdir().unwrap();
    let mut config = letterbox::Config::new(data.path());
    config.smtp = Some(letterbox::Config::smtp_url(url));
    let server = TestServer::start_with(config, data).await;
    let api = &server.api;
    let newsletter = api.newsletter().await;
    let people: Vec<_> = (0..n)
        .map(|i| json!({ "email": format!("r{i}@example.org") }))
        .collect();
    api.add_subscribers(newsletter, json!(people)).await;
    let letter = api
        .letter(newsletter, json!({ "subject": "S", "text": "T" }))
        .await;
    let job = api.send(letter, json!({ "retry": { "max_attempts": 1 } })).await;
    let mut done = api.wait_job(job, Duration::from_secs(60)).await;
    let (_, failed) = api
        .get(&format!("/v1/jobs/{job}/deliveries?state=failed&limit=1"))
        .await;
    done["first_failure"] = failed["items"][0]["reason"].clone();
    server.stop().await;
    done
}

/// The URL of a TLS test server up to its query, ready for more parameters:
/// `smtps://` for implicit TLS, else `smtp://` with STARTTLS required.
fn tls_url(implicit: bool, userinfo: &str, port: u16) -> String {
    if implicit {
        format!("smtps://{userinfo}localhost:{port}?")
    } else {
        format!("smtp://{userinfo}localhost:{port}?tls=required&")
    }
}

fn ca_file(ca: &TestCa) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &ca.ca_pem).unwrap();
    file
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_and_implicit_tls_with_auth_deliver() {
    let ca = TestCa::new(&["localhost"]);
    let ca_path = ca_file(&ca);
    let ca_path = ca_path.path().display();
    for implicit in [false, true] {
        let smtp = SmtpServer::with_tls(&ca, implicit, Some(("me", "s3cret"))).await;
        let url = format!("{}tls_ca={ca_path}", tls_url(implicit, "me:s3cret@", smtp.port));
        let done = send_through(url, 20).await;
        assert_eq!(done["counts"]["delivered"], 20, "implicit={implicit}: {done}");
        assert_eq!(smtp.received().len(), 20);
        let (tls, logins) = smtp.tls_and_logins();
        assert!(
            tls >= 1 && logins == tls,
            "implicit={implicit}: {tls} TLS sessions, {logins} logins"
        );

        // A wrong password is refused at AUTH, over TLS.
        let url = format!("{}tls_ca={ca_path}", tls_url(implicit, "me:wrong@", smtp.port));
        let done = send_through(url, 1).await;
        assert_eq!(done["counts"]["failed"], 1, "{done}");
        assert!(done["first_failure"].as_str().unwrap().contains("AUTH"), "{done}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_that_do_not_match_are_refused_unless_the_user_opts_out() {
    // A certificate for another name than the one letterbox connects to.
    let ca = TestCa::new(&["mail.example.test"]);
    let ca_path = ca_file(&ca);
    let ca_path = ca_path.path().display();
    for implicit in [false, true] {
        let smtp = SmtpServer::with_tls(&ca, implicit, None).await;
        let base = tls_url(implicit, "", smtp.port);

        // The CA is not trusted by default.
        let done = send_through(base.clone(), 1).await;
        assert_eq!(done["counts"]["failed"], 1, "implicit={implicit}: {done}");
        let reason = done["first_failure"].as_str().unwrap();
        assert!(reason.contains("certificate"), "implicit={implicit}: {reason}");

        // Trusted CA, wrong name: still refused.
        let done = send_through(format!("{base}tls_ca={ca_path}"), 1).await;
        assert_eq!(done["counts"]["failed"], 1, "implicit={implicit}: {done}");
        let reason = done["first_failure"].as_str().unwrap();
        assert!(
            reason.contains("certificate") && reason.to_ascii_lowercase().contains("name"),
            "implicit={implicit}: {reason}"
        );
        assert!(smtp.received().is_empty());

        // The explicit opt-out accepts it.
        let url = format!("{base}tls_ca={ca_path}&tls_verify_hostname=false");
        let done = send_through(url, 3).await;
        assert_eq!(done["counts"]["delivered"], 3, "implicit={implicit}: {done}");
        assert_eq!(smtp.received().len(), 3);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_tls_setting_stops_the_start_with_its_name() {
    let data = tempfile::tempdir().unwrap();
    let mut config = letterbox::Config::new(data.path());
    config.smtp = Some(letterbox::Config::smtp_url(
        "smtp://localhost:25?tls=required&tls_ca=/nonexistent/ca.pem",
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let error = letterbox::run(listener, config, std::future::pending())
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("tls_ca /nonexistent/ca.pem"), "{error}");
}

/// Throughput over plain TCP, STARTTLS and implicit TLS to the same test server, side
/// by side: all three paths set TCP_NODELAY, so TLS costs only its encryption. A
/// measurement, not a check: `cargo test --release tls_throughput -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn tls_throughput() {
    const N: usize = 20_000;
    let ca = TestCa::new(&["localhost"]);
    let ca_path = ca_file(&ca);
    let ca_path = ca_path.path().display();
    let plain = SmtpServer::start().await;
    let starttls = SmtpServer::with_tls(&ca, false, None).await;
    let implicit = SmtpServer::with_tls(&ca, true, None).await;
    let runs = [
        ("plain", format!("smtp://localhost:{}?pool=8", plain.port)),
        (
            "starttls",
            format!("{}pool=8&tls_ca={ca_path}", tls_url(false, "", starttls.port)),
        ),
        (
            "implicit",
            format!("{}pool=8&tls_ca={ca_path}", tls_url(true, "", implicit.port)),
        ),
    ];
    for round in 0..2 {
        for (name, url) in &runs {
            let started = std::time::Instant::now();
            let done = send_through(url.clone(), N).await;
            let secs = started.elapsed().as_secs_f64();
            assert_eq!(done["counts"]["delivered"], N, "{done}");
            eprintln!(
                "round {round} {name}: {N} messages in {secs:.2} s (incl. start and import), {:.0} msg/s",
                N as f64 / secs
            );
        }
    }
}
