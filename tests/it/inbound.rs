//! The inbound SMTP listener with real SMTP over TCP: letters go out with a VERP return
//! path, and what comes back to it (a DSN, an ARF complaint, a vacation reply, a forged
//! return path, a relay attempt, junk) is read with mail-parser and recorded, or
//! refused, as a real MTA would see it.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::support::postfix::{LOCAL_DOMAIN, Postfix};
use crate::support::smtp::TestCa;
use crate::support::{Api, SmtpServer, TestServer, emails, free_port};

const DOMAIN: &str = "bounces.example.net";

/// An SMTP client that checks each reply's code.
struct Client {
    reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
}

impl Client {
    async fn connect(port: u16) -> (Client, String) {
        let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let (read, writer) = stream.into_split();
        let mut client = Client {
            reader: BufReader::new(read),
            writer,
        };
        let greeting = client.reply().await;
        (client, greeting)
    }

    /// The whole (possibly multi-line) reply.
    async fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(Duration::from_secs(10), self.reader.read_line(&mut line))
                .await
                .expect("a reply within 10 s")
                .unwrap();
            if n == 0 {
                return all;
            }
            all.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                return all;
            }
        }
    }

    async fn command(&mut self, line: &str) -> String {
        self.writer
            .write_all(format!("{line}\r\n").as_bytes())
            .await
            .unwrap();
        self.reply().await
    }

    /// A whole transaction; the reply to the end of the message.
    async fn send(&mut self, from: &str, to: &str, message: &str) -> String {
        self.send_bytes(from, to, message.as_bytes()).await
    }

    /// The same for any bytes: lines end in CRLF on the wire (a bare CR stays inside
    /// its line) and a leading dot is doubled.
    async fn send_bytes(&mut self, from: &str, to: &str, message: &[u8]) -> String {
        assert!(
            self.command(&format!("MAIL FROM:<{from}>"))
                .await
                .starts_with("250")
        );
        let rcpt = self.command(&format!("RCPT TO:<{to}>")).await;
        if !rcpt.starts_with("250") {
            return rcpt;
        }
        assert!(self.command("DATA").await.starts_with("354"));
        let mut body = Vec::with_capacity(message.len() + 64);
        let message = message.strip_suffix(b"\n").unwrap_or(message);
        for line in message.split(|b| *b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.starts_with(b".") {
                body.push(b'.');
            }
            body.extend_from_slice(line);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(b".\r\n");
        self.writer.write_all(&body).await.unwrap();
        self.reply().await
    }
}

/// Delivers to `smtp` with the bounce domain and the listener on `port`, after `tweak`.
async fn server_with(smtp: &SmtpServer, port: u16, tweak: impl FnOnce(&mut letterbox::Config)) -> TestServer {
    TestServer::with_smtp(smtp, |config| {
        config.bounce_domain = Some(DOMAIN.into());
        config.inbound_smtp = Some(format!("127.0.0.1:{port}").parse().unwrap());
        tweak(config);
    })
    .await
}

async fn server(smtp: &SmtpServer, port: u16) -> TestServer {
    server_with(smtp, port, |_| {}).await
}

fn dsn(return_path: &str, recipient: &str, status: &str, message_id: &str) -> String {
    format!(
        "From: MAILER-DAEMON@mx.example.org\r\n\
To: {return_path}\r\n\
Subject: Undelivered Mail Returned to Sender\r\n\
Auto-Submitted: auto-replied\r\n\
MIME-Version: 1.0\r\n\
Content-Type: multipart/report; report-type=delivery-status; boundary=\"B\"\r\n\
\r\n\
--B\r\n\
Content-Type: text/plain\r\n\
\r\n\
I'm sorry to have to inform you that your message could not be delivered.\r\n\
--B\r\n\
Content-Type: message/delivery-status\r\n\
\r\n\
Reporting-MTA: dns; mx.example.org\r\n\
Arrival-Date: Sun, 6 Dec 2026 21:00:00 +0000\r\n\
\r\n\
Final-Recipient: rfc822; {recipient}\r\n\
Original-Recipient: rfc822;{recipient}\r\n\
Action: failed\r\n\
Status: {status}\r\n\
Remote-MTA: dns; mx.example.org\r\n\
Diagnostic-Code: smtp; 550 {status} <{recipient}>: Recipient address\r\n\
\x20   rejected: User unknown in local recipient table\r\n\
\r\n\
--B\r\n\
Content-Type: text/rfc822-headers\r\n\
\r\n\
From: Weekly <news@example.com>\r\n\
To: {recipient}\r\n\
Subject: Hello\r\n\
Message-ID: <{message_id}>\r\n\
\r\n\
--B--\r\n"
    )
}

