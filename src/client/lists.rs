//! `letterbox newsletter create|list|edit|delete` and `letterbox letter
//! create|list|show|edit|delete|preview`: newsletters and their letters, over the API.

use std::path::PathBuf;

use serde_json::{Map, Value, json};

use super::output::{print, read_text, text};
use super::{Client, ClientError};

#[derive(Debug, clap::Subcommand)]
pub enum NewsletterCommand {
    Create {
        #[arg(long)]
        name: String,
        /// The From of its letters: `"Name <address>"` or `address`.
        #[arg(long)]
        from: String,
    },
    /// Every newsletter, by id.
    List,
    /// Rename a newsletter or change its From.
    Edit {
        id: u64,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        from: Option<String>,
    },
    /// Delete a newsletter and its letters: refused while it has subscribers or a job
    /// still to finish (finished jobs stay, as the record of what was sent).
    Delete { id: u64 },
}

/// A letter's parts as options, for `create` (where subject and text are needed) and
/// `edit` (where what is given changes).
#[derive(Debug, clap::Args)]
pub struct LetterParts {
    #[arg(long)]
    subject: Option<String>,
    /// The plain-text body (or --text-file).
    #[arg(long, conflicts_with = "text_file")]
    text: Option<String>,
    #[arg(long)]
    text_file: Option<PathBuf>,
    /// An HTML body, from a file.
    #[arg(long)]
    html_file: Option<PathBuf>,
    /// The filter policy's name (default: the built-in one).
    #[arg(long)]
    filter: Option<String>,
    /// The template policy's name (default: the built-in one).
    #[arg(long)]
    template: Option<String>,
    /// Parameters the policies see, as a JSON object.
    #[arg(long)]
    params: Option<String>,
}

