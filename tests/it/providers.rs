//! Provider webhooks as the providers call them, without the API token: an SES
//! notification through SNS, verified against a signing certificate fetched over TLS
//! from "AWS" (a test server for sns.us-east-1.amazonaws.com under a test-only trust
//! root), a subscription confirmed, forgeries refused; Mailgun's HMAC with a replay
//! refused; Postmark's basic auth.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::smtp::TestCa;
use crate::support::{SmtpServer, TestServer, client_builder};

const SNS_HOST: &str = "sns.us-east-1.amazonaws.com";
const TOPIC: &str = "arn:aws:sns:us-east-1:123456789012:ses-bounces";
const CERT_PATH: &str = "/SimpleNotificationService-test.pem";

/// AWS's side: an SNS signing key and certificate, served over HTTPS as
/// sns.us-east-1.amazonaws.com, which also counts subscription confirmations.
struct Aws {
    key: rsa::RsaPrivateKey,
    address: std::net::SocketAddr,
    ca_der: Vec<u8>,
    confirmed: Arc<AtomicUsize>,
}

impl Aws {
    async fn start() -> Aws {
        use rsa::pkcs8::EncodePrivateKey;
        let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap();
        let pem = key.to_pkcs8_pem(Default::default()).unwrap();
        let signing_pair = rcgen::KeyPair::from_pem_and_sign_algo(&pem, &rcgen::PKCS_RSA_SHA256).unwrap();
        let signing_cert = rcgen::CertificateParams::new(vec!["sns.amazonaws.com".to_string()])
            .unwrap()
            .self_signed(&signing_pair)
            .unwrap()
            .pem();
        let ca = TestCa::new(&[SNS_HOST]);
        let files = tempfile::tempdir().unwrap();
        let (cert, tls_key) = (files.path().join("c.pem"), files.path().join("k.pem"));
        std::fs::write(&cert, &ca.cert_pem).unwrap();
        std::fs::write(&tls_key, &ca.key_pem).unwrap();
        let tls = letterbox::tls::server_config(cert.to_str().unwrap(), tls_key.to_str().unwrap()).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let ca_file = files.path().join("ca.pem");
        std::fs::write(&ca_file, &ca.ca_pem).unwrap();
        let ca_der = letterbox::tls::load_pem_certificates(ca_file.to_str().unwrap()).unwrap()[0].to_vec();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let confirmed = Arc::new(AtomicUsize::new(0));
        let count = confirmed.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, signing_cert, count) = (acceptor.clone(), signing_cert.clone(), count.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut request = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    let line = String::from_utf8_lossy(&request)
                        .lines()
                        .next()
                        .unwrap_or("")
                        .to_string();
                    let (status, body) = if line.starts_with(&format!("GET {CERT_PATH} ")) {
                        ("200 OK", signing_cert)
                    } else if line.starts_with("GET /confirm?Token=") {
                        count.fetch_add(1, Ordering::SeqCst);
                        ("200 OK", "<ConfirmSubscriptionResponse/>".to_string())
                    } else {
                        ("404 Not Found", String::new())
                    };
                    let response = format!(
                        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = tls.write_all(response.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        std::mem::forget(files);
        Aws {
            key,
            address,
            ca_der,
            confirmed,
        }
    }

    /// An SNS message of `kind` carrying `message`, signed as AWS signs
    /// (`version` "1": SHA1withRSA, "2": SHA256withRSA).
    fn envelope(&self, kind: &str, message: &str, version: &str) -> Value {
        let mut envelope = json!({
            "Type": kind,
            "MessageId": format!("m-{}", rand_id()),
            "TopicArn": TOPIC,
            "Message": message,
            "Timestamp": "2026-12-06T21:00:00.000Z",
            "SignatureVersion": version,
            "SigningCertURL": format!("https://{SNS_HOST}{CERT_PATH}"),
        });
        let mut fields = vec!["Message", "MessageId"];
        if kind == "Notification" {
            fields.extend(["Timestamp", "TopicArn", "Type"]);
        } else {
            envelope["SubscribeURL"] = json!(format!("https://{SNS_HOST}/confirm?Token=t0k"));
            envelope["Token"] = json!("t0k");
            fields.extend(["SubscribeURL", "Timestamp", "Token", "TopicArn", "Type"]);
        }
        let text: String = fields
            .iter()
            .map(|f| format!("{f}\n{}\n", envelope[f].as_str().unwrap()))
            .collect();
        envelope["Signature"] = json!(self.sign(text.as_bytes(), version));
        envelope
    }

    fn sign(&self, text: &[u8], version: &str) -> String {
        use rsa::signature::{SignatureEncoding, Signer};
        let signature = match version {
            "1" => rsa::pkcs1v15::SigningKey::<sha1::Sha1>::new(self.key.clone())
                .sign(text)
                .to_vec(),
            _ => rsa::pkcs1v15::SigningKey::<sha2_010::Sha256>::new(self.key.clone())
                .sign(text)
                .to_vec(),
        };
        base64::engine::general_purpose::STANDARD.encode(signature)
    }
}

fn rand_id() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

/// A POST as a provider makes it: no API token.
async fn post(base: &str, path: &str, body: Vec<u8>, headers: &[(&str, String)]) -> (u16, Value) {
    let mut request = client_builder()
        .build()
        .unwrap()
        .post(format!("{base}{path}"))
        .body(body);
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// A newsletter with these people, a letter sent to them; their ids and Message-IDs.
async fn sent_to(server: &TestServer, smtp: &SmtpServer, names: &[&str]) -> Vec<(u64, String)> {
    let api = &server.api;
    let newsletter = api.newsletter().await;
    let people: Vec<_> = names
        .iter()
        .map(|n| json!({ "email": format!("{n}@example.org") }))
        .collect();
    api.add_subscribers(newsletter, json!(people)).await;
    let letter = api
        .letter(newsletter, json!({ "subject": "Hi", "text": "Hi\r\n" }))
        .await;
    let job = api.send(letter, json!({})).await;
    api.wait_job(job, Duration::from_secs(60)).await;
    let ids = api.subscriber_ids(newsletter).await;
    names
        .iter()
        .map(|n| {
            let email = format!("{n}@example.org");
            let id = ids[&email];
            let message = smtp
                .received()
                .into_iter()
                .find(|m| m.recipients[0] == email)
                .unwrap();
            (id, message.header("Message-ID").unwrap())
        })
        .collect()
}

async fn status_of(server: &TestServer, id: u64) -> String {
    let (_, s) = server.api.get(&format!("/v1/subscribers/{id}")).await;
    s["status"].as_str().unwrap().to_string()
}

async fn count_bounces(server: &TestServer) -> usize {
    let (_, page) = server.api.get("/v1/bounces?limit=1000").await;
    page["items"].as_array().unwrap().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ses_notifications_are_verified_against_the_signing_certificate() {
    let aws = Aws::start().await;
    let smtp = SmtpServer::start().await;
    let server = TestServer::with_smtp(&smtp, |config| {
        config.providers.ses_topics = vec![TOPIC.into()];
        config.providers.sns_fetch = letterbox::providers::CertFetch {
            extra_roots: vec![aws.ca_der.clone()],
            resolve: vec![(SNS_HOST.into(), aws.address)],
        };
    })
    .await;
    let base = server.api.base.clone();
    let sent = sent_to(&server, &smtp, &["ann", "bob"]).await;
    let ((ann, ann_message), (bob, _)) = (sent[0].clone(), sent[1].clone());
    let text = [("Content-Type", "text/plain; charset=UTF-8".to_string())];

    // SNS asks to subscribe: the request is verified, then confirmed.
    let confirmation = aws.envelope("SubscriptionConfirmation", "You have chosen to subscribe", "1");
    let (status, body) = post(
        &base,
        "/webhooks/ses",
        confirmation.to_string().into_bytes(),
        &text,
    )
    .await;
    assert_eq!((status, &body), (200, &json!({ "recorded": 0 })));
    assert_eq!(aws.confirmed.load(Ordering::SeqCst), 1);

    // A permanent bounce quoting ann's Message-ID (SignatureVersion 1, SHA1).
    let bounce = json!({
        "notificationType": "Bounce",
        "bounce": { "bounceType": "Permanent", "bounceSubType": "General", "bouncedRecipients": [
            { "emailAddress": "ann@example.org", "action": "failed", "status": "5.1.1",
              "diagnosticCode": "smtp; 550 5.1.1 user unknown" } ] },
        "mail": { "messageId": "0100-ses", "headers": [ { "name": "Message-ID", "value": ann_message } ] },
    });
    let signed = aws.envelope("Notification", &bounce.to_string(), "1");
    let (status, body) = post(&base, "/webhooks/ses", signed.to_string().into_bytes(), &text).await;
    assert_eq!((status, &body), (200, &json!({ "recorded": 1 })));
    assert_eq!(status_of(&server, ann).await, "bounced");
    let (_, reports) = server.api.get(&format!("/v1/subscribers/{ann}/bounces")).await;
    let r = &reports["items"][0];
    assert_eq!(
        (r["source"].as_str(), r["status"].as_str()),
        (Some("ses"), Some("5.1.1")),
        "{r}"
    );
    assert!(r["job_id"].is_u64(), "attributed to the letter's job: {r}");
    assert!(r["raw"].as_str().unwrap().contains("0100-ses"), "{r}");

    // A complaint by address alone (SignatureVersion 2, SHA256).
    let complaint = json!({
        "notificationType": "Complaint",
        "complaint": { "complainedRecipients": [ { "emailAddress": "bob@example.org" } ], "complaintFeedbackType": "abuse" },
        "mail": { "messageId": "0100-ses-2" },
    });
    let signed = aws.envelope("Notification", &complaint.to_string(), "2");
    let (status, body) = post(&base, "/webhooks/ses", signed.to_string().into_bytes(), &text).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(status_of(&server, bob).await, "complained");
    let recorded = count_bounces(&server).await;

    // Forgeries change nothing: a message altered after signing, a certificate from
    // another host, a topic not configured, no signature at all.
    let mut altered = aws.envelope("Notification", &complaint.to_string(), "2");
    altered["Message"] = json!(complaint.to_string().replace("bob@", "carl@"));
    let mut elsewhere = aws.envelope("Notification", &complaint.to_string(), "2");
    elsewhere["SigningCertURL"] = json!("https://evil.example/sns.us-east-1.amazonaws.com/cert.pem");
    let mut topic = aws.envelope("Notification", &complaint.to_string(), "2");
    topic["TopicArn"] = json!("arn:aws:sns:us-east-1:999999999999:other");
    let mut unsigned = aws.envelope("Notification", &complaint.to_string(), "2");
    unsigned["Signature"] = json!("");
    for (what, forged) in [
        ("altered", altered),
        ("elsewhere", elsewhere),
        ("topic", topic),
        ("unsigned", unsigned),
    ] {
        let (status, body) = post(&base, "/webhooks/ses", forged.to_string().into_bytes(), &text).await;
        assert_eq!(status, 401, "{what}: {body}");
        assert!(body["detail"].as_str().is_some(), "{what}: {body}");
    }
    let (status, _) = post(&base, "/webhooks/ses", b"{not json".to_vec(), &text).await;
    assert_eq!(status, 400);
    assert_eq!(
        count_bounces(&server).await,
        recorded,
        "nothing recorded by forgeries"
    );
    // Providers not configured have no endpoint.
    let (status, body) = post(&base, "/webhooks/mailgun", b"{}".to_vec(), &[]).await;
    assert_eq!(status, 404, "{body}");
    server.stop().await;
}

fn mailgun_body(key: &str, token: &str, event: Value) -> Vec<u8> {
    let timestamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .to_string();
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes()).unwrap();
    mac.update(format!("{timestamp}{token}").as_bytes());
    let signature = hex::encode(mac.finalize().into_bytes());
    serde_json::to_vec(&json!({
        "signature": { "timestamp": timestamp, "token": token, "signature": signature },
        "event-data": event,
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mailgun_and_postmark_webhooks_are_authenticated() {
    let smtp = SmtpServer::start().await;
    let server = TestServer::with_smtp(&smtp, |config| {
        config.providers.mailgun_signing_key = Some("mg-signing-key".into());
        config.providers.postmark_auth = Some("hooks:correct-horse-battery".into());
    })
    .await;
    let base = server.api.base.clone();
    let sent = sent_to(&server, &smtp, &["carl", "dan", "eve"]).await;
    let ((carl, carl_message), (dan, _), (eve, _)) = (sent[0].clone(), sent[1].clone(), sent[2].clone());

    // Mailgun: a permanent failure quoting carl's Message-ID (without brackets, as
    // Mailgun writes it).
    let failed = json!({
        "event": "failed", "severity": "permanent", "reason": "bounce", "recipient": "carl@example.org",
        "delivery-status": { "code": 550, "message": "5.1.1 The email account that you tried to reach does not exist", "description": "" },
        "message": { "headers": { "message-id": carl_message.trim_matches(|c| c == '<' || c == '>') } },
    });
    let body = mailgun_body("mg-signing-key", "token-1", failed.clone());
    let (status, answer) = post(&base, "/webhooks/mailgun", body.clone(), &[]).await;
    assert_eq!((status, &answer), (200, &json!({ "recorded": 1 })));
    assert_eq!(status_of(&server, carl).await, "bounced");
    let recorded = count_bounces(&server).await;
    let (status, answer) = post(&base, "/webhooks/mailgun", body, &[]).await;
    assert_eq!(status, 401, "a replay: {answer}");
    let forged = mailgun_body("guessed-key", "token-2", failed);
    let (status, _) = post(&base, "/webhooks/mailgun", forged, &[]).await;
    assert_eq!(status, 401);
    assert_eq!(count_bounces(&server).await, recorded);

    // Postmark: basic auth from the webhook URL.
    let basic = |credentials: &str| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(credentials)
        )
    };
    let hard = json!({ "RecordType": "Bounce", "Type": "HardBounce", "TypeCode": 1, "Email": "dan@example.org",
        "Description": "The server was unable to deliver your message (ex: unknown user, mailbox not found).",
        "Details": "smtp;550 5.1.1 The email account that you tried to reach does not exist." });
    let body = serde_json::to_vec(&hard).unwrap();
    let (status, _) = post(
        &base,
        "/webhooks/postmark",
        body.clone(),
        &[("Authorization", basic("hooks:wrong"))],
    )
    .await;
    assert_eq!(status, 401);
    let (status, _) = post(&base, "/webhooks/postmark", body.clone(), &[]).await;
    assert_eq!(status, 401);
    assert_eq!(status_of(&server, dan).await, "active");
    let auth = [("Authorization", basic("hooks:correct-horse-battery"))];
    let (status, answer) = post(&base, "/webhooks/postmark", body, &auth).await;
    assert_eq!((status, &answer), (200, &json!({ "recorded": 1 })));
    assert_eq!(status_of(&server, dan).await, "bounced");
    let (_, reports) = server.api.get(&format!("/v1/subscribers/{dan}/bounces")).await;
    assert_eq!(reports["items"][0]["status"], "5.1.1", "{reports}");
    let spam = json!({ "RecordType": "SpamComplaint", "Type": "SpamComplaint", "Email": "eve@example.org" });
    let (status, _) = post(
        &base,
        "/webhooks/postmark",
        serde_json::to_vec(&spam).unwrap(),
        &auth,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(status_of(&server, eve).await, "complained");
    // SES is off here.
    let (status, _) = post(&base, "/webhooks/ses", b"{}".to_vec(), &[]).await;
    assert_eq!(status, 404);
    server.stop().await;
}
