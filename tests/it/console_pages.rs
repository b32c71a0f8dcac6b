//! The console's pages beyond the newcomer's flow, in a real browser against the real
//! server: policies (an upload that compiles, the letters that name it), and what comes
//! back after a send (bounce reports, reinstatement, the suppression list, the event log
//! followed live). axe-core checks each page; screenshots at desktop and phone width.

use serde_json::json;

use crate::support::browser::Browser;
use crate::support::{TEST_TOKEN, TestServer, wasm};

async fn signed_in(browser: &Browser, base: &str) {
    browser.goto(&format!("{base}/console/sign-in")).await;
    browser.fill("#f-token", TEST_TOKEN).await;
    browser.click("form button[type=submit]").await;
    browser.find("header.top nav").await;
}

/// Chooses `bytes`, saved as a file named `name`, in the file input `css`.
async fn choose_file(browser: &Browser, css: &str, dir: &tempfile::TempDir, name: &str, bytes: &[u8]) {
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).unwrap();
    browser
        .find(css)
        .await
        .send_keys(&path.display().to_string())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_upload_compile_live_and_name_the_letters_that_use_them() {
    let Some(mut browser) = Browser::start("policies", false).await else {
        return;
    };
    let server = TestServer::start(None).await;
    let (base, api) = (server.api.base.clone(), &server.api);
    let files = tempfile::tempdir().unwrap();
    signed_in(&browser, &base).await;

    // The built-ins are listed, ready (or on their way) and used by nothing yet.
    browser.goto(&format!("{base}/console/policies")).await;
    let text = browser
        .wait_text("the policies", |t| t.contains("default-template"))
        .await;
    assert!(text.contains("default-filter"), "{text}");
    browser.assert_accessible().await;
    browser.screenshots("policies").await;

    // A name the API refuses: the reason is shown at the name field.
    browser.fill("#f-name", "two words").await;
    choose_file(&browser, "#f-file", &files, "ab.wasm", &wasm("ab_subject")).await;
    browser.click("form[data-upload] button[type=submit]").await;
    let problem = browser.wait_shown("#e-name").await;
    assert!(problem.contains("letters, digits"), "{problem}");

    // Bytes that are no component: the refusal says why.
    browser.fill("#f-name", "garbage").await;
    choose_file(&browser, "#f-file", &files, "garbage.wasm", b"not a component").await;
    browser.click("form[data-upload] button[type=submit]").await;
    let refused = browser
        .wait_for_text("#upload-result", |t| t.contains("refused"))
        .await;
    assert!(refused.contains("component"), "{refused}");
    assert_eq!(api.get("/v1/plugins/garbage").await.0, 404);

    // A real component: the policy's page follows its compilation to `ready`.
    browser.fill("#f-name", "ab-test").await;
    browser
        .find("#f-kind option[value=template]")
        .await
        .click()
        .await
        .unwrap();
    choose_file(&browser, "#f-file", &files, "ab.wasm", &wasm("ab_subject")).await;
    browser.click("form[data-upload] button[type=submit]").await;
    browser
        .wait_text("the uploaded policy's page", |t| t.contains("Uploaded"))
        .await;
    assert_eq!(browser.path().await, "/console/policies/ab-test?ok=uploaded");
    browser.wait_for_text("[data-status-for]", |t| t == "ready").await;
    assert_eq!(api.compiled("ab-test").await["status"], "ready");

    // A letter that names it is listed under "Used by", with the version it takes.
    let newsletter = api.newsletter().await;
    let letter = api
        .letter(
            newsletter,
            json!({ "subject": "Spring sale", "text": "Hi", "template": "ab-test" }),
        )
        .await;
    browser.goto(&format!("{base}/console/policies/ab-test")).await;
    let used = browser.text("section[aria-labelledby=used-by]").await;
    assert!(used.contains("Spring sale"), "{used}");
    assert!(used.contains("template") && used.contains("latest"), "{used}");
    browser
        .find(&format!("a[href='/console/letters/{letter}']"))
        .await;
    browser.assert_accessible().await;
    browser.screenshots("policy").await;
    browser.goto(&format!("{base}/console/policies")).await;
    let list = browser.wait_text("the list", |t| t.contains("ab-test")).await;
    assert!(list.contains("1 letter"), "{list}");

    // Deleting asks first, and the API then knows the name no more.
    browser.goto(&format!("{base}/console/policies/ab-test")).await;
    browser.click("form[action$='/delete'] button").await;
    browser
        .client
        .accept_alert()
        .await
        .expect("a confirmation before deleting");
    browser
        .wait_text("the list after the delete", |t| t.contains("Deleted"))
        .await;
    assert_eq!(api.get("/v1/plugins/ab-test").await.0, 404);
    // The built-in has no delete button.
    browser
        .goto(&format!("{base}/console/policies/default-template"))
        .await;
    let page = browser.wait_text("a built-in", |t| t.contains("built in")).await;
    assert!(!page.contains("Delete policy"), "{page}");
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounces_suppressions_and_the_event_log_in_a_browser() {
    let Some(mut browser) = Browser::start("hearing", false).await else {
        return;
    };
    let server = TestServer::start(None).await;
    let (base, api) = (server.api.base.clone(), &server.api);
    let newsletter = api.newsletter().await;
    api.add_subscribers(
        newsletter,
        json!([{ "email": "ann@example.org", "name": "Ann" }, { "email": "bob@example.org" }]),
    )
    .await;
    let ids = api.subscriber_ids(newsletter).await;
    let (ann, bob) = (ids["ann@example.org"], ids["bob@example.org"]);
    api.post_ok(
        "/v1/bounces",
        json!({ "type": "hard", "email": "ann@example.org", "status": "5.1.1",
                "diagnostic": "550 5.1.1 <ann@example.org>: user unknown",
                "raw": "Reporting-MTA: dns; mx.example.org\nStatus: 5.1.1" }),
        201,
    )
    .await;
    api.post_ok(
        "/v1/bounces",
        json!({ "type": "complaint", "email": "bob@example.org", "raw": "Feedback-Type: abuse" }),
        201,
    )
    .await;
    signed_in(&browser, &base).await;

    // Both reports, newest first, with what the rules decided and the raw message.
    browser.goto(&format!("{base}/console/bounces")).await;
    let text = browser
        .wait_text("the reports", |t| t.contains("ann@example.org"))
        .await;
    assert!(text.contains("bob@example.org"), "{text}");
    assert!(text.contains("5.1.1") && text.contains("user unknown"), "{text}");
    assert!(
        text.find("bob@example.org") < text.find("ann@example.org"),
        "newest first: {text}"
    );
    browser.click("details summary").await;
    let raw = browser.text("pre.raw").await;
    assert!(raw.contains("Feedback-Type: abuse"), "{raw}");
    browser.assert_accessible().await;
    browser.screenshots("bounces").await;

    // Ann's page shows her report; reinstating her makes her active again.
    browser.goto(&format!("{base}/console/subscribers/{ann}")).await;
    let page = browser
        .wait_text("ann's page", |t| t.contains("Bounces and complaints"))
        .await;
    assert!(page.contains("user unknown"), "{page}");
    browser.assert_accessible().await;
    browser
        .click("form[action$='/reinstate'] button[type=submit]")
        .await;
    browser
        .wait_text("the reinstatement", |t| t.contains("Reinstated"))
        .await;
    let (_, ann_now) = api.get(&format!("/v1/subscribers/{ann}")).await;
    assert_eq!(ann_now["status"], "active", "{ann_now}");
    let page = browser.text("main").await;
    assert!(page.contains("no longer counted"), "{page}");

    // The suppression list holds Bob's address (his complaint); an operator adds one
    // address and a typo: the address goes on, the typo is named.
    browser.goto(&format!("{base}/console/suppressions")).await;
    let list = browser
        .wait_text("the list", |t| t.contains("bob@example.org"))
        .await;
    assert!(list.contains("complained"), "{list}");
    browser
        .fill("#f-emails", "carol@example.org\nnot-an-address")
        .await;
    browser.fill("#f-note", "asked by phone").await;
    browser
        .click("form[action='/console/suppressions'] button[type=submit]")
        .await;
    let answer = browser
        .wait_text("the answer", |t| t.contains("not an address"))
        .await;
    assert!(answer.contains("1 added"), "{answer}");
    assert!(answer.contains("carol@example.org"), "{answer}");
    browser.assert_accessible().await;
    browser.screenshots("suppressions").await;
    assert_eq!(api.get("/v1/suppressions/carol@example.org").await.0, 200);
    // Removing asks first.
    browser
        .click("button[aria-label='Remove carol@example.org from the list']")
        .await;
    browser
        .client
        .accept_alert()
        .await
        .expect("a confirmation before removing");
    browser
        .wait_text("the removal", |t| t.contains("Taken off"))
        .await;
    assert_eq!(api.get("/v1/suppressions/carol@example.org").await.0, 404);

    // The event log, newest first, then followed live: an event the user's app posts
    // now appears at the top without a reload.
    browser.goto(&format!("{base}/console/events")).await;
    let log = browser
        .wait_text("the log", |t| t.contains("subscriber.reinstated"))
        .await;
    assert!(
        log.find("subscriber.reinstated") < log.find("subscriber.bounced"),
        "newest first: {log}"
    );
    browser.assert_accessible().await;
    api.post_ok(
        "/v1/events",
        json!({ "type": "custom.purchase", "subscriber": bob, "data": { "sku": "<b>42</b>" } }),
        201,
    )
    .await;
    let first = browser
        .wait_for_text("tbody[data-events] tr:first-child", |t| {
            t.contains("custom.purchase")
        })
        .await;
    assert!(first.contains("<b>42</b>"), "data shown as text: {first}");
    browser.screenshots("events").await;

    // A filter by type and subscriber; a type the API refuses is named at its field.
    browser
        .goto(&format!(
            "{base}/console/events?type=subscriber.bounced&subscriber={ann}"
        ))
        .await;
    let only = browser
        .wait_text("the filtered log", |t| t.contains("subscriber.bounced"))
        .await;
    assert!(!only.contains("custom.purchase"), "{only}");
    assert!(!only.contains("subscriber.reinstated"), "{only}");
    browser
        .goto(&format!("{base}/console/events?type=Not%20A%20Type"))
        .await;
    let refused = browser.text("#e-type").await;
    assert!(!refused.is_empty(), "the bad type is named at its field");
    browser
        .goto(&format!("{base}/console/events?subscriber=nobody@example.org"))
        .await;
    let refused = browser.text("#e-subscriber").await;
    assert!(refused.contains("nobody@example.org"), "{refused}");
    browser.assert_accessible().await;
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_letter_sent_at_a_local_time_is_scheduled_for_that_moment() {
    // India is UTC+05:30 all year: 09:30 there is 04:00 UTC.
    let Some(mut browser) = Browser::start_in_zone("scheduled", false, Some("Asia/Kolkata")).await else {
        return;
    };
    let server = TestServer::start(None).await;
    let (base, api) = (server.api.base.clone(), &server.api);
    let newsletter = api.newsletter().await;
    api.add_subscribers(newsletter, json!([{ "email": "ann@example.org" }]))
        .await;
    let letter = api
        .letter(newsletter, json!({ "subject": "Later", "text": "Hello" }))
        .await;
    signed_in(&browser, &base).await;
    assert_eq!(
        browser
            .eval("return new Date('2030-01-15T09:30').getTimezoneOffset()")
            .await,
        -330,
        "the browser is not in the zone asked for"
    );

    browser.goto(&format!("{base}/console/letters/{letter}")).await;
    browser.click("input[name=when][value=later]").await;
    // A datetime-local field's typing depends on the locale: set its value as a
    // picker would.
    browser
        .eval("document.getElementById('f-send_at').value = '2030-01-15T09:30'; return null")
        .await;
    browser.click("form[action$='/send'] button[type=submit]").await;
    browser
        .wait_text("the job's page", |t| t.contains("sends at"))
        .await;
    let job: u64 = browser
        .path()
        .await
        .trim_start_matches("/console/jobs/")
        .split('?')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let (_, view) = api.get(&format!("/v1/jobs/{job}")).await;
    assert_eq!(view["state"], "scheduled", "{view}");
    assert_eq!(
        view["send_at"], 1_894_680_000u64,
        "09:30 in Kolkata is 04:00 UTC: {view}"
    );
    // The page shows it back in the browser's zone.
    let shown = browser.text("p.meta").await;
    assert!(shown.contains("9:30"), "{shown}");
    browser.assert_accessible().await;
    browser.screenshots("scheduled-job").await;
    browser.close().await;
}
