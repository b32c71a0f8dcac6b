//! Following a job: its Server-Sent Events (`GET /v1/jobs/{id}/events`) drawn as a
//! progress bar. A dropped stream (a server restart, a proxy timeout) is reopened, so
//! `send --follow` outlives a deploy.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::Method;
use serde_json::Value;

use super::{Client, ClientError, problem};

/// How long a stream may stay unreachable before following it gives up.
pub(super) const RECONNECT_FOR: Duration = Duration::from_secs(120);

/// One event of the stream: its name (`progress` or `end`) and JSON data.
#[derive(Debug, PartialEq)]
pub(super) struct Event {
    pub name: String,
    pub data: String,
    /// The `id` field, when the event has one.
    pub id: Option<String>,
}

/// Splits a Server-Sent Events byte stream into events. Keeps what is not yet a whole
/// event; comments (keep-alives) and fields other than `event`/`data` are skipped.
#[derive(Default)]
pub(super) struct Parser {
    buffer: Vec<u8>,
}

impl Parser {
    pub fn push(&mut self, chunk: &[u8]) -> Vec<Event> {
        self.buffer.extend_from_slice(chunk);
        let mut events = Vec::new();
        while let Some(end) = find_blank_line(&self.buffer) {
            let block: Vec<u8> = self.buffer.drain(..end.1).collect();
            let text = String::from_utf8_lossy(&block[..end.0]);
            let mut name = String::from("message");
            let mut id = None;
            let mut data: Vec<&str> = Vec::new();
            for line in text.lines() {
                let (field, value) = line.split_once(':').unwrap_or((line, ""));
                let value = value.strip_prefix(' ').unwrap_or(value);
                match field {
                    "event" => name = value.to_string(),
                    "data" => data.push(value),
                    "id" => id = Some(value.to_string()),
                    _ => {}
                }
            }
            if !data.is_empty() {
                events.push(Event {
                    name,
                    data: data.join("\n"),
                    id,
                });
            }
        }
        events
    }
}

/// Where the first blank line ends a block: (end of the block's text, end of the blank
/// line). Accepts `\n\n` and `\r\n\r\n`.
fn find_blank_line(buffer: &[u8]) -> Option<(usize, usize)> {
    let lf = buffer.windows(2).position(|w| w == b"\n\n").map(|i| (i, i + 2));
    let crlf = buffer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, i + 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 < b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

/// Follows job `id` until it is completed, cancelled or failed; returns the job as the
/// last event showed it. The bar is drawn on stderr when it is a terminal.
pub(super) async fn follow(client: &Client, id: u64) -> Result<Value, ClientError> {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} job {prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} ({per_sec}, eta {eta}) {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_prefix(id.to_string());
    bar.enable_steady_tick(Duration::from_millis(200));
    let mut unreachable_since: Option<Instant> = None;
    loop {
        match stream(client, id, &bar).await {
            Ok(Some(job)) => {
                bar.finish_and_clear();
                return Ok(job);
            }
            // The stream ended before the job did: reopen it.
            Ok(None) => unreachable_since = None,
            Err(error @ ClientError::Unreachable { .. }) => {
                let since = *unreachable_since.get_or_insert_with(Instant::now);
                if since.elapsed() > RECONNECT_FOR {
                    bar.abandon();
                    return Err(error);
                }
                bar.set_message(format!("reconnecting ({error})"));
            }
            Err(error) => {
                bar.abandon();
                return Err(error);
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Reads one connection's events into `bar`: `Some(job)` at the `end` event, `None` if
/// the stream closed first.
async fn stream(client: &Client, id: u64, bar: &ProgressBar) -> Result<Option<Value>, ClientError> {
    read_stream(client, &format!("/v1/jobs/{id}/events"), |event| {
        let job: Value = serde_json::from_str(&event.data)
            .map_err(|e| ClientError::Io(format!("a job event is not JSON: {e}")))?;
        draw(bar, &job);
        Ok((event.name == "end").then_some(job))
    })
    .await
}

/// Opens the Server-Sent Events stream at `path` and hands each event to `on_event`
/// until it returns `Some` (that is the result) or the server closes the stream
/// (`None`: the caller may reopen it). A refusal is the server's problem; a dropped
/// connection is `Unreachable`.
pub(super) async fn read_stream<T>(
    client: &Client,
    path: &str,
    mut on_event: impl FnMut(Event) -> Result<Option<T>, ClientError>,
) -> Result<Option<T>, ClientError> {
    let response = client
        .request(Method::GET, path)
        .header(reqwest::header::ACCEPT, "text/event-stream")
        .send()
        .await
        .map_err(|e| client.unreachable(e))?;
    let status = response.status();
    if !status.is_success() {
        let body = response.bytes().await.unwrap_or_default();
        return Err(problem(status, &body));
    }
    let mut parser = Parser::default();
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| client.unreachable(e))?;
        for event in parser.push(&chunk) {
            if let Some(done) = on_event(event)? {
                return Ok(Some(done));
            }
        }
    }
    Ok(None)
}

fn draw(bar: &ProgressBar, job: &Value) {
    let counts = &job["counts"];
    let count = |k: &str| counts[k].as_u64().unwrap_or(0);
    let total: u64 = [
        "pending",
        "sending",
        "delivered",
        "skipped",
        "retrying",
        "failed",
        "cancelled",
    ]
    .iter()
    .map(|k| count(k))
    .sum();
    let open = count("pending") + count("sending") + count("retrying");
    bar.set_length(total);
    bar.set_position(total - open);
    let mut message = format!(
        "{} · {} delivered, {} skipped, {} failed",
        job["state"].as_str().unwrap_or("?"),
        count("delivered"),
        count("skipped"),
        count("failed")
    );
    if count("retrying") > 0 {
        message.push_str(&format!(", {} retrying", count("retrying")));
    }
    if let Some(reason) = job["pause_reason"].as_str() {
        message.push_str(&format!(" (paused: {reason})"));
    }
    if let Some(reason) = job["stalled"]["reason"].as_str() {
        message.push_str(&format!(" (stalled: {reason})"));
    }
    if let Some(reason) = job["waiting"]["reason"].as_str() {
        message.push_str(&format!(" (waiting: {reason})"));
    }
    bar.set_message(message);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_chunks_and_keep_alives_are_skipped() {
        let mut parser = Parser::default();
        assert!(parser.push(b"event: progress\ndata: {\"a\"").is_empty());
        let events = parser.push(b":1}\n\n:\n\nevent: end\r\nid: 7\r\ndata: 2\r\ndata: 3\r\n\r\nevent: x");
        assert_eq!(
            events,
            vec![
                Event {
                    name: "progress".into(),
                    data: "{\"a\":1}".into(),
                    id: None,
                },
                Event {
                    name: "end".into(),
                    data: "2\n3".into(),
                    id: Some("7".into()),
                },
            ]
        );
        assert!(parser.push(b"\n").is_empty(), "not yet a whole event");
    }
}
