//! Subscribers as an operator manages them: listing with a cursor or by email, reading,
//! changing (status, name, attributes, email) and erasing one; and the runner's promise
//! that a subscriber who is not active gets nothing, even from a job already running.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{SmtpServer, TestServer};

fn people(n: usize) -> Value {
    let rows: Vec<Value> = (0..n)
        .map(|i| json!({ "email": format!("s{i}@example.org"), "name": format!("S {i}"), "attributes": { "plan": "pro", "n": i } }))
        .collect();
    json!(rows)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_read_change_and_erase() {
    let server = TestServer::start(None).await;
    let api = &server.api;
    let newsletter = api.newsletter().await;
    api.add_subscribers(newsletter, people(30)).await;

    // Every subscriber once, in id order, 7 at a time.
    let mut seen = Vec::new();
    let mut cursor = 0;
    loop {
        let path = format!("/v1/newsletters/{newsletter}/subscribers?limit=7&cursor={cursor}");
        let (status, page) = api.get(&path).await;
        assert_eq!(status, 200, "{page}");
        seen.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["id"].as_u64().unwrap()),
        );
        match page["next"].as_u64() {
            Some(next) => cursor = next,
            None => break,
        }
    }
    assert_eq!(seen.len(), 30);
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");

    // By email, the domain case-insensitively.
    let (status, page) = api
        .get(&format!(
            "/v1/newsletters/{newsletter}/subscribers?email=s3@EXAMPLE.org"
        ))
        .await;
    assert_eq!(status, 200);
    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{page}");
    assert_eq!(items[0]["email"], "s3@example.org");
    let id = items[0]["id"].as_u64().unwrap();
    let (_, none) = api
        .get(&format!(
            "/v1/newsletters/{newsletter}/subscribers?email=nobody@example.org"
        ))
        .await;
    assert_eq!(none["items"], json!([]));
    assert_eq!(api.get("/v1/newsletters/999/subscribers").await.0, 404);
    let (status, body) = api
        .get(&format!("/v1/newsletters/{newsletter}/subscribers?limit=0"))
        .await;
    assert_eq!(status, 422, "{body}");

    let (status, one) = api.get(&format!("/v1/subscribers/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(one["status"], "active");
    assert_eq!(one["name"], "S 3");

    // A merge patch of the attributes, a cleared name, a new status.
    let change = json!({ "status": "bounced", "name": null, "attributes": { "plan": null, "tier": "gold" } });
    let (status, changed) = api.patch(&format!("/v1/subscribers/{id}"), change).await;
    assert_eq!(status, 200, "{changed}");
    assert_eq!(changed["status"], "bounced");
    assert_eq!(changed["name"], Value::Null);
    assert_eq!(changed["attributes"], json!({ "n": 3, "tier": "gold" }));
    assert_eq!(api.get(&format!("/v1/subscribers/{id}")).await.1, changed);

    // Bad changes are refused and name the problem.
    let (status, body) = api
        .patch(
            &format!("/v1/subscribers/{id}"),
            json!({ "email": "s4@example.org" }),
        )
        .await;
    assert_eq!(status, 409, "{body}");
    let (status, body) = api
        .patch(&format!("/v1/subscribers/{id}"), json!({ "status": "asleep" }))
        .await;
    assert!(status == 400 || status == 422, "{status} {body}");
    assert!(body.to_string().contains("asleep"), "{body}");
    let (status, body) = api
        .patch(
            &format!("/v1/subscribers/{id}"),
            json!({ "email": "not an address" }),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(api.patch("/v1/subscribers/99999", json!({})).await.0, 404);

    // A new email moves the upsert index with it.
    let (status, moved) = api
        .patch(
            &format!("/v1/subscribers/{id}"),
            json!({ "email": "three@example.org" }),
        )
        .await;
    assert_eq!(status, 200, "{moved}");
    let summary = api
        .add_subscribers(
            newsletter,
            json!([{ "email": "three@example.org" }, { "email": "s3@example.org" }]),
        )
        .await;
    assert_eq!(summary["updated"], 1, "{summary}");
    assert_eq!(summary["inserted"], 1, "{summary}");

    // Erase: gone, and its email is free again.
    assert_eq!(api.delete(&format!("/v1/subscribers/{id}")).await.0, 204);
    assert_eq!(api.get(&format!("/v1/subscribers/{id}")).await.0, 404);
    assert_eq!(api.delete(&format!("/v1/subscribers/{id}")).await.0, 404);
    let (_, none) = api
        .get(&format!(
            "/v1/newsletters/{newsletter}/subscribers?email=three@example.org"
        ))
        .await;
    assert_eq!(none["items"], json!([]));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_active_subscribers_receive_even_mid_job_and_erasure_scrubs_deliveries() {
    stop_four_mid_job(Stop::Status).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsubscribe_link_used_mid_job_stops_further_sends() {
    stop_four_mid_job(Stop::OneClickLink).await;
}

/// How the test stops a subscriber from receiving.
#[derive(Clone, Copy)]
enum Stop {
    /// `PATCH /v1/subscribers/{id}` with a status.
    Status,
    /// The RFC 8058 one-click POST to the subscriber's own `List-Unsubscribe` URL
    /// (read from a preview of the letter for them).
    OneClickLink,
}

async fn stop_four_mid_job(how: Stop) {
    // A slow sink and one message at a time: the job is still running when the
    // statuses change.
    let smtp = SmtpServer::start_with_delay(Duration::from_millis(60)).await;
    let server = TestServer::start(Some(&smtp)).await;
    let api = &server.api;
    let newsletter = api.newsletter().await;
    api.add_subscribers(newsletter, people(20)).await;
    let (_, page) = api
        .get(&format!("/v1/newsletters/{newsletter}/subscribers?limit=100"))
        .await;
    let ids: Vec<u64> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_u64().unwrap())
        .collect();
    let letter = api
        .letter(newsletter, json!({ "subject": "Hi", "text": "Hello {{ name }}" }))
        .await;
    let job = api.send(letter, json!({ "concurrency": 1 })).await;
    api.wait_for(job, Duration::from_secs(30), |j| {
        j["counts"]["delivered"].as_u64() >= Some(2)
    })
    .await;
    // Four who have not received it yet change status while the job runs. One message
    // may be in flight at this moment (concurrency 1), past its last check: at most one
    // of the four may still get it.
    let received_before: Vec<String> = smtp.received().iter().map(|m| m.recipients[0].clone()).collect();
    let statuses = ["bounced", "complained", "unsubscribed", "bounced"];
    let mut changed = Vec::new();
    for (i, id) in ids.iter().enumerate().rev() {
        let email = format!("s{i}@example.org");
        if received_before.contains(&email) || changed.len() == statuses.len() {
            continue;
        }
        let status = match how {
            Stop::Status => statuses[changed.len()],
            Stop::OneClickLink => "unsubscribed",
        };
        let (code, body) = match how {
            Stop::Status => {
                api.patch(&format!("/v1/subscribers/{id}"), json!({ "status": status }))
                    .await
            }
            Stop::OneClickLink => {
                let preview = api
                    .post_ok(
                        &format!("/v1/letters/{letter}/preview"),
                        json!({ "subscriber_id": id }),
                        200,
                    )
                    .await;
                let message = preview["message"].as_str().unwrap();
                let url = message
                    .lines()
                    .find_map(|l| l.strip_prefix("List-Unsubscribe: <"))
                    .and_then(|l| l.strip_suffix('>'))
                    .unwrap_or_else(|| panic!("no List-Unsubscribe in {message}"));
                let path = url
                    .strip_prefix(&api.base)
                    .expect("the link points at this server");
                let form = b"List-Unsubscribe=One-Click".to_vec();
                api.post_raw(path, "application/x-www-form-urlencoded", form)
                    .await
            }
        };
        assert_eq!(code, 200, "{body}");
        changed.push((*id, email, status));
    }
    assert_eq!(changed.len(), 4, "the job finished too early for this test");
    let done = api.wait_job(job, Duration::from_secs(60)).await;
    let received: Vec<String> = smtp.received().iter().map(|m| m.recipients[0].clone()).collect();
    let late = changed
        .iter()
        .filter(|(_, email, _)| received.contains(email))
        .count();
    assert!(
        late <= 1,
        "{late} of the changed subscribers still received the letter"
    );
    assert_eq!(
        done["counts"]["skipped"].as_u64(),
        Some(4 - late as u64),
        "{done}"
    );
    assert_eq!(
        done["counts"]["delivered"].as_u64(),
        Some(16 + late as u64),
        "{done}"
    );
    for (id, email, status) in &changed {
        if received.contains(email) {
            continue;
        }
        let (_, deliveries) = api
            .get(&format!("/v1/jobs/{job}/deliveries?cursor={}&limit=1", id - 1))
            .await;
        assert_eq!(
            deliveries["items"][0]["reason"],
            format!("subscriber is {status}"),
            "{deliveries}"
        );
    }

    // Erasing a subscriber who was sent to removes their address from the job's records.
    let erased_email = received_before[0].clone();
    let erased = ids[erased_email[1..]
        .split('@')
        .next()
        .unwrap()
        .parse::<usize>()
        .unwrap()];
    assert_eq!(api.delete(&format!("/v1/subscribers/{erased}")).await.0, 204);
    let (_, deliveries) = api
        .get(&format!(
            "/v1/jobs/{job}/deliveries?cursor={}&limit=1",
            erased - 1
        ))
        .await;
    let record = &deliveries["items"][0];
    assert_eq!(record["subscriber_id"], erased, "{deliveries}");
    assert_eq!(record["state"], "delivered", "{record}");
    assert!(!record.to_string().contains(&erased_email), "{record}");

    // A later letter reaches only the active subscribers who are left.
    let before = smtp.count();
    let second = api
        .letter(newsletter, json!({ "subject": "Again", "text": "Hello again" }))
        .await;
    let job = api.send(second, json!({})).await;
    let done = api.wait_job(job, Duration::from_secs(60)).await;
    assert_eq!(done["counts"]["delivered"], 15, "{done}");
    let later: Vec<String> = smtp.received()[before..]
        .iter()
        .map(|m| m.recipients[0].clone())
        .collect();
    assert_eq!(later.len(), 15);
    for (_, email, _) in &changed {
        assert!(!later.contains(email), "{email} received the second letter");
    }
    assert!(!later.contains(&erased_email));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100k_row_csv_imports_with_its_bad_rows_counted() {
    let server = TestServer::start(None).await;
    let api = &server.api;
    let newsletter = api.newsletter().await;
    let mut csv = String::from("email,name,plan,city\n");
    let (mut bad_email, mut bad_width, mut repeated) = (0, 0, 0);
    let n = 100_000;
    for i in 0..n {
        match i {
            // A quoted name with a comma and a line break, and a non-ASCII one.
            7 => csv.push_str("r7@example.org,\"Doe, Jane\nthe second\",pro,\"Zürich\"\n"),
            _ if i % 10_000 == 5 => {
                csv.push_str(&format!("not-an-address-{i},N {i},free,X\n"));
                bad_email += 1;
            }
            _ if i % 25_000 == 9 => {
                csv.push_str(&format!("r{i}@example.org,N {i}\n"));
                bad_width += 1;
            }
            // The same address again, its domain in capitals: an update, not a new row.
            _ if i % 20_000 == 11 => {
                csv.push_str(&format!("r{}@EXAMPLE.org,Again,team,\n", i - 1));
                repeated += 1;
            }
            _ => csv.push_str(&format!("r{i}@example.org,N {i},free,Town {}\n", i % 7)),
        }
    }
    let path = format!("/v1/newsletters/{newsletter}/subscribers");
    let (status, summary) = api.post_raw(&path, "text/csv", csv.into_bytes()).await;
    assert_eq!(status, 201, "{summary}");
    let rejected = bad_email + bad_width;
    assert_eq!(summary["rejected"], rejected, "{summary}");
    assert_eq!(summary["updated"], repeated, "{summary}");
    assert_eq!(summary["inserted"], n - rejected - repeated, "{summary}");
    let errors = summary["errors"].as_array().unwrap();
    assert_eq!(errors.len() as u64, rejected);
    // Row 6 (i = 5) is the first bad email, on line 7 (after the header). Row 10 has
    // too few fields; the quoted line break in row 8 puts it on line 12.
    assert_eq!(errors[0]["row"], 6, "{summary}");
    assert_eq!(errors[0]["line"], 7, "{summary}");
    assert!(errors[0]["reason"].as_str().unwrap().contains("not-an-address-5"));
    let width = errors.iter().find(|e| e["row"] == 10).expect("row 10 refused");
    assert_eq!(width["line"], 12, "{width}");
    assert!(width["reason"].as_str().unwrap().contains("2 fields"), "{width}");

    let find = |email: &str| format!("/v1/newsletters/{newsletter}/subscribers?email={email}");
    let (_, page) = api.get(&find("r7@example.org")).await;
    let jane = &page["items"][0];
    // A name is one header line: its line break is folded to a space, and counted.
    assert_eq!(jane["name"], "Doe, Jane the second");
    assert_eq!(summary["names_folded"], 1, "{summary}");
    assert_eq!(jane["attributes"], json!({ "plan": "pro", "city": "Zürich" }));
    // The repeated row updated the first: new name and plan, its empty city left as was.
    let (_, page) = api.get(&find("r10@example.org")).await;
    let updated = &page["items"][0];
    assert_eq!(updated["name"], "Again");
    assert_eq!(updated["attributes"], json!({ "plan": "team", "city": "Town 3" }));

    let (_, listed) = api.get(&format!("{path}?limit=1000")).await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 1000);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_by_text_status_and_attribute() {
    let server = TestServer::start(None).await;
    let api = &server.api;
    let newsletter = api.newsletter().await;
    api.add_subscribers(newsletter, people(30)).await;
    api.add_subscribers(
        newsletter,
        json!([{ "email": "zoe@example.org", "name": "Zoë Ünal", "attributes": { "plan": "team" } }]),
    )
    .await;
    let path = format!("/v1/newsletters/{newsletter}/subscribers");
    let emails = |page: &Value| -> Vec<String> {
        page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["email"].as_str().unwrap().to_string())
            .collect()
    };
    let (status, page) = api.get(&format!("{path}?q=%C3%9CNAL")).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(emails(&page), ["zoe@example.org"]);
    let (_, page) = api.get(&format!("{path}?attribute=plan%3Dteam")).await;
    assert_eq!(emails(&page), ["zoe@example.org"]);
    let (_, page) = api.get(&format!("{path}?attribute=n%3D7")).await;
    assert_eq!(emails(&page), ["s7@example.org"]);
    // Pages of a search go on from `next`.
    let (_, first) = api.get(&format!("{path}?q=s1&limit=5")).await;
    assert_eq!(
        emails(&first),
        [
            "s1@example.org",
            "s10@example.org",
            "s11@example.org",
            "s12@example.org",
            "s13@example.org"
        ]
    );
    let (_, second) = api
        .get(&format!("{path}?q=s1&limit=5&cursor={}", first["next"]))
        .await;
    assert_eq!(
        emails(&second),
        [
            "s14@example.org",
            "s15@example.org",
            "s16@example.org",
            "s17@example.org",
            "s18@example.org"
        ]
    );
    let id = api.subscriber_ids(newsletter).await["s4@example.org"];
    api.patch(
        &format!("/v1/subscribers/{id}"),
        json!({ "status": "unsubscribed" }),
    )
    .await;
    let (_, page) = api.get(&format!("{path}?status=unsubscribed")).await;
    assert_eq!(emails(&page), ["s4@example.org"]);
    let (status, problem) = api.get(&format!("{path}?attribute=plan")).await;
    assert_eq!(status, 422, "{problem}");
    assert_eq!(problem["errors"][0]["field"], "attribute");
    let (status, _) = api.get(&format!("{path}?status=gone")).await;
    assert_eq!(status, 400);
}
