//! `letterbox automation create|list|pause|resume|failures`: automations over the API.

use serde_json::{Value, json};

use super::output::{print, text};
use super::{Client, ClientError};

#[derive(Debug, clap::Subcommand)]
pub enum AutomationCommand {
    /// Create an automation: its policy (an uploaded plugin of kind automation), the
    /// event types it listens to and its config, checked by the policy's `validate`.
    Create {
        name: String,
        /// The automation policy: NAME (its latest version) or NAME@SHA256.
        #[arg(long)]
        policy: String,
        /// Event types, comma-separated: exact (`subscriber.created`) or a prefix
        /// (`custom.*`).
        #[arg(long, value_delimiter = ',', required = true)]
        events: Vec<String>,
        /// Only events of this newsletter.
        #[arg(long)]
        newsletter: Option<u64>,
        /// The automation's config: a JSON object, or @FILE to read it from a file.
        /// (`--config` is the server's settings file.)
        #[arg(long)]
        with: Option<String>,
    },
    /// Every automation: state, policy, events, counts.
    List,
    /// Stop an automation; events recorded meanwhile wait for it.
    Pause { id: u64 },
    /// Start a paused automation again where it stopped.
    Resume { id: u64 },
    /// The events and timers an automation failed on, with the reason.
    Failures {
        id: u64,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Retry failed events and timers (the ones named, or the oldest 1,000): the policy
    /// is called for each again in the next turn.
    Retry { id: u64, failures: Vec<u64> },
}

pub(super) async fn run(client: &Client, command: AutomationCommand) -> Result<(), ClientError> {
    match command {
        AutomationCommand::Create {
            name,
            policy,
            events,
            newsletter,
            with,
        } => {
            let config: Value = match with {
                None => json!({}),
                Some(text) => {
                    let text = match text.strip_prefix('@') {
                        Some(file) => std::fs::read_to_string(file)
                            .map_err(|e| ClientError::Usage(format!("--with {text}: {e}")))?,
                        None => text,
                    };
                    serde_json::from_str(&text)
                        .map_err(|e| ClientError::Usage(format!("--with is not JSON: {e}")))?
                }
            };
            let mut body = json!({ "name": name, "policy": policy, "events": events, "config": config });
            if let Some(newsletter) = newsletter {
                body["newsletter_id"] = json!(newsletter);
            }
            let created = client.post("/v1/automations", &body).await?;
            print(client, &created, || {
                format!(
                    "automation {} ({}) created: {} on {}",
                    created["id"],
                    text(&created["name"]),
                    text(&created["policy"]),
                    events_of(&created)
                )
            });
        }
        AutomationCommand::List => {
            let all = client.get("/v1/automations").await?;
            print(client, &all, || {
                let items = all.as_array().cloned().unwrap_or_default();
                if items.is_empty() {
                    return "no automations".into();
                }
                let mut out = format!(
                    "{:>4}  {:<20}  {:<7}  {:<20}  {:>8}  {:>6}  EVENTS",
                    "ID", "NAME", "STATE", "POLICY", "HANDLED", "FAILED"
                );
                for a in &items {
                    out.push_str(&format!(
                        "\n{:>4}  {:<20}  {:<7}  {:<20}  {:>8}  {:>6}  {}",
                        a["id"].as_u64().unwrap_or(0),
                        text(&a["name"]),
                        text(&a["state"]),
                        text(&a["policy"]),
                        a["handled"].as_u64().unwrap_or(0),
                        a["failed"].as_u64().unwrap_or(0),
                        events_of(a)
                    ));
                    if let Some(reason) = a["pause_reason"].as_str() {
                        out.push_str(&format!("\n      paused: {reason}"));
                    }
                }
                out
            });
        }
        AutomationCommand::Pause { id } | AutomationCommand::Resume { id } => {
            let verb = match command {
                AutomationCommand::Pause { .. } => "pause",
                _ => "resume",
            };
            let changed = client
                .post(&format!("/v1/automations/{id}/{verb}"), &json!({}))
                .await?;
            print(client, &changed, || {
                format!("automation {id} is {}", text(&changed["state"]))
            });
        }
        AutomationCommand::Retry { id, failures } => {
            let done = client
                .post(
                    &format!("/v1/automations/{id}/failures/retry"),
                    &json!({ "ids": failures }),
                )
                .await?;
            print(client, &done, || {
                let kept = done["kept"].as_array().map_or(0, Vec::len);
                let mut line = format!("automation {id}: {} failures to be retried", done["retried"]);
                if kept > 0 {
                    line.push_str(&format!("; {kept} kept (their timers were started again since)"));
                }
                line
            });
        }
        AutomationCommand::Failures { id, limit } => {
            let failures = client
                .get(&format!("/v1/automations/{id}/failures?limit={limit}"))
                .await?;
            print(client, &failures, || {
                let items = failures.as_array().cloned().unwrap_or_default();
                if items.is_empty() {
                    return format!("automation {id} has no failures");
                }
                items
                    .iter()
                    .map(|f| {
                        let what = match f["trigger"]["kind"].as_str() {
                            Some("event") => format!("event {}", f["trigger"]["event_id"]),
                            _ => format!("timer {}", text(&f["trigger"]["timer"]["name"])),
                        };
                        format!(
                            "{:>6}  {what}  subscriber {}  {}",
                            f["id"].as_u64().unwrap_or(0),
                            f["subscriber_id"],
                            text(&f["reason"])
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
    }
    Ok(())
}

fn events_of(automation: &Value) -> String {
    automation["events"]
        .as_array()
        .map(|e| e.iter().map(text).collect::<Vec<_>>().join(","))
        .unwrap_or_default()
}
