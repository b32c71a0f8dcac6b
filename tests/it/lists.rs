//! Newsletters and letters as an API client manages them: listing, changing and deleting,
//! with a job that is not finished holding its letter and its newsletter.

use std::time::Duration;

use serde_json::json;

use crate::support::TestServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newsletters_and_letters_list_change_and_delete() {
    let server = TestServer::start(None).await;
    let api = &server.api;
    let mut made = Vec::new();
    for _ in 0..3 {
        made.push(api.newsletter().await);
    }
    let (status, page) = api.get("/v1/newsletters?limit=2").await;
    assert_eq!(status, 200, "{page}");
    let first: Vec<u64> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_u64().unwrap())
        .collect();
    assert_eq!(first, made[..2]);
    let (_, rest) = api
        .get(&format!("/v1/newsletters?limit=2&cursor={}", page["next"]))
        .await;
    assert_eq!(rest["items"][0]["id"].as_u64(), Some(made[2]));
    assert!(rest["next"].is_null(), "{rest}");

    // A change is checked as a new newsletter is, each problem at its field; a body that
    // is not an object is not read as the fields in order.
    let n = made[0];
    let (status, problem) = api
        .patch(&format!("/v1/newsletters/{n}"), json!([null, null]))
        .await;
    assert_eq!(status, 422, "{problem}");
    let (status, problem) = api
        .patch(
            &format!("/v1/newsletters/{n}"),
            json!({ "name": " ", "from": "nobody" }),
        )
        .await;
    assert_eq!(status, 422, "{problem}");
    let fields: Vec<&str> = problem["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["name", "from"]);
    let (status, changed) = api
        .patch(
            &format!("/v1/newsletters/{n}"),
            json!({ "name": " Daily ", "from": "Daily <daily@example.com>" }),
        )
        .await;
    assert_eq!(status, 200, "{changed}");
    assert_eq!(
        (changed["name"].as_str(), changed["from"].as_str()),
        (Some("Daily"), Some("Daily <daily@example.com>"))
    );

    // Letters: listed per newsletter; an edit is checked as a new letter is.
    let letter = api
        .letter(n, json!({ "subject": "Hello {{ name }}", "text": "Hi\r\n" }))
        .await;
    let other = api
        .letter(made[1], json!({ "subject": "Other", "text": "x" }))
        .await;
    let (status, letters) = api.get(&format!("/v1/newsletters/{n}/letters")).await;
    assert_eq!(status, 200, "{letters}");
    let ids: Vec<u64> = letters["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [letter]);
    assert_eq!(api.get("/v1/newsletters/999/letters").await.0, 404);

    let (status, problem) = api
        .patch(
            &format!("/v1/letters/{letter}"),
            json!({ "subject": "Hi {{ name" }),
        )
        .await;
    assert_eq!(status, 422, "{problem}");
    assert_eq!(problem["errors"][0]["field"], "subject", "{problem}");
    let (status, problem) = api
        .patch(
            &format!("/v1/letters/{letter}"),
            json!({ "filter": "no-such-policy" }),
        )
        .await;
    assert!(status == 404 || status == 422, "{status} {problem}");
    let (status, edited) = api
        .patch(
            &format!("/v1/letters/{letter}"),
            json!({ "subject": "Hi {{ email }}", "html": "<p>Hi</p>" }),
        )
        .await;
    assert_eq!(status, 200, "{edited}");
    assert_eq!(
        (edited["subject"].as_str(), edited["text"].as_str()),
        (Some("Hi {{ email }}"), Some("Hi\r\n"))
    );
    let (_, edited) = api
        .patch(&format!("/v1/letters/{letter}"), json!({ "html": null }))
        .await;
    assert!(edited["html"].is_null(), "{edited}");

    // A scheduled job holds its letter and its newsletter.
    api.add_subscribers(n, json!([{ "email": "ann@example.org" }]))
        .await;
    let job = api
        .send(letter, json!({ "send_at": "2099-01-01T00:00:00Z" }))
        .await;
    let (status, problem) = api
        .patch(&format!("/v1/letters/{letter}"), json!({ "text": "late" }))
        .await;
    assert_eq!(status, 409, "{problem}");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains(&format!("job {job}")),
        "{problem}"
    );
    assert_eq!(api.delete(&format!("/v1/letters/{letter}")).await.0, 409);
    let (status, problem) = api.delete(&format!("/v1/newsletters/{n}")).await;
    assert_eq!(status, 409, "{problem}");
    assert!(
        problem["detail"].as_str().unwrap().contains("1 subscriber"),
        "{problem}"
    );

    let (status, body) = api.post(&format!("/v1/jobs/{job}/cancel"), json!({})).await;
    assert_eq!(status, 200, "{body}");
    api.wait_for(job, Duration::from_secs(20), |j| j["state"] == "cancelled")
        .await;
    let ann = api.subscriber_ids(n).await["ann@example.org"];
    assert_eq!(api.delete(&format!("/v1/subscribers/{ann}")).await.0, 204);
    assert_eq!(api.delete(&format!("/v1/letters/{letter}")).await.0, 204);
    assert_eq!(api.get(&format!("/v1/letters/{letter}")).await.0, 404);
    assert_eq!(api.delete(&format!("/v1/newsletters/{n}")).await.0, 204);
    assert_eq!(api.get(&format!("/v1/newsletters/{n}")).await.0, 404);
    // The cancelled job stays, as the record of what was (not) sent.
    assert_eq!(api.get(&format!("/v1/jobs/{job}")).await.0, 200);
    assert_eq!(api.get(&format!("/v1/letters/{other}")).await.0, 200);
}
