//! The web console in a real browser (chromium over WebDriver) against the real server,
//! as a newcomer walks it, with axe-core's check on every page and screenshots at
//! desktop and phone width; and its security checks, in the browser and as plain HTTP.

use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{COOKIE, LOCATION, SET_COOKIE};

use std::sync::Arc;

use crate::support::browser::Browser;
use crate::support::smtp::{Reply, Script};
use crate::support::{SmtpServer, TEST_TOKEN, TestServer, client_builder};

/// A client that follows no redirect, so each answer can be looked at.
fn http() -> reqwest::Client {
    client_builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

fn form(fields: &[(&str, &str)]) -> String {
    fields
        .iter()
        .map(|(k, v)| {
            let v: String = url::form_urlencoded::byte_serialize(v.as_bytes()).collect();
            format!("{k}={v}")
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// Signs in over plain HTTP; the session cookie (`name=value`).
async fn sign_in(base: &str) -> String {
    let response = http()
        .post(format!("{base}/console/sign-in"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(&[("token", TEST_TOKEN), ("next", "/console/newsletters")]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let cookie = response.headers()[SET_COOKIE].to_str().unwrap().to_string();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/console", "Max-Age="] {
        assert!(cookie.contains(attribute), "{cookie}");
    }
    assert!(!cookie.contains("Secure"), "no Secure over http: {cookie}");
    cookie.split(';').next().unwrap().to_string()
}

/// The CSRF token a page's forms carry.
fn csrf_of(page: &str) -> String {
    let at = page
        .find("name=\"_csrf\" value=\"")
        .expect("a form with a CSRF token")
        + 20;
    page[at..].split('"').next().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_needs_a_session_and_refuses_forged_forms() {
    let server = TestServer::start(None).await;
    let base = server.api.base.clone();
    let client = http();

    // No page without a session; the sign-in page and its assets only.
    for path in [
        "/console/newsletters",
        "/console/newsletters/1",
        "/console/jobs/1",
        "/console/policies",
        "/console/policies/default-template/status",
        "/console/bounces",
        "/console/suppressions",
        "/console/events",
        "/console/events/stream",
        "/console/no-such-page",
    ] {
        let response = client.get(format!("{base}{path}")).send().await.unwrap();
        assert!(
            response.status().is_redirection(),
            "{path}: {}",
            response.status()
        );
        let location = response.headers()[LOCATION].to_str().unwrap().to_string();
        assert!(location.starts_with("/console/sign-in"), "{path} → {location}");
    }
    let sign_in_page = client
        .get(format!("{base}/console/sign-in"))
        .send()
        .await
        .unwrap();
    assert_eq!(sign_in_page.status(), StatusCode::OK);
    let headers = sign_in_page.headers().clone();
    let csp = headers["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert_eq!(headers["x-frame-options"], "DENY");
    assert!(headers.contains_key("referrer-policy"));
    let html = sign_in_page.text().await.unwrap();
    assert!(
        !html.contains("<script>") && !html.contains(" onclick="),
        "inline script on the sign-in page"
    );
    let css = html
        .split("href=\"")
        .find(|s| s.starts_with("/console/assets/console."))
        .unwrap();
    let css = css.split('"').next().unwrap();
    assert_eq!(
        client.get(format!("{base}{css}")).send().await.unwrap().status(),
        200
    );
    // A POST without a session changes nothing.
    let response = client
        .post(format!("{base}/console/newsletters"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(&[("name", "x"), ("from", "x@example.com")]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);

    // A wrong token is refused at its field; the API's bearer token is not a session.
    let response = client
        .post(format!("{base}/console/sign-in"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(&[("token", "wrong-token")]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert!(response.headers().get(SET_COOKIE).is_none());
    assert!(
        response
            .text()
            .await
            .unwrap()
            .contains("this is not the API token")
    );
    let response = client
        .get(format!("{base}/console/newsletters"))
        .bearer_auth(TEST_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::SEE_OTHER,
        "a bearer token opened a page"
    );

    let cookie = sign_in(&base).await;
    // …and a session is not an API token.
    let response = client
        .get(format!("{base}/v1/newsletters"))
        .header(COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let page = client
        .get(format!("{base}/console/newsletters"))
        .header(COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    assert_eq!(page.headers()["cache-control"], "no-store");
    let csrf = csrf_of(&page.text().await.unwrap());
    // An address or query the console cannot read is a page that says so, not a blank
    // or axum's plain text.
    for path in [
        "/console/jobs/abc",
        "/console/bounces?before=abc",
        "/console/newsletters/1/subscribers?after=-1",
    ] {
        let response = client
            .get(format!("{base}{path}"))
            .header(COOKIE, &cookie)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{path}");
        assert!(
            response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/html"),
            "{path}: {:?}",
            response.headers()["content-type"]
        );
        assert!(response.text().await.unwrap().contains("400"), "{path}");
    }

    let post =
        |fields: Vec<(&'static str, String)>, origin: Option<&'static str>, site: Option<&'static str>| {
            let mut request = client
                .post(format!("{base}/console/newsletters"))
                .header(COOKIE, &cookie)
                .header("content-type", "application/x-www-form-urlencoded");
            if let Some(origin) = origin {
                request = request.header("origin", origin);
            }
            if let Some(site) = site {
                request = request.header("sec-fetch-site", site);
            }
            let body = form(&fields.iter().map(|(k, v)| (*k, v.as_str())).collect::<Vec<_>>());
            request.body(body).send()
        };
    let fields = |csrf: Option<&str>| {
        let mut f = vec![
            ("name", "Forged".to_string()),
            ("from", "f@example.com".to_string()),
        ];
        if let Some(csrf) = csrf {
            f.push(("_csrf", csrf.to_string()));
        }
        f
    };
    // Without its CSRF token, with another's, or from another site: refused.
    assert_eq!(
        post(fields(None), None, None).await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        post(fields(Some(&"0".repeat(64))), None, None)
            .await
            .unwrap()
            .status(),
        StatusCode::FORBIDDEN
    );
    let cross = post(fields(Some(&csrf)), Some("https://evil.example"), None)
        .await
        .unwrap();
    assert_eq!(cross.status(), StatusCode::FORBIDDEN);
    let cross = post(fields(Some(&csrf)), None, Some("cross-site")).await.unwrap();
    assert_eq!(cross.status(), StatusCode::FORBIDDEN);
    let (_, listed) = server.api.get("/v1/newsletters").await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 0, "{listed}");
    // An upload (the script's request, its token in a header) without the token, or
    // from another site: refused, and nothing stored.
    let upload = |token: Option<&str>, site: &str| {
        let mut request = client
            .post(format!("{base}/console/policies?kind=template&name=forged"))
            .header(COOKIE, &cookie)
            .header("content-type", "application/wasm")
            .header("sec-fetch-site", site.to_string())
            .body(crate::support::wasm("ab_subject"));
        if let Some(token) = token {
            request = request.header("x-csrf-token", token.to_string());
        }
        request.send()
    };
    assert_eq!(
        upload(None, "same-origin").await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        upload(Some(&csrf), "cross-site").await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    assert_eq!(server.api.get("/v1/plugins/forged").await.0, 404);
    // With it, from this site: done.
    let made = post(
        fields(Some(&csrf)),
        Some(&*Box::leak(base.clone().into_boxed_str())),
        Some("same-origin"),
    )
    .await
    .unwrap();
    assert_eq!(made.status(), StatusCode::SEE_OTHER);
    let (_, listed) = server.api.get("/v1/newsletters").await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 1, "{listed}");

    // Signing out ends the session on the server, not only in the browser.
    let response = client
        .post(format!("{base}/console/sign-out"))
        .header(COOKIE, &cookie)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(&[("_csrf", &csrf)]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert!(
        response.headers()[SET_COOKIE]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
    let response = client
        .get(format!("{base}/console/newsletters"))
        .header(COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::SEE_OTHER,
        "the old cookie still works"
    );

    // Wrong tokens are limited per address.
    let mut limited = None;
    for _ in 0..12 {
        let response = client
            .post(format!("{base}/console/sign-in"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form(&[("token", "guess")]))
            .send()
            .await
            .unwrap();
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            limited = Some(response.headers()["retry-after"].to_str().unwrap().to_string());
            break;
        }
    }
    assert!(limited.is_some(), "twelve wrong tokens in a row were all tried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newcomer_signs_in_and_manages_newsletters_in_a_browser() {
    let Some(mut browser) = Browser::start("newcomer", false).await else {
        return;
    };
    // One reader's server refuses the first attempt for good (550 5.6.0, which says
    // nothing about the address): a failed delivery to open and retry.
    let script: Script = Arc::new(|to: &str, tried_before: u32| match (to, tried_before) {
        ("reader7@example.org", 0) => Reply::Refuse,
        _ => Reply::Accept,
    });
    let smtp = SmtpServer::scripted(Duration::ZERO, script).await;
    let server = TestServer::with_smtp(&smtp, |_| {}).await;
    let base = server.api.base.clone();

    // `/` leads to the sign-in page; a wrong token is refused at its field.
    browser.goto(&format!("{base}/")).await;
    browser.find("#f-token").await;
    assert!(browser.path().await.starts_with("/console/sign-in"));
    browser.assert_accessible().await;
    browser.fill("#f-token", "not-the-token").await;
    browser.click("form button[type=submit]").await;
    let error = browser.text("#e-token").await;
    assert!(error.contains("not the API token"), "{error}");
    browser.screenshots("sign-in-wrong-token").await;
    browser.fill("#f-token", TEST_TOKEN).await;
    browser.click("form button[type=submit]").await;
    browser
        .wait_text("the newsletters page", |t| t.contains("No newsletter yet"))
        .await;
    browser.assert_accessible().await;
    browser.screenshots("newsletters-empty").await;

    // A From that is not an address is named at its field, with what was typed kept.
    browser
        .fill("#f-name", "<script>alert('x')</script> Weekly")
        .await;
    browser.fill("#f-from", "not an address").await;
    browser.click("section form button.primary").await;
    // The page the form answers with (the list's own #e-from is there, hidden, until it
    // arrives).
    let error = browser.wait_shown("#e-from").await;
    assert!(!error.is_empty(), "no error at the From field");
    assert_eq!(
        browser
            .find("#f-name")
            .await
            .prop("value")
            .await
            .unwrap()
            .as_deref(),
        Some("<script>alert('x')</script> Weekly")
    );
    browser.assert_accessible().await;
    browser.screenshots("newsletter-invalid-from").await;
    browser.fill("#f-from", "Weekly <news@example.com>").await;
    browser.click("section form button.primary").await;
    browser
        .wait_text("the new newsletter", |t| t.contains("Created."))
        .await;
    // The name shows as text: no script of it ran, and it is in the heading as typed.
    assert_eq!(browser.text("h1").await, "<script>alert('x')</script> Weekly");
    assert_eq!(
        browser
            .eval("return document.querySelectorAll('main script').length")
            .await,
        0
    );
    browser.assert_accessible().await;
    browser.screenshots("newsletter-created").await;

    browser.fill("#f-name", "Weekly").await;
    browser.click("section form button.primary").await;
    browser
        .wait_text("the saved newsletter", |t| t.contains("Saved."))
        .await;
    assert_eq!(browser.text("h1").await, "Weekly");
    let (_, listed) = server.api.get("/v1/newsletters").await;
    assert_eq!(listed["items"][0]["name"], "Weekly");
    let newsletter = listed["items"][0]["id"].as_u64().unwrap();

    // Import a CSV file: progress, then what was taken and the rows refused.
    browser.click("a[href$='/subscribers']").await;
    browser
        .wait_text("the empty list", |t| t.contains("No subscriber yet"))
        .await;
    let csv = tempfile::Builder::new().suffix(".csv").tempfile().unwrap();
    let mut rows = String::from("email,name,plan\n");
    for i in 0..120 {
        rows.push_str(&format!(
            "reader{i}@example.org,Reader {i},{}\n",
            if i % 4 == 0 { "pro" } else { "free" }
        ));
    }
    rows.push_str("not-an-address,Broken,free\n");
    rows.push_str("mallory@example.org,<img src=x onerror=alert(1)>,free\n");
    std::fs::write(csv.path(), rows).unwrap();
    browser
        .find("#f-file")
        .await
        .send_keys(&csv.path().display().to_string())
        .await
        .unwrap();
    browser.click("form[data-import] button[type=submit]").await;
    let result = browser
        .wait_text("the import's summary", |t| t.contains("Imported"))
        .await;
    assert!(
        result.contains("New\n121") || result.contains("New 121"),
        "{result}"
    );
    let refused = browser.text("#import-refused").await;
    assert!(refused.contains("not-an-address"), "{refused}");
    assert_eq!(
        browser
            .eval(
                "return document.querySelector('progress').value === document.querySelector('progress').max"
            )
            .await,
        true
    );
    browser.assert_accessible().await;
    browser.screenshots("import-done").await;

    // Search by name and by attribute; a name holding markup is text.
    browser
        .goto(&format!("{base}/console/newsletters/{newsletter}/subscribers"))
        .await;
    browser
        .wait_text("the list", |t| t.contains("reader0@example.org"))
        .await;
    browser.fill("#f-q", "<IMG").await;
    browser.click("form.search button").await;
    browser
        .wait_text("the search's answer", |t| {
            t.contains("mallory@example.org") && !t.contains("reader0@")
        })
        .await;
    assert_eq!(
        browser
            .eval("return document.querySelectorAll('main img').length")
            .await,
        0
    );
    assert!(
        browser
            .text("#subscribers")
            .await
            .contains("<img src=x onerror=alert(1)>")
    );
    browser.fill("#f-q", "").await;
    browser.fill("#f-attribute", "plan=pro").await;
    browser.click("form.search button").await;
    let found = browser
        .wait_text("the attribute search", |t| {
            t.contains("reader4@example.org") && !t.contains("reader1@")
        })
        .await;
    assert!(found.contains("reader0@example.org"), "{found}");
    browser.assert_accessible().await;
    browser.screenshots("subscribers-search").await;

    // A letter with a typo in its template: the problem shows at its field as typed.
    browser
        .goto(&format!("{base}/console/newsletters/{newsletter}"))
        .await;
    browser.click("a[href$='/letters/new']").await;
    browser.fill("#f-subject", "Hello {{ name }}").await;
    browser.fill("#f-text", "Hi {{ name,\nthis week: nothing.").await;
    let problem = browser.wait_shown("#e-text").await;
    assert!(!problem.is_empty(), "no problem shown at the text field");
    browser.assert_accessible().await;
    browser.screenshots("letter-typo").await;
    // Fixed: the preview follows, as the first subscriber gets it.
    browser
        .fill("#f-text", "Hi {{ name }},\nthis week: nothing.")
        .await;
    browser.wait_hidden("#e-text").await;
    let preview = browser.preview_text(|t| t.contains("Hi Reader 0,")).await;
    assert!(preview.contains("this week: nothing."), "{preview}");
    browser.screenshots("letter-preview").await;
    browser.click("#letter-form button.primary").await;
    browser
        .wait_text("the saved letter", |t| t.contains("Created."))
        .await;
    browser.assert_accessible().await;

    // Send it now and watch the job to its end, live.
    browser.click("form[action$='/send'] button.primary").await;
    browser
        .wait_text("the job page", |t| t.contains("Submitted"))
        .await;
    browser
        .wait_for_text("[data-field=state]", |t| t == "completed")
        .await;
    assert_eq!(browser.text("[data-count=failed]").await, "1");
    assert_eq!(browser.text("[data-count=delivered]").await, "120");
    browser.assert_accessible().await;
    browser.screenshots("job-completed").await;
    // The failed delivery and its reason; then retry only the failed.
    browser
        .find("#f-dstate")
        .await
        .select_by_value("failed")
        .await
        .unwrap();
    browser.click("form.search button").await;
    let failed = browser
        .wait_text("the failed deliveries", |t| t.contains("reader7@example.org"))
        .await;
    assert!(failed.contains("5.6.0"), "{failed}");
    browser.screenshots("job-failed-deliveries").await;
    browser.click("form[action$='/retry-failed'] button").await;
    browser
        .wait_text("the requeued job", |t| {
            t.contains("1 failed recipient(s) requeued.")
        })
        .await;
    browser.wait_for_text("[data-count=failed]", |t| t == "0").await;
    browser
        .wait_for_text("[data-field=state]", |t| t == "completed")
        .await;
    assert_eq!(smtp.tries("reader7@example.org"), 2);
    assert_eq!(smtp.count(), 121);

    // Edit one, then unsubscribe and erase another.
    browser
        .goto(&format!("{base}/console/newsletters/{newsletter}/subscribers"))
        .await;
    browser.click("a[href^='/console/subscribers/']").await;
    browser.fill("#f-name", "Reader Zero").await;
    browser.fill("#f-attributes", "{\"plan\": \"team\"").await;
    browser.click("section form button.primary").await;
    let error = browser.text("#e-attributes").await;
    assert!(error.contains("JSON object"), "{error}");
    browser.fill("#f-attributes", "{\"plan\": \"team\"}").await;
    browser.click("section form button.primary").await;
    browser
        .wait_text("the saved subscriber", |t| t.contains("Saved."))
        .await;
    browser.assert_accessible().await;
    browser.screenshots("subscriber-saved").await;
    let ids = server.api.subscriber_ids(newsletter).await;
    let (_, zero) = server
        .api
        .get(&format!("/v1/subscribers/{}", ids["reader0@example.org"]))
        .await;
    assert_eq!(
        (zero["name"].as_str(), zero["attributes"]["plan"].as_str()),
        (Some("Reader Zero"), Some("team"))
    );
    browser.click("form[action$='/unsubscribe'] button").await;
    browser
        .wait_text("the unsubscribed subscriber", |t| t.contains("Unsubscribed:"))
        .await;
    let (_, zero) = server
        .api
        .get(&format!("/v1/subscribers/{}", ids["reader0@example.org"]))
        .await;
    assert_eq!(zero["status"], "unsubscribed");
    browser.click("form[action$='/erase'] button").await;
    browser
        .client
        .accept_alert()
        .await
        .expect("a confirmation before erasing");
    browser
        .wait_text("the list after erasing", |t| t.contains("Erased,"))
        .await;
    let (status, _) = server
        .api
        .get(&format!("/v1/subscribers/{}", ids["reader0@example.org"]))
        .await;
    assert_eq!(status, 404);

    // Sign out: back at the sign-in page, and the console is closed again.
    browser.click("header .sign-out button").await;
    browser
        .wait_text("the signed-out page", |t| t.contains("You are signed out"))
        .await;
    browser.goto(&format!("{base}/console/newsletters")).await;
    browser.find("#f-token").await;
    assert!(browser.path().await.starts_with("/console/sign-in"));
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_passes_axe_in_dark_mode() {
    let Some(mut browser) = Browser::start("dark", true).await else {
        return;
    };
    let server = TestServer::start(None).await;
    let (base, api) = (server.api.base.clone(), &server.api);
    let newsletter = api.newsletter().await;
    api.add_subscribers(
        newsletter,
        serde_json::json!([{ "email": "ann@example.org", "name": "Ann" }]),
    )
    .await;
    let letter = api
        .letter(
            newsletter,
            serde_json::json!({ "subject": "Hi {{ name }}", "text": "Hello" }),
        )
        .await;
    let job = api.send(letter, serde_json::json!({})).await;
    api.wait_job(job, Duration::from_secs(30)).await;
    let ann = api.subscriber_ids(newsletter).await["ann@example.org"];
    // A complaint: a report, a suppression and events for those pages to show.
    api.post_ok(
        "/v1/bounces",
        serde_json::json!({ "type": "complaint", "subscriber": ann, "raw": "Feedback-Type: abuse" }),
        201,
    )
    .await;

    browser.goto(&format!("{base}/console/sign-in")).await;
    assert_eq!(
        browser
            .eval("return matchMedia('(prefers-color-scheme: dark)').matches")
            .await,
        true,
        "the browser did not ask for dark mode"
    );
    browser.assert_accessible().await;
    browser.fill("#f-token", TEST_TOKEN).await;
    browser.click("form button[type=submit]").await;
    browser.find("table.list").await;
    for (name, path) in [
        ("newsletters", "/console/newsletters".to_string()),
        ("newsletter", format!("/console/newsletters/{newsletter}")),
        (
            "subscribers",
            format!("/console/newsletters/{newsletter}/subscribers"),
        ),
        ("subscriber", format!("/console/subscribers/{ann}")),
        ("letter", format!("/console/letters/{letter}")),
        ("jobs", "/console/jobs".to_string()),
        ("job", format!("/console/jobs/{job}")),
        ("health", "/console/health".to_string()),
        ("policies", "/console/policies".to_string()),
        ("policy", "/console/policies/default-template".to_string()),
        ("bounces", "/console/bounces".to_string()),
        ("suppressions", "/console/suppressions".to_string()),
        ("events", "/console/events".to_string()),
        ("not-found", "/console/no-such-page".to_string()),
    ] {
        browser.goto(&format!("{base}{path}")).await;
        browser.find("main h1").await;
        browser.assert_accessible().await;
        browser.screenshots(name).await;
    }
    // The health page says what /readyz checks, and names this node.
    browser.goto(&format!("{base}/console/health")).await;
    let health = browser
        .wait_text("the health page", |t| t.contains("Ready for work"))
        .await;
    assert!(health.contains("(this one)"), "{health}");
    browser.close().await;
}