fn arf(to_address: &str, message_id: &str) -> String {
    format!(
        "From: feedback@isp.example\r\n\
To: abuse@{DOMAIN}\r\n\
Subject: FW: Hello\r\n\
MIME-Version: 1.0\r\n\
Content-Type: multipart/report; report-type=feedback-report; boundary=\"F\"\r\n\
\r\n\
--F\r\n\
Content-Type: text/plain\r\n\
\r\n\
This is an email abuse report for an email message received from IP 192.0.2.1.\r\n\
--F\r\n\
Content-Type: message/feedback-report\r\n\
\r\n\
Feedback-Type: abuse\r\n\
User-Agent: SomeGenerator/1.0\r\n\
Version: 1\r\n\
Original-Mail-From: <somebody@example.com>\r\n\
Arrival-Date: Thu, 8 Mar 2005 14:00:00 EDT\r\n\
Reported-Domain: example.com\r\n\
\r\n\
--F\r\n\
Content-Type: message/rfc822\r\n\
Content-Disposition: inline\r\n\
\r\n\
From: Weekly <news@example.com>\r\n\
To: {to_address}\r\n\
Subject: Hello\r\n\
Message-ID: <{message_id}>\r\n\
\r\n\
Hi!\r\n\
--F--\r\n"
    )
}

/// Every report of a subscriber, newest first.
async fn reports(api: &Api, id: u64) -> Vec<Value> {
    let (status, page) = api.get(&format!("/v1/subscribers/{id}/bounces")).await;
    assert_eq!(status, 200, "{page}");
    page["items"].as_array().unwrap().clone()
}

