//! Double opt-in end to end: the public subscribe form (HTML form or JSON, no token),
//! the confirmation mailed to a real SMTP server with its signed link, the confirmation
//! (`subscriber.confirmed`, once), letters that skip the unconfirmed, the answer that is
//! the same for every address, the limit per IP, and links that expire with their
//! subscriber.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{Api, SmtpServer, TestServer, client_builder};

const ANSWER: &str = "If this address can be subscribed";

/// A client with no token at all: the public form needs none.
fn public() -> reqwest::Client {
    client_builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Posts the HTML form; returns the status, the Retry-After header and the page.
async fn post_form(base: &str, newsletter: u64, fields: &[(&str, &str)]) -> (u16, Option<String>, String) {
    let response = public()
        .post(format!("{base}/s/{newsletter}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(urlencoded(fields))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let retry = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    (status, retry, response.text().await.unwrap())
}

/// `application/x-www-form-urlencoded`, as a browser sends a form.
fn urlencoded(fields: &[(&str, &str)]) -> String {
    let encode = |s: &str| {
        s.bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' => (b as char).to_string(),
                b' ' => "+".to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    fields
        .iter()
        .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

async fn post_json(base: &str, newsletter: u64, body: Value) -> (u16, Value) {
    let response = public()
        .post(format!("{base}/s/{newsletter}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

async fn page(method: &str, url: &str) -> (u16, String) {
    let response = public()
        .request(method.parse().unwrap(), url)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

/// The confirmation links mailed to `to` so far, oldest first.
pub(crate) fn links(smtp: &SmtpServer, to: &str) -> Vec<String> {
    smtp.received()
        .iter()
        .filter(|m| m.recipients == [to])
        .filter_map(|m| {
            // Decoded as a mail client would (the body is quoted-printable).
            let parsed = mail_parser::MessageParser::default().parse(m.data.as_bytes())?;
            let body = parsed.body_text(0)?;
            let at = body.find("http")?;
            let url = body[at..].split_whitespace().next()?;
            url.contains("/s/confirm/").then(|| url.to_string())
        })
        .collect()
}

/// Waits for the `n`th confirmation link to `to`.
pub(crate) async fn nth_link(smtp: &SmtpServer, to: &str, n: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(link) = links(smtp, to).get(n - 1) {
            return link.clone();
        }
        assert!(Instant::now() < deadline, "no confirmation #{n} for {to}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn status_of(api: &Api, newsletter: u64, email: &str) -> Option<String> {
    let (status, page) = api
        .get(&format!("/v1/newsletters/{newsletter}/subscribers?email={email}"))
        .await;
    assert_eq!(status, 200, "{page}");
    page["items"]
        .as_array()
        .unwrap()
        .first()
        .map(|s| s["status"].as_str().unwrap().to_string())
}

async fn events_of(api: &Api, kind: &str, subscriber: u64) -> Vec<Value> {
    let (status, page) = api
        .get(&format!(
            "/v1/events?type={kind}&subscriber={subscriber}&limit=100"
        ))
        .await;
    assert_eq!(status, 200, "{page}");
    page["events"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_form_subscriber_is_mailed_a_link_and_gets_letters_once_confirmed() {
    let smtp = SmtpServer::start().await;
    let server = TestServer::start(Some(&smtp)).await;
    let api = &server.api;
    let base = api.base.clone();
    let newsletter = api.newsletter().await;
    api.add_subscribers(newsletter, json!([{ "email": "on@example.org" }]))
        .await;

    let (status, form) = page("GET", &format!("{base}/s/{newsletter}")).await;
    assert_eq!(status, 200, "{form}");
    assert!(
        form.contains("<form method=post>") && form.contains("name=email"),
        "{form}"
    );
    let (status, _, answer) = post_form(
        &base,
        newsletter,
        &[("email", "ann@example.org"), ("name", "Ann")],
    )
    .await;
    assert_eq!(status, 202, "{answer}");
    assert!(answer.contains(ANSWER), "{answer}");
    // A subscriber already on the list gets the very same answer, and no message.
    let (status, known) = post_json(&base, newsletter, json!({ "email": "on@example.org" })).await;
    let (_, unknown) = post_json(&base, newsletter, json!({ "email": "new@example.org" })).await;
    assert_eq!(status, 202, "{known}");
    assert_eq!(known, unknown);
    let (status, bad) = post_json(&base, newsletter, json!({ "email": "not an address" })).await;
    assert_eq!(status, 422, "{bad}");
    assert_eq!(bad["errors"][0]["field"], "email", "{bad}");
    let (status, missing) = post_json(&base, newsletter + 99, json!({ "email": "x@example.org" })).await;
    assert_eq!(status, 404, "{missing}");

    let link = nth_link(&smtp, "ann@example.org", 1).await;
    let mail = smtp
        .received()
        .into_iter()
        .find(|m| m.recipients == ["ann@example.org"])
        .unwrap();
    assert!(
        mail.header("Subject")
            .unwrap()
            .starts_with("Confirm your subscription"),
        "{}",
        mail.data
    );
    assert!(link.starts_with(&format!("{base}/s/confirm/")), "{link}");
    assert_eq!(
        status_of(api, newsletter, "ann@example.org").await.as_deref(),
        Some("unconfirmed")
    );
    let ids = api.subscriber_ids(newsletter).await;
    let ann = ids["ann@example.org"];
    let on = ids["on@example.org"];
    assert!(
        events_of(api, "message.queued", on).await.is_empty(),
        "nothing was sent to on@"
    );

    // A letter goes to the confirmed list only.
    let letter = api
        .letter(newsletter, json!({ "subject": "Issue 1", "text": "Hello\r\n" }))
        .await;
    let job = api.send(letter, json!({})).await;
    let done = api.wait_job(job, Duration::from_secs(30)).await;
    assert_eq!(done["counts"]["delivered"], 1, "{done}");
    let issues_to = |to: &str| {
        smtp.received()
            .iter()
            .filter(|m| m.recipients == [to] && m.header("Subject").as_deref() == Some("Issue 1"))
            .count()
    };
    assert_eq!(
        (issues_to("on@example.org"), issues_to("ann@example.org")),
        (1, 0)
    );

    // The link's page changes nothing (mail scanners follow links); its button confirms.
    let (status, confirm_page) = page("GET", &link).await;
    assert_eq!(status, 200, "{confirm_page}");
    assert!(
        confirm_page.contains("<button type=submit>Confirm</button>"),
        "{confirm_page}"
    );
    assert_eq!(
        status_of(api, newsletter, "ann@example.org").await.as_deref(),
        Some("unconfirmed")
    );
    let (status, done_page) = page("POST", &link).await;
    assert_eq!(status, 200, "{done_page}");
    assert!(done_page.contains("You are subscribed"), "{done_page}");
    assert_eq!(
        status_of(api, newsletter, "ann@example.org").await.as_deref(),
        Some("active")
    );
    let (status, again) = page("POST", &link).await;
    assert_eq!(status, 200, "{again}");
    assert!(again.contains("already"), "{again}");
    assert_eq!(
        events_of(api, "subscriber.confirmed", ann).await.len(),
        1,
        "confirmed once"
    );
    let (status, tampered) = page("POST", &format!("{link}x")).await;
    assert_eq!(status, 404, "{tampered}");
    let (status, _) = page("POST", &format!("{base}/s/confirm/1.2.3.nonsense")).await;
    assert_eq!(status, 404);

    // Subscribed now: asking again mails nothing, and the next letter reaches them.
    let (status, same) = post_json(&base, newsletter, json!({ "email": "ann@example.org" })).await;
    assert_eq!((status, &same), (202, &known));
    assert_eq!(
        events_of(api, "message.queued", ann).await.len(),
        1,
        "one confirmation only"
    );
    let job = api.send(letter, json!({})).await;
    let done = api.wait_job(job, Duration::from_secs(30)).await;
    assert_eq!(done["counts"]["delivered"], 2, "{done}");
    assert_eq!(issues_to("ann@example.org"), 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_form_is_limited_per_address_and_unconfirmed_subscribers_expire() {
    let smtp = SmtpServer::start().await;
    let server = TestServer::with_smtp(&smtp, |c| {
        c.confirm_within = Duration::from_secs(2);
        c.housekeeping_every = Duration::from_millis(200);
        c.subscribe_per_minute = 3;
    })
    .await;
    let api = &server.api;
    let base = api.base.clone();
    let newsletter = api.newsletter().await;

    for email in ["late@example.org", "late@example.org", "other@example.org"] {
        let (status, _, answer) = post_form(&base, newsletter, &[("email", email)]).await;
        assert_eq!(status, 202, "{answer}");
    }
    let (status, retry, answer) = post_form(&base, newsletter, &[("email", "fourth@example.org")]).await;
    assert_eq!(status, 429, "{answer}");
    let retry: u64 = retry.expect("a Retry-After").parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    assert!(answer.contains("too many"), "{answer}");
    let (status, problem) = post_json(&base, newsletter, json!({ "email": "fifth@example.org" })).await;
    assert_eq!(
        (status, problem["status"].as_u64()),
        (429, Some(429)),
        "{problem}"
    );
    assert_eq!(status_of(api, newsletter, "fourth@example.org").await, None);

    // Asking twice mailed two links; either works until it expires.
    let link = nth_link(&smtp, "late@example.org", 2).await;
    let late = api.subscriber_ids(newsletter).await["late@example.org"];
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, body) = page("GET", &link).await;
        if status == 410 {
            assert!(body.contains("expired"), "{body}");
            break;
        }
        assert_eq!(status, 200, "{body}");
        assert!(Instant::now() < deadline, "the link never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, body) = page("POST", &link).await;
    assert!(status == 410 || status == 404, "{status} {body}");
    // Housekeeping erases who did not confirm in time, with `subscriber.erased`.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !api.subscriber_ids(newsletter).await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "unconfirmed subscribers were never erased"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(events_of(api, "subscriber.erased", late).await.len(), 1);
    assert!(events_of(api, "subscriber.confirmed", late).await.is_empty());
    server.stop().await;
}