impl LetterParts {
    /// The parts given, as the API's JSON.
    async fn json(self) -> Result<Map<String, Value>, ClientError> {
        let mut letter = Map::new();
        if let Some(subject) = self.subject {
            letter.insert("subject".into(), json!(subject));
        }
        match (self.text, self.text_file) {
            (Some(body), _) => {
                letter.insert("text".into(), json!(body));
            }
            (None, Some(path)) => {
                letter.insert("text".into(), json!(read_text(&path).await?));
            }
            (None, None) => {}
        }
        if let Some(path) = self.html_file {
            letter.insert("html".into(), json!(read_text(&path).await?));
        }
        if let Some(filter) = self.filter {
            letter.insert("filter".into(), json!(filter));
        }
        if let Some(template) = self.template {
            letter.insert("template".into(), json!(template));
        }
        if let Some(params) = self.params {
            let params: Map<String, Value> = serde_json::from_str(&params)
                .map_err(|e| ClientError::Usage(format!("--params must be a JSON object: {e}")))?;
            letter.insert("params".into(), Value::Object(params));
        }
        Ok(letter)
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum LetterCommand {
    Create {
        #[arg(long)]
        newsletter: u64,
        #[command(flatten)]
        parts: LetterParts,
    },
    /// A newsletter's letters, by id.
    List {
        #[arg(long)]
        newsletter: u64,
    },
    /// One letter, with its text and HTML.
    Show { id: u64 },
    /// Change what is given; refused while a job that sends it is still to finish.
    Edit {
        id: u64,
        #[command(flatten)]
        parts: LetterParts,
    },
    /// Delete a letter; refused while a job that sends it is still to finish.
    Delete { id: u64 },
    /// Run a letter's policies for one subscriber and show the decision and the
    /// message, without sending anything.
    Preview {
        letter: u64,
        /// A stored subscriber's id.
        #[arg(long, required_unless_present = "email", conflicts_with = "email")]
        subscriber: Option<u64>,
        /// Or a recipient made up here: its address...
        #[arg(long)]
        email: Option<String>,
        /// ...its name...
        #[arg(long, requires = "email")]
        name: Option<String>,
        /// ...and its attributes, as a JSON object.
        #[arg(long, requires = "email")]
        attributes: Option<String>,
    },
}

pub(super) async fn newsletter(client: &Client, command: NewsletterCommand) -> Result<(), ClientError> {
    match command {
        NewsletterCommand::Create { name, from } => {
            let n = client
                .post("/v1/newsletters", &json!({ "name": name, "from": from }))
                .await?;
            print(client, &n, || {
                format!("newsletter {} created: {}", n["id"], text(&n["name"]))
            });
        }
        NewsletterCommand::List => {
            let items = all_pages(client, "/v1/newsletters").await?;
            let list = Value::Array(items.clone());
            print(client, &list, || {
                if items.is_empty() {
                    return "no newsletters: create one with `letterbox newsletter create`".into();
                }
                let mut out = format!("{:>6}  {:<30}  FROM", "ID", "NAME");
                for n in &items {
                    out.push_str(&format!(
                        "\n{:>6}  {:<30}  {}",
                        n["id"].as_u64().unwrap_or_default(),
                        text(&n["name"]),
                        text(&n["from"])
                    ));
                }
                out
            });
        }
        NewsletterCommand::Edit { id, name, from } => {
            let mut patch = Map::new();
            if let Some(name) = name {
                patch.insert("name".into(), json!(name));
            }
            if let Some(from) = from {
                patch.insert("from".into(), json!(from));
            }
            if patch.is_empty() {
                return Err(ClientError::Usage("give --name or --from (or both)".into()));
            }
            let n = client
                .patch(&format!("/v1/newsletters/{id}"), &Value::Object(patch))
                .await?;
            print(client, &n, || {
                format!(
                    "newsletter {} saved: {} (from {})",
                    n["id"],
                    text(&n["name"]),
                    text(&n["from"])
                )
            });
        }
        NewsletterCommand::Delete { id } => {
            let answer = client.delete(&format!("/v1/newsletters/{id}")).await?;
            print(client, &answer, || {
                format!("newsletter {id} deleted, with its letters")
            });
        }
    }
    Ok(())
}

pub(super) async fn letter(client: &Client, command: LetterCommand) -> Result<(), ClientError> {
    match command {
        LetterCommand::Create { newsletter, parts } => {
            let letter = parts.json().await?;
            for needed in ["subject", "text"] {
                if !letter.contains_key(needed) {
                    let flag = if needed == "text" {
                        "--text or --text-file"
                    } else {
                        "--subject"
                    };
                    return Err(ClientError::Usage(format!("a new letter needs {flag}")));
                }
            }
            let l = client
                .post(
                    &format!("/v1/newsletters/{newsletter}/letters"),
                    &Value::Object(letter),
                )
                .await?;
            print(client, &l, || {
                format!("letter {} created: {}", l["id"], text(&l["subject"]))
            });
        }
        LetterCommand::List { newsletter } => {
            let items = all_pages(client, &format!("/v1/newsletters/{newsletter}/letters")).await?;
            let list = Value::Array(items.clone());
            print(client, &list, || {
                if items.is_empty() {
                    return format!("newsletter {newsletter} has no letters");
                }
                let mut out = format!("{:>6}  {:<40}  {:<20}  TEMPLATE", "ID", "SUBJECT", "FILTER");
                for l in &items {
                    out.push_str(&format!(
                        "\n{:>6}  {:<40}  {:<20}  {}",
                        l["id"].as_u64().unwrap_or_default(),
                        text(&l["subject"]),
                        text(&l["filter"]),
                        text(&l["template"])
                    ));
                }
                out
            });
        }
        LetterCommand::Show { id } => {
            let l = client.get(&format!("/v1/letters/{id}")).await?;
            print(client, &l, || describe_letter(&l));
        }
        LetterCommand::Edit { id, parts } => {
            let patch = parts.json().await?;
            if patch.is_empty() {
                return Err(ClientError::Usage(
                    "give what changes: --subject, --text, --text-file, --html-file, --filter, --template or --params"
                        .into(),
                ));
            }
            let l = client
                .patch(&format!("/v1/letters/{id}"), &Value::Object(patch))
                .await?;
            print(client, &l, || {
                format!("letter {} saved: {}", l["id"], text(&l["subject"]))
            });
        }
        LetterCommand::Delete { id } => {
            let answer = client.delete(&format!("/v1/letters/{id}")).await?;
            print(client, &answer, || format!("letter {id} deleted"));
        }
        LetterCommand::Preview {
            letter,
            subscriber,
            email,
            name,
            attributes,
        } => {
            let body = match (subscriber, email) {
                (Some(id), _) => json!({ "subscriber_id": id }),
                (None, Some(email)) => {
                    let mut recipient = json!({ "email": email });
                    if let Some(name) = name {
                        recipient["name"] = json!(name);
                    }
                    if let Some(attributes) = attributes {
                        let attributes: Map<String, Value> =
                            serde_json::from_str(&attributes).map_err(|e| {
                                ClientError::Usage(format!("--attributes must be a JSON object: {e}"))
                            })?;
                        recipient["attributes"] = Value::Object(attributes);
                    }
                    json!({ "recipient": recipient })
                }
                (None, None) => {
                    return Err(ClientError::Usage("give --subscriber or --email".into()));
                }
            };
            let p = client
                .post(&format!("/v1/letters/{letter}/preview"), &body)
                .await?;
            print(client, &p, || describe_preview(&p));
        }
    }
    Ok(())
}

/// Every item of a paged listing (`items`, and `next` for the following page's
/// `cursor`).
async fn all_pages(client: &Client, path: &str) -> Result<Vec<Value>, ClientError> {
    let mut items = Vec::new();
    let mut after: Option<u64> = None;
    loop {
        let url = match after {
            Some(after) => format!("{path}?limit=1000&cursor={after}"),
            None => format!("{path}?limit=1000"),
        };
        let page = client.get(&url).await?;
        items.extend(page["items"].as_array().cloned().unwrap_or_default());
        match page["next"].as_u64() {
            Some(next) => after = Some(next),
            None => return Ok(items),
        }
    }
}

fn describe_letter(l: &Value) -> String {
    let mut out = format!(
        "letter {} of newsletter {}: {}\nfilter {}, template {}",
        l["id"],
        l["newsletter_id"],
        text(&l["subject"]),
        text(&l["filter"]),
        text(&l["template"])
    );
    if l["params"].as_object().is_some_and(|p| !p.is_empty()) {
        out.push_str(&format!("\nparams {}", l["params"]));
    }
    push_body(&mut out, l);
    out
}

/// A preview: the policies, their decision and, when it sends, the rendered parts.
fn describe_preview(p: &Value) -> String {
    let version = |v: &Value| {
        let id: String = text(&v["id"]).chars().take(12).collect();
        format!("{}@{id}", text(&v["name"]))
    };
    let mut out = format!(
        "filter {}, template {}: {}",
        version(&p["filter"]),
        version(&p["template"]),
        text(&p["decision"])
    );
    if p["decision"] == "skip" {
        out.push_str(&format!(" ({})", text(&p["reason"])));
        return out;
    }
    let r = &p["rendered"];
    out.push_str(&format!("\nSubject: {}", text(&r["subject"])));
    for h in r["headers"].as_array().into_iter().flatten() {
        out.push_str(&format!("\n{}: {}", text(&h["name"]), text(&h["value"])));
    }
    push_body(&mut out, r);
    out
}

/// A letter's or rendered message's text, then its HTML (if any) under a rule.
fn push_body(out: &mut String, parts: &Value) {
    out.push_str(&format!("\n\n{}", text(&parts["text"]).trim_end()));
    if let Some(html) = parts["html"].as_str() {
        out.push_str(&format!(
            "\n\n--- html ({} bytes) ---\n{}",
            html.len(),
            html.trim_end()
        ));
    }
}