async fn status_of(api: &Api, id: u64) -> String {
    let (_, s) = api.get(&format!("/v1/subscribers/{id}")).await;
    s["status"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_comes_back_to_the_return_path_is_read_and_recorded() {
    let smtp = SmtpServer::start().await;
    let port = free_port();
    let server = server(&smtp, port).await;
    let api = &server.api;
    let newsletter = api.newsletter().await;
    let people: Vec<_> = ["ann", "bob", "cat", "dan", "eve"]
        .iter()
        .map(|n| json!({ "email": format!("{n}@example.org") }))
        .collect();
    api.add_subscribers(newsletter, json!(people)).await;
    let letter = api
        .letter(newsletter, json!({ "subject": "Hello", "text": "Hi\r\n" }))
        .await;
    let job = api.send(letter, json!({})).await;
    api.wait_job(job, Duration::from_secs(60)).await;
    let ids = api.subscriber_ids(newsletter).await;
    let id = |name: &str| ids[&format!("{name}@example.org")];
    // Each message went out with its own authenticated return path; From is unchanged.
    let mut return_paths = std::collections::HashMap::new();
    for message in smtp.received() {
        let to = message.recipients[0].clone();
        let from = message.mail_from.clone();
        assert!(
            from.starts_with("b-") && from.ends_with(&format!("@{DOMAIN}")),
            "{from}"
        );
        assert_eq!(message.header("From").unwrap(), "Weekly <news@example.com>");
        return_paths.insert(to, (from, message.header("Message-ID").unwrap()));
    }
    assert_eq!(return_paths.len(), 5);
    let (ann_path, ann_id) = return_paths["ann@example.org"].clone();

    let (mut client, greeting) = Client::connect(port).await;
    assert!(greeting.starts_with("220 "), "{greeting}");
    let ehlo = client.command("EHLO mx.example.org").await;
    assert!(ehlo.contains("SIZE "), "{ehlo}");

    // A DSN to ann's return path: a hard bounce, Postfix's words kept.
    let ann_id = ann_id.trim_matches(|c| c == '<' || c == '>').to_string();
    let answer = client
        .send(
            "",
            &ann_path,
            &dsn(&ann_path, "ann@example.org", "5.1.1", &ann_id),
        )
        .await;
    assert!(answer.starts_with("250"), "{answer}");
    assert_eq!(status_of(api, id("ann")).await, "bounced");
    let r = &reports(api, id("ann")).await[0];
    assert_eq!(
        (r["kind"].as_str(), r["source"].as_str()),
        (Some("hard"), Some("inbound"))
    );
    assert_eq!(r["status"], "5.1.1");
    assert_eq!(r["job_id"], job);
    assert!(
        r["diagnostic"]
            .as_str()
            .unwrap()
            .contains("User unknown in local recipient table"),
        "{r}"
    );
    assert!(
        r["raw"]
            .as_str()
            .unwrap()
            .contains("Reporting-MTA: dns; mx.example.org")
    );

    // A DSN without a return path, found by the Message-ID of the letter it quotes.
    let (_, bob_id) = return_paths["bob@example.org"].clone();
    let bob_id = bob_id.trim_matches(|c| c == '<' || c == '>').to_string();
    let to = format!("postmaster@{DOMAIN}");
    let answer = client
        .send("", &to, &dsn(&to, "bob@example.org", "5.2.1", &bob_id))
        .await;
    assert!(answer.starts_with("250"), "{answer}");
    assert_eq!(status_of(api, id("bob")).await, "bounced");

    // An ARF complaint: the address is suppressed in every newsletter.
    let (_, cat_id) = return_paths["cat@example.org"].clone();
    let cat_id = cat_id.trim_matches(|c| c == '<' || c == '>').to_string();
    let answer = client
        .send(
            "feedback@isp.example",
            &format!("abuse@{DOMAIN}"),
            &arf("cat@example.org", &cat_id),
        )
        .await;
    assert!(answer.starts_with("250"), "{answer}");
    assert_eq!(status_of(api, id("cat")).await, "complained");
    let (status, suppression) = api.get("/v1/suppressions/cat@example.org").await;
    assert_eq!(status, 200, "{suppression}");
    assert_eq!(suppression["reason"], "complained");

    // A vacation reply to dan's return path: kept, never counted.
    let (dan_path, _) = return_paths["dan@example.org"].clone();
    let vacation = format!(
        "From: dan@example.org\r\nTo: {dan_path}\r\nSubject: Out of Office: Hello\r\n\
Auto-Submitted: auto-replied\r\n\r\nI am away until Monday.\r\n"
    );
    let answer = client.send("dan@example.org", &dan_path, &vacation).await;
    assert!(answer.starts_with("250"), "{answer}");
    assert_eq!(status_of(api, id("dan")).await, "active");
    let r = &reports(api, id("dan")).await[0];
    assert_eq!(r["kind"], "ignored", "{r}");
    assert!(
        r["diagnostic"].as_str().unwrap().contains("automatic reply"),
        "{r}"
    );

    // A forged return path (eve's ids, a made-up MAC) changes nothing: kept, unattributed.
    let eve = id("eve");
    let forged = format!("b-{job}-{eve}-0123456789abcdef@{DOMAIN}");
    let answer = client
        .send(
            "",
            &forged,
            &dsn(&forged, "eve@example.net", "5.1.1", "nobody@example.net"),
        )
        .await;
    assert!(answer.starts_with("250"), "{answer}");
    assert_eq!(status_of(api, eve).await, "active");
    let (_, unattributed) = api.get("/v1/bounces?unattributed=true").await;
    assert!(
        unattributed["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["email"] == "eve@example.net"),
        "{unattributed}"
    );

    // Never a relay: mail for another domain is refused at RCPT.
    let answer = client
        .send(
            "spammer@example.com",
            "victim@example.com",
            "Subject: hi\r\n\r\nbuy\r\n",
        )
        .await;
    assert!(answer.starts_with("550 5.7.1"), "{answer}");
    assert_eq!(client.command("QUIT").await.trim(), "221 2.0.0 bye");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_limits_size_and_survives_junk() {
    let smtp = SmtpServer::start().await;
    let port = free_port();
    let server = server(&smtp, port).await;
    let (mut client, _) = Client::connect(port).await;
    client.command("EHLO x").await;
    // Declared too big, and too big in fact.
    let answer = client.command("MAIL FROM:<> SIZE=999999999").await;
    assert!(answer.starts_with("552"), "{answer}");
    let lines = format!("{}\r\n", "x".repeat(990)).repeat(11 * 1024);
    let answer = client
        .send(
            "",
            &format!("x@{DOMAIN}"),
            &format!("Subject: big\r\n\r\n{lines}"),
        )
        .await;
    assert!(answer.starts_with("552"), "{answer}");
    // One line as long as that counts the same.
    let one_line = format!("Subject: big\r\n\r\n{}\r\n", "x".repeat(11 << 20));
    let answer = client.send("", &format!("x@{DOMAIN}"), &one_line).await;
    assert!(answer.starts_with("552"), "{answer}");
    // Junk: binary bytes, no headers, a broken multipart; each kept as unattributed.
    for junk in [
        "\u{1}\u{2}\u{3} not mail at all".to_string(),
        "Content-Type: multipart/report; report-type=delivery-status; boundary=\"x\"\r\n\r\n--x\r\nbroken"
            .to_string(),
        format!("Subject: {}\r\n\r\nbody", "h".repeat(900)),
    ] {
        let answer = client.send("", &format!("x@{DOMAIN}"), &junk).await;
        assert!(answer.starts_with("250"), "{answer}");
    }
    let line = format!("NOOP {}", "a".repeat(5000));
    assert!(client.command(&line).await.starts_with("500"));
    assert!(client.command("NOOP").await.starts_with("250"), "still serving");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_is_offered_with_a_certificate() {
    letterbox::client::install_crypto_provider();
    let ca = TestCa::new(&["localhost"]);
    let smtp = SmtpServer::start().await;
    let port = free_port();
    let files = tempfile::tempdir().unwrap();
    let dir = files.path();
    let server = server_with(&smtp, port, |config| {
        let (cert, key) = (dir.join("bounces.crt"), dir.join("bounces.key"));
        std::fs::write(&cert, &ca.cert_pem).unwrap();
        std::fs::write(&key, &ca.key_pem).unwrap();
        config.inbound_tls = Some((cert, key));
    })
    .await;
    let (mut client, _) = Client::connect(port).await;
    let ehlo = client.command("EHLO mx.example.org").await;
    assert!(ehlo.contains("250-STARTTLS"), "{ehlo}");
    // Commands smuggled behind STARTTLS (CVE-2011-0411) end the connection.
    client.writer.write_all(b"STARTTLS\r\nRSET\r\n").await.unwrap();
    assert!(client.reply().await.starts_with("220"));
    assert_eq!(client.reply().await, "", "closed");

    // A real client (lettre) that requires TLS and trusts the test CA delivers a DSN.
    use lettre::AsyncTransport;
    use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
    let root = Certificate::from_pem(ca.ca_pem.as_bytes()).unwrap();
    let tls = TlsParameters::builder("localhost".into())
        .add_root_certificate(root)
        .build_rustls()
        .unwrap();
    let transport = lettre::AsyncSmtpTransport::<lettre::Tokio1Executor>::builder_dangerous("127.0.0.1")
        .port(port)
        .tls(Tls::Required(tls))
        .build();
    let to = format!("postmaster@{DOMAIN}");
    let envelope = lettre::address::Envelope::new(None, vec![to.parse().unwrap()]).unwrap();
    let message = dsn(&to, "someone@example.org", "5.1.1", "nobody@example.net");
    let response = transport.send_raw(&envelope, message.as_bytes()).await.unwrap();
    assert_eq!(response.code().to_string(), "250");
    let (_, page) = server.api.get("/v1/bounces?unattributed=true").await;
    assert_eq!(page["items"][0]["email"], "someone@example.org", "{page}");
    server.stop().await;
}

/// Real bounces from a real MTA: letterbox sends through Postfix, which relays the good
/// domain to a test SMTP server and bounces unknown local users with its own DSNs to
/// the VERP return path, delivered over SMTP to letterbox's listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postfix_bounces_come_back_through_the_listener_and_suppress_the_mailboxes() {
    let good = SmtpServer::start().await;
    let port = free_port();
    let postfix = Postfix::start(&[(DOMAIN, port), ("good.example.org", good.port)]);
    let data = tempfile::tempdir().unwrap();
    let mut config = letterbox::Config::new(data.path());
    config.smtp = Some(letterbox::Config::smtp_url(postfix.url()));
    config.bounce_domain = Some(DOMAIN.into());
    config.inbound_smtp = Some(format!("127.0.0.1:{port}").parse().unwrap());
    let server = TestServer::start_with(config, data).await;
    let api = &server.api;

    let kept = emails("ok", "good.example.org", 6);
    let gone = emails("gone", LOCAL_DOMAIN, 4);
    let newsletter = api.newsletter().await;
    let people: Vec<_> = kept.iter().chain(&gone).map(|e| json!({ "email": e })).collect();
    api.add_subscribers(newsletter, json!(people)).await;
    let ids = api.subscriber_ids(newsletter).await;
    let id_of = |email: &str| ids[email];
    let letter = api
        .letter(newsletter, json!({ "subject": "Hello", "text": "Hi\r\n" }))
        .await;
    let job = api.send(letter, json!({})).await;
    let done = api.wait_job(job, Duration::from_secs(60)).await;
    // Postfix took every message: the bounces come afterwards, as they do in life.
    assert_eq!(done["counts"]["delivered"], 10, "{done}");

    // Postfix's DSNs reach the listener and each names its subscriber.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    for email in &gone {
        while status_of(api, id_of(email)).await != "bounced" {
            assert!(
                std::time::Instant::now() < deadline,
                "{email} not bounced; Postfix's log:\n{}",
                postfix.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let found = reports(api, id_of(email)).await;
        assert_eq!(found.len(), 1, "{found:?}");
        let r = &found[0];
        assert_eq!(
            (r["kind"].as_str(), r["source"].as_str(), r["status"].as_str()),
            (Some("hard"), Some("inbound"), Some("5.1.1")),
            "{r}"
        );
        assert_eq!(r["job_id"], job, "{r}");
        // Postfix's own words, and its whole report, kept.
        let user = email.split('@').next().unwrap();
        assert!(
            r["diagnostic"]
                .as_str()
                .unwrap()
                .contains(&format!("unknown user: \"{user}\"")),
            "{r}"
        );
        let raw = r["raw"].as_str().unwrap();
        assert!(raw.contains("Reporting-MTA: dns; mta.test"), "{raw}");
        assert!(raw.contains("X-Postfix-Queue-ID"), "{raw}");
    }
    for email in &kept {
        assert_eq!(status_of(api, id_of(email)).await, "active", "{email}");
    }
    assert_eq!(good.count(), 6);
    let (_, unattributed) = api.get("/v1/bounces?unattributed=true").await;
    assert_eq!(unattributed["items"], json!([]), "{unattributed}");

    // The next letter goes only to the mailboxes that exist.
    let letter = api
        .letter(newsletter, json!({ "subject": "Again", "text": "Hi\r\n" }))
        .await;
    let job = api.send(letter, json!({})).await;
    let done = api.wait_job(job, Duration::from_secs(60)).await;
    assert_eq!(done["counts"]["delivered"], 6, "{done}");
    // Postfix relayed the six and bounced nothing more.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while good.count() < 12 {
        assert!(std::time::Instant::now() < deadline, "{}", postfix.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, page) = api.get("/v1/bounces").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 4, "{page}");
    server.stop().await;
}

/// Messages no MTA should send: binary junk, reports cut anywhere with junk spliced in,
/// a header of hundreds of kilobytes, tens of thousands of headers, multiparts nested
/// up to 100,000 deep (9 MB, under the size limit).
fn hostile_message() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
    use proptest::prelude::*;
    let junk = proptest::collection::vec(any::<u8>(), 0..8192);
    let whole = dsn(
        &format!("x@{DOMAIN}"),
        "someone@example.org",
        "5.1.1",
        "nobody@example.net",
    );
    let whole_len = whole.len();
    prop_oneof![
        junk.clone(),
        (0..whole_len, junk).prop_map(move |(cut, junk)| {
            let mut bytes = whole.as_bytes()[..cut].to_vec();
            bytes.extend_from_slice(&junk);
            bytes.extend_from_slice(&whole.as_bytes()[cut..]);
            bytes
        }),
        (1usize..400_000).prop_map(|n| format!("Subject: {}\r\n\r\nbody", "h".repeat(n)).into_bytes()),
        (1usize..30_000).prop_map(|n| format!("{}\r\nbody", "X-H: v\r\n".repeat(n)).into_bytes()),
        (1usize..100_000).prop_map(|depth| {
            let mut message = String::new();
            for level in 0..depth {
                message.push_str(&format!(
                    "Content-Type: multipart/report; report-type=delivery-status; boundary=\"b{level}\"\r\n\r\n--b{level}\r\n"
                ));
            }
            message.push_str("Content-Type: message/delivery-status\r\n\r\nStatus: 5.1.1\r\n");
            message.into_bytes()
        }),
    ]
}

/// Whatever arrives, the listener answers it (recorded, or refused with a reason) and
/// keeps serving: no message panics it, hangs it or closes the connection.
#[test]
fn no_message_brings_the_listener_down() {
    use proptest::test_runner::{Config, TestCaseError, TestRunner};
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let port = free_port();
    let (smtp, server) = runtime.block_on(async {
        let smtp = SmtpServer::start().await;
        let server = server(&smtp, port).await;
        (smtp, server)
    });
    let (mut client, _) = runtime.block_on(Client::connect(port));
    runtime.block_on(client.command("EHLO fuzz.example.org"));
    // The runner's closure is `Fn`; one connection carries every case.
    let client = std::cell::RefCell::new(client);
    let mut runner = TestRunner::new(Config {
        cases: 48,
        failure_persistence: None,
        ..Config::default()
    });
    let to = format!("postmaster@{DOMAIN}");
    runner
        .run(&hostile_message(), |message| {
            let mut client = client.borrow_mut();
            let answer = runtime.block_on(client.send_bytes("", &to, &message));
            // Recorded, or too big; never a failure of ours (451), never silence.
            if !(answer.starts_with("250") || answer.starts_with("552")) {
                return Err(TestCaseError::fail(format!("answered {answer:?}")));
            }
            let noop = runtime.block_on(client.command("NOOP"));
            if !noop.starts_with("250") {
                return Err(TestCaseError::fail(format!("then NOOP got {noop:?}")));
            }
            Ok(())
        })
        .unwrap();
    // A new connection is served, and a real report after all that is still read.
    runtime.block_on(async {
        let (mut fresh, greeting) = Client::connect(port).await;
        assert!(greeting.starts_with("220 "), "{greeting}");
        fresh.command("EHLO mx.example.org").await;
        let report = dsn(&to, "after@example.org", "5.1.1", "nobody@example.net");
        assert!(fresh.send("", &to, &report).await.starts_with("250"));
        let (_, page) = server.api.get("/v1/bounces?unattributed=true&limit=1").await;
        assert_eq!(page["items"][0]["email"], "after@example.org", "{page}");
        server.stop().await;
        drop(smtp);
    });
}
