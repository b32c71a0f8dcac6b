//! `letterbox bounces`, `letterbox suppressions add|list|remove` and `letterbox
//! subscribers reinstate`: the reports kept and the suppression list, over the API.

use std::path::PathBuf;

use serde_json::{Value, json};

use super::output::{encode, print, text};
use super::{Client, ClientError};

#[derive(Debug, clap::Args)]
pub struct BouncesArgs {
    /// Only reports about no subscriber (an address nobody on any list has).
    #[arg(long)]
    unattributed: bool,
    /// Only this subscriber's reports (an id).
    #[arg(long, conflicts_with = "unattributed")]
    subscriber: Option<u64>,
    /// How many (at most 1000).
    #[arg(long, default_value_t = 20)]
    limit: u32,
}

#[derive(Debug, clap::Subcommand)]
pub enum SuppressionsCommand {
    /// Put addresses on the list: as arguments, or from a CSV file with an `email`
    /// column (and an optional `note` column).
    Add {
        emails: Vec<String>,
        #[arg(long, conflicts_with = "emails")]
        file: Option<PathBuf>,
        /// Why, for whoever reads the list later.
        #[arg(long)]
        note: Option<String>,
    },
    /// The list, by address.
    List {
        /// Addresses after this one (the previous page's last).
        #[arg(long)]
        after: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Take an address off the list.
    Remove { email: String },
}

pub(super) async fn list(client: &Client, args: BouncesArgs) -> Result<(), ClientError> {
    let path = match args.subscriber {
        Some(id) => format!("/v1/subscribers/{id}/bounces?limit={}", args.limit),
        None => format!(
            "/v1/bounces?limit={}&unattributed={}",
            args.limit, args.unattributed
        ),
    };
    let page = client.get(&path).await?;
    print(client, &page, || {
        let items = page["items"].as_array().cloned().unwrap_or_default();
        if items.is_empty() {
            return "no bounce or complaint reports".into();
        }
        let mut out = format!(
            "{:>6}  {:<20}  {:<9}  {:<6}  {:<30}  {:<7}  DECISION",
            "ID", "WHEN", "KIND", "SOURCE", "EMAIL", "STATUS"
        );
        for b in &items {
            let when = b["at_ms"]
                .as_u64()
                .map(|ms| {
                    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
                    humantime::format_rfc3339_seconds(at).to_string()
                })
                .unwrap_or_default();
            let email = match b["subscriber_id"].as_u64() {
                Some(_) => text(&b["email"]),
                None => format!("{} (unattributed)", text(&b["email"])),
            };
            let status = b["status"].as_str().unwrap_or("-");
            out.push_str(&format!(
                "\n{:>6}  {:<20}  {:<9}  {:<6}  {:<30}  {:<7}  {}",
                text(&b["id"]),
                when,
                text(&b["kind"]),
                text(&b["source"]),
                email,
                status,
                text(&b["decision"])
            ));
        }
        if let Some(next) = page["next"].as_u64() {
            out.push_str(&format!("\n… older reports below id {next}"));
        }
        out
    });
    Ok(())
}

pub(super) async fn reinstate(client: &Client, id: u64) -> Result<(), ClientError> {
    let answer = client
        .post(&format!("/v1/subscribers/{id}/reinstate"), &Value::Null)
        .await?;
    print(client, &answer, || {
        let s = &answer["subscriber"];
        let mut out = format!(
            "subscriber {} <{}> is {}",
            text(&s["id"]),
            text(&s["email"]),
            text(&s["status"])
        );
        if answer["lifted_suppression"].is_object() {
            out.push_str("\nits address is off the suppression list");
        }
        out
    });
    Ok(())
}

pub(super) async fn suppressions(client: &Client, command: SuppressionsCommand) -> Result<(), ClientError> {
    match command {
        SuppressionsCommand::Add { emails, file, note } => {
            let answer = match file {
                Some(file) => {
                    if note.is_some() {
                        return Err(ClientError::Usage(
                            "--note is for addresses given as arguments; a CSV file has a note column".into(),
                        ));
                    }
                    let bytes = std::fs::read(&file)
                        .map_err(|e| ClientError::Io(format!("cannot read {}: {e}", file.display())))?;
                    client.post_bytes("/v1/suppressions", "text/csv", bytes).await?
                }
                None if emails.is_empty() => {
                    return Err(ClientError::Usage("give addresses, or --file FILE.csv".into()));
                }
                None => {
                    client
                        .post("/v1/suppressions", &json!({ "emails": emails, "note": note }))
                        .await?
                }
            };
            print(client, &answer, || {
                let mut out = format!(
                    "{} added, {} already on the list, {} rejected",
                    text(&answer["added"]),
                    text(&answer["already"]),
                    text(&answer["rejected"])
                );
                for e in answer["errors"].as_array().into_iter().flatten() {
                    out.push_str(&format!("\n  row {}: {}", text(&e["row"]), text(&e["reason"])));
                }
                out
            });
        }
        SuppressionsCommand::List { after, limit } => {
            let mut path = format!("/v1/suppressions?limit={limit}");
            if let Some(after) = after {
                path.push_str(&format!("&after={}", encode(&after)));
            }
            let page = client.get(&path).await?;
            print(client, &page, || {
                let items = page["items"].as_array().cloned().unwrap_or_default();
                if items.is_empty() {
                    return "the suppression list is empty".into();
                }
                let mut out = format!("{:<40}  {:<10}  {:<20}  NOTE", "EMAIL", "REASON", "SINCE");
                for s in &items {
                    let since = s["since"]
                        .as_u64()
                        .map(|secs| {
                            let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
                            humantime::format_rfc3339_seconds(at).to_string()
                        })
                        .unwrap_or_default();
                    out.push_str(&format!(
                        "\n{:<40}  {:<10}  {:<20}  {}",
                        text(&s["email"]),
                        text(&s["reason"]),
                        since,
                        s["note"].as_str().unwrap_or("")
                    ));
                }
                if let Some(next) = page["next"].as_str() {
                    out.push_str(&format!("\n… more after {next} (--after {next})"));
                }
                out
            });
        }
        SuppressionsCommand::Remove { email } => {
            let removed = client
                .delete(&format!("/v1/suppressions/{}", encode(&email)))
                .await?;
            print(client, &removed, || {
                format!("{} is off the suppression list", text(&removed["email"]))
            });
        }
    }
    Ok(())
}
