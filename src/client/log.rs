//! `letterbox events`: the event log, one line per event, and with `--follow` the live
//! stream (`GET /v1/events/stream`), reopened after the last event printed when it
//! drops (a restart, a deploy, a proxy's timeout), so nothing is missed or repeated.

use std::io::Write;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::events::{RECONNECT_FOR, read_stream};
use super::{Client, ClientError};

/// What to print.
pub struct Query {
    pub types: Option<String>,
    pub subscriber: Option<String>,
    /// Events after this id; `None` for the `last` newest.
    pub after: Option<u64>,
    pub last: u64,
    pub follow: bool,
}

/// Prints the events `query` selects, then (with `follow`) new ones until interrupted.
pub async fn run(client: &Client, query: Query) -> Result<(), ClientError> {
    let filters = filters(&query);
    let mut after = match query.after {
        Some(after) => after,
        None => {
            let page = client
                .get(&format!("/v1/events?limit=1&after={}{filters}", i64::MAX))
                .await?;
            page["head"].as_u64().unwrap_or(0).saturating_sub(query.last)
        }
    };
    // What is there now, page by page.
    loop {
        let page = client
            .get(&format!("/v1/events?limit=1000&after={after}{filters}"))
            .await?;
        for event in page["events"].as_array().into_iter().flatten() {
            print(client, event)?;
        }
        after = page["next"].as_u64().unwrap_or(after);
        if page["more"] != true {
            break;
        }
    }
    if !query.follow {
        return Ok(());
    }
    let mut unreachable_since: Option<Instant> = None;
    loop {
        match follow(client, &filters, &mut after).await {
            Ok(()) => unreachable_since = None,
            Err(error @ ClientError::Unreachable { .. }) => {
                let since = *unreachable_since.get_or_insert_with(Instant::now);
                if since.elapsed() > RECONNECT_FOR {
                    return Err(error);
                }
            }
            Err(error) => return Err(error),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn filters(query: &Query) -> String {
    let mut out = String::new();
    for (name, value) in [("type", &query.types), ("subscriber", &query.subscriber)] {
        if let Some(value) = value {
            out.push_str(&format!("&{name}={}", urlencoding(value)));
        }
    }
    out
}

/// Percent-encodes a query value (emails carry `+`, types `*`).
fn urlencoding(value: &str) -> String {
    url::form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

/// One connection of the stream, printing events and moving `after` past each; returns
/// when the server ends it.
async fn follow(client: &Client, filters: &str, after: &mut u64) -> Result<(), ClientError> {
    let path = format!("/v1/events/stream?after={after}{filters}");
    read_stream::<()>(client, &path, |event| {
        let value: Value = serde_json::from_str(&event.data)
            .map_err(|e| ClientError::Io(format!("an event is not JSON: {e}")))?;
        print(client, &value)?;
        if let Some(id) = event.id.and_then(|id| id.parse().ok()) {
            *after = id;
        }
        Ok(None)
    })
    .await?;
    Ok(())
}

/// One event: a JSON line with `--json`, else `#ID TIME TYPE ids data`. A closed
/// stdout (`| head`) ends the command instead of panicking.
fn print(client: &Client, event: &Value) -> Result<(), ClientError> {
    let line = if client.json_output() {
        event.to_string()
    } else {
        human(event)
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .map_err(|e| ClientError::Io(format!("cannot write the output: {e}")))
}

fn human(event: &Value) -> String {
    let ms = event["at_ms"].as_u64().unwrap_or(0);
    let at = humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms));
    let mut line = format!(
        "#{:<6} {at} {:<24}",
        event["id"].as_u64().unwrap_or(0),
        event["type"].as_str().unwrap_or("?")
    );
    for (key, name) in [
        ("newsletter_id", "newsletter"),
        ("subscriber_id", "subscriber"),
        ("job_id", "job"),
    ] {
        if let Some(id) = event[key].as_u64() {
            line.push_str(&format!(" {name}={id}"));
        }
    }
    if let Some(data) = event["data"].as_object().filter(|d| !d.is_empty()) {
        line.push_str(&format!(" {}", Value::Object(data.clone())));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_prints_on_one_line() {
        let event = serde_json::json!({
            "id": 12, "at_ms": 1_796_581_180_743u64, "type": "delivery.failed",
            "newsletter_id": 1, "subscriber_id": 7, "job_id": 3, "letter_id": 2,
            "data": { "reason": "550 5.1.1" }
        });
        assert_eq!(
            human(&event),
            "#12     2026-12-06T18:19:40.743Z delivery.failed          newsletter=1 subscriber=7 job=3 {\"reason\":\"550 5.1.1\"}"
        );
    }
}
