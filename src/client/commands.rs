//! The client commands: each one is a request or two and a human summary (or, with
//! `--json`, the server's JSON as is).

use std::path::{Path, PathBuf};
use std::time::Instant;

use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::Method;
use serde_json::{Map, Value, json};

use super::output::{encode, print, read, text};
use super::{Client, ClientError, Target, events};
use crate::domain::PluginKind;
use crate::project::{self, Lang};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Newsletters: `newsletter create --name … --from …`, `list`, `edit`, `delete`.
    #[command(subcommand)]
    Newsletter(super::lists::NewsletterCommand),
    /// Subscribers: `subscribers import FILE.csv --newsletter ID`.
    #[command(subcommand)]
    Subscribers(SubscribersCommand),
    /// Policies: `plugin upload FILE.wasm --kind filter --name NAME`, `plugin list`.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Letters: `letter create --newsletter ID --subject … --text …`, `list`, `show`,
    /// `edit`, `delete`, `preview`.
    #[command(subcommand)]
    Letter(super::lists::LetterCommand),
    /// Send a letter: starts a job (and with --follow, shows its progress to the end).
    Send(SendArgs),
    /// List jobs, newest first.
    Jobs {
        /// Only jobs in this state (scheduled, queued, running, paused, completed,
        /// cancelled, failed).
        #[arg(long)]
        state: Option<String>,
        /// How many (at most 1000).
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// One job: show, follow, pause, resume, cancel, retry-failed.
    #[command(subcommand)]
    Job(JobCommand),
    /// The event log, oldest first: what happened to subscribers, jobs and deliveries,
    /// and your own events. `--follow` goes on printing events as they are recorded.
    Events {
        /// Keep printing new events until interrupted (reconnects after a restart).
        #[arg(long, short)]
        follow: bool,
        /// Only these types, comma-separated: `job.completed`, `subscriber.*`,
        /// `custom.*`, ...
        #[arg(long = "type")]
        types: Option<String>,
        /// Only this subscriber's events: an id or an email.
        #[arg(long)]
        subscriber: Option<String>,
        /// Events after this id [default: the newest `--last`].
        #[arg(long)]
        after: Option<u64>,
        /// Without --after, start this many events back from the newest.
        #[arg(long, default_value_t = 20)]
        last: u64,
    },
    /// Bounce and complaint reports, newest first: what came back, and what the rules
    /// decided (`--unattributed`: those about no subscriber).
    Bounces(super::bounces::BouncesArgs),
    /// The suppression list: addresses no newsletter sends to (`add`, `list`, `remove`).
    #[command(subcommand)]
    Suppressions(super::bounces::SuppressionsCommand),
    /// Automations: policies called for events and their own timers (`create`, `list`,
    /// `pause`, `resume`, `failures`).
    #[command(subcommand)]
    Automation(super::automations::AutomationCommand),
    /// The live nodes working on the server's store (one with redb; a fleet's nodes on
    /// PostgreSQL): id, address, version, heartbeat age, recipients claimed.
    Nodes,
}

#[derive(Debug, clap::Subcommand)]
pub enum SubscribersCommand {
    /// Add or update (by email) subscribers from a CSV file (header row: email, name,
    /// then attribute columns) or a JSON array (`.json`). Streams the file; bad rows are
    /// listed and the rest imported.
    Import {
        file: PathBuf,
        #[arg(long)]
        newsletter: u64,
    },
    /// Make a bounced or complained subscriber active again (their reports stay, no
    /// longer counted; their address leaves the suppression list).
    Reinstate { id: u64 },
}

#[derive(Debug, clap::Subcommand)]
pub enum PluginCommand {
    /// Write a new policy project into DIR: the WIT, a build file, a working example
    /// (a segment and frequency-cap filter, or a template with a loop) and a README.
    New {
        dir: PathBuf,
        #[arg(long, value_enum)]
        lang: Lang,
        #[arg(long, value_parser = plugin_kind)]
        kind: PluginKind,
        /// The name it is uploaded under [default: the directory's name].
        #[arg(long)]
        name: Option<String>,
    },
    /// Build the project in DIR into DIR/policy.wasm with its language's tool (cargo,
    /// jco with QuickJS, componentize-py), then check it as an upload would be.
    Build {
        #[arg(default_value = ".")]
        dir: PathBuf,
    },
    /// Upload a WebAssembly component (a .wasm file, or a project directory's
    /// policy.wasm) as a new version of a named policy.
    Upload {
        /// A .wasm file, or a project directory (its policy.toml gives name and kind).
        path: PathBuf,
        /// filter or template (a project directory's own by default).
        #[arg(long, value_parser = plugin_kind)]
        kind: Option<PluginKind>,
        /// The policy's name (a project directory's own by default).
        #[arg(long)]
        name: Option<String>,
        /// Build the project directory first.
        #[arg(long)]
        build: bool,
        /// Ask for this much memory per instance, in MiB (written into the component,
        /// so it makes a new version; the server allows up to its
        /// --policy-memory-max-mib).
        #[arg(long)]
        memory_mib: Option<u32>,
        /// Answer once the bytes are stored, without waiting for the compilation.
        #[arg(long)]
        no_wait: bool,
    },
    /// Every policy with its latest version.
    List,
}

#[derive(Debug, clap::Args)]
pub struct SendArgs {
    /// The letter's id.
    letter: u64,
    /// Show the job's progress until it ends, then a summary. Exits non-zero if the job
    /// does not complete or some recipients failed.
    #[arg(long)]
    follow: bool,
    /// Deliveries in flight for this job.
    #[arg(long)]
    concurrency: Option<u32>,
    /// A configured transport's name.
    #[arg(long)]
    transport: Option<String>,
    /// Start later: an RFC 3339 time (2026-12-01T09:00:00Z).
    #[arg(long)]
    at: Option<String>,
    /// Makes the request safe to repeat: the same key returns the same job.
    #[arg(long)]
    idempotency_key: Option<String>,
}

#[derive(Debug, clap::Subcommand)]
pub enum JobCommand {
    Show {
        id: u64,
    },
    /// Show progress until the job ends, then a summary.
    Follow {
        id: u64,
    },
    Pause {
        id: u64,
    },
    Resume {
        id: u64,
    },
    Cancel {
        id: u64,
    },
    /// Send again to the recipients that failed.
    RetryFailed {
        id: u64,
    },
}

/// Runs one client command against `target`.
pub async fn run(target: Target, command: Command) -> Result<(), ClientError> {
    let client = Client::new(target)?;
    match command {
        Command::Newsletter(command) => super::lists::newsletter(&client, command).await?,
        Command::Subscribers(SubscribersCommand::Import { file, newsletter }) => {
            import(&client, &file, newsletter).await?;
        }
        Command::Plugin(PluginCommand::New {
            dir,
            lang,
            kind,
            name,
        }) => {
            let created = project::create(&dir, lang, kind, name)?;
            let p = &created.project;
            println!(
                "created the {} {} policy {} in {}:",
                p.language,
                p.kind,
                p.name,
                dir.display()
            );
            for file in &created.files {
                println!("  {}", file.strip_prefix(&dir).unwrap_or(file).display());
            }
            println!(
                "next: `letterbox plugin build {0}`, then `letterbox plugin upload {0}` ({0}/README.md says how to try it)",
                dir.display()
            );
        }
        Command::Plugin(PluginCommand::Build { dir }) => {
            build_project(&dir).await?;
        }
        Command::Plugin(PluginCommand::Upload {
            path: file,
            kind,
            name,
            build,
            memory_mib,
            no_wait,
        }) => {
            let (file, kind, name) = if file.is_dir() {
                let project = project::open(&file)?;
                if build {
                    build_project(&file).await?;
                }
                let wasm = file.join(project::OUTPUT);
                if !wasm.is_file() {
                    return Err(ClientError::Usage(format!(
                        "{} does not exist: run `letterbox plugin build {}` first (or upload with --build)",
                        wasm.display(),
                        file.display()
                    )));
                }
                (wasm, kind.unwrap_or(project.kind), name.unwrap_or(project.name))
            } else {
                if build {
                    return Err(ClientError::Usage(
                        "--build needs a project directory, not a file".into(),
                    ));
                }
                let (Some(kind), Some(name)) = (kind, name) else {
                    return Err(ClientError::Usage(format!(
                        "uploading the file {} needs --kind and --name (a project directory has its own)",
                        file.display()
                    )));
                };
                (file, kind, name)
            };
            let mut bytes = read(&file).await?;
            if let Some(mib) = memory_mib {
                bytes = crate::policy::inspect::with_memory_ask(bytes, mib);
            }
            let path = format!("/v1/plugins?kind={}&name={}", kind, encode(&name));
            let request = client
                .request(Method::POST, &path)
                .header(reqwest::header::CONTENT_TYPE, "application/wasm")
                .body(bytes);
            let mut p = client.send(request).await?;
            if !no_wait {
                p = compiled(&client, p).await?;
            }
            print(&client, &p, || {
                format!(
                    "{} {} uploaded: {} ({})",
                    text(&p["kind"]),
                    text(&p["name"]),
                    text(&p["id"]),
                    text(&p["status"])
                )
            });
            if p["status"] == "failed" {
                return Err(ClientError::Outcome(format!(
                    "{} cannot be used: {}",
                    text(&p["name"]),
                    text(&p["error"])
                )));
            }
        }
        Command::Plugin(PluginCommand::List) => {
            let list = client.get("/v1/plugins").await?;
            print(&client, &list, || {
                let mut out = format!(
                    "{:<24} {:<9} {:>8}  {:<12}  STATUS",
                    "NAME", "KIND", "VERSIONS", "LATEST"
                );
                for p in list.as_array().into_iter().flatten() {
                    let latest = &p["latest"];
                    let mut status = text(&latest["status"]);
                    if latest["error"].is_string() {
                        status = format!("{status}: {}", text(&latest["error"]));
                    }
                    out.push_str(&format!(
                        "\n{:<24} {:<9} {:>8}  {:<12}  {status}",
                        text(&p["name"]),
                        text(&p["kind"]),
                        text(&p["versions"]),
                        text(&latest["id"]).chars().take(12).collect::<String>()
                    ));
                }
                out
            });
        }
        Command::Letter(command) => super::lists::letter(&client, command).await?,
        Command::Send(args) => send(&client, args).await?,
        Command::Jobs { state, limit } => {
            let mut path = format!("/v1/jobs?limit={limit}");
            if let Some(state) = state {
                path.push_str(&format!("&state={}", encode(&state)));
            }
            let page = client.get(&path).await?;
            print(&client, &page, || {
                let mut out = format!(
                    "{:>6} {:<10} {:>7} {:>10} {:>10} {:>8}",
                    "JOB", "STATE", "LETTER", "DONE", "DELIVERED", "FAILED"
                );
                for job in page["items"].as_array().into_iter().flatten() {
                    let c = &job["counts"];
                    let n = |k: &str| c[k].as_u64().unwrap_or(0);
                    let total = n("pending")
                        + n("sending")
                        + n("delivered")
                        + n("skipped")
                        + n("retrying")
                        + n("failed")
                        + n("cancelled");
                    let open = n("pending") + n("sending") + n("retrying");
                    out.push_str(&format!(
                        "\n{:>6} {:<10} {:>7} {:>10} {:>10} {:>8}",
                        text(&job["id"]),
                        text(&job["state"]),
                        text(&job["letter_id"]),
                        format!("{}/{}", total - open, total),
                        n("delivered"),
                        n("failed")
                    ));
                }
                out
            });
        }
        Command::Events {
            follow,
            types,
            subscriber,
            after,
            last,
        } => {
            let query = super::log::Query {
                types,
                subscriber,
                after,
                last,
                follow,
            };
            super::log::run(&client, query).await?;
        }
        Command::Bounces(args) => super::bounces::list(&client, args).await?,
        Command::Automation(command) => super::automations::run(&client, command).await?,
        Command::Suppressions(command) => super::bounces::suppressions(&client, command).await?,
        Command::Subscribers(SubscribersCommand::Reinstate { id }) => {
            super::bounces::reinstate(&client, id).await?
        }
        Command::Nodes => {
            let nodes = client.get("/v1/nodes").await?;
            print(&client, &nodes, || {
                let mut out = format!(
                    "{:<20} {:<28} {:<9} {:>10} {:>7}",
                    "NODE", "ADDRESS", "VERSION", "HEARTBEAT", "CLAIMS"
                );
                for node in nodes.as_array().into_iter().flatten() {
                    let age = node["heartbeat_age_ms"].as_u64().unwrap_or(0);
                    out.push_str(&format!(
                        "\n{:<20} {:<28} {:<9} {:>10} {:>7}",
                        text(&node["id"]),
                        text(&node["address"]),
                        text(&node["version"]),
                        format!("{:.1}s ago", age as f64 / 1000.0),
                        text(&node["claims"])
                    ));
                }
                out
            });
        }
        Command::Job(JobCommand::Follow { id }) => {
            let job = events::follow(&client, id).await?;
            summarise(&client, &job)?;
        }
        Command::Job(JobCommand::Show { id }) => {
            let job = client.get(&format!("/v1/jobs/{id}")).await?;
            print(&client, &job, || describe(&job));
        }
        Command::Job(action) => {
            let (id, verb) = match action {
                JobCommand::Pause { id } => (id, "pause"),
                JobCommand::Resume { id } => (id, "resume"),
                JobCommand::Cancel { id } => (id, "cancel"),
                JobCommand::RetryFailed { id } => (id, "retry-failed"),
                JobCommand::Show { .. } | JobCommand::Follow { .. } => unreachable!("handled above"),
            };
            let job = client
                .post(&format!("/v1/jobs/{id}/{verb}"), &Value::Null)
                .await?;
            print(&client, &job, || {
                let mut out = describe(&job);
                if let Some(n) = job["requeued"].as_u64() {
                    out.push_str(&format!("\n{n} failed recipients requeued"));
                }
                out
            });
        }
    }
    Ok(())
}

/// A job in a few lines.
fn describe(job: &Value) -> String {
    let c = &job["counts"];
    let n = |k: &str| c[k].as_u64().unwrap_or(0);
    let mut out = format!(
        "job {} ({}) of letter {}\n  delivered {}  skipped {}  failed {}  pending {}  sending {}  retrying {}  cancelled {}",
        job["id"],
        text(&job["state"]),
        job["letter_id"],
        n("delivered"),
        n("skipped"),
        n("failed"),
        n("pending"),
        n("sending"),
        n("retrying"),
        n("cancelled"),
    );
    if let Some(rate) = job["rate_per_second"].as_f64().filter(|r| *r > 0.0) {
        out.push_str(&format!("\n  {rate:.0}/s"));
        if let Some(eta) = job["eta_seconds"].as_u64() {
            out.push_str(&format!(", about {eta} s to go"));
        }
    }
    if let Some(reason) = job["pause_reason"].as_str() {
        out.push_str(&format!("\n  paused: {reason}"));
    }
    if let Some(reason) = job["stalled"]["reason"].as_str() {
        let since = job["stalled"]["since"].as_u64().unwrap_or(0);
        let age = crate::domain::now().saturating_sub(since);
        out.push_str(&format!(
            "\n  stalled for {age} s, goes on by itself once the store answers: {reason}"
        ));
    }
    if let Some(reason) = job["waiting"]["reason"].as_str() {
        let since = job["waiting"]["since"].as_u64().unwrap_or(0);
        let age = crate::domain::now().saturating_sub(since);
        out.push_str(&format!("\n  waiting for {age} s: {reason}"));
    }
    if let Some(error) = job["error"].as_str() {
        out.push_str(&format!("\n  error: {error}"));
    }
    out
}

async fn send(client: &Client, args: SendArgs) -> Result<(), ClientError> {
    let mut body = Map::new();
    if let Some(c) = args.concurrency {
        body.insert("concurrency".into(), json!(c));
    }
    if let Some(t) = args.transport {
        body.insert("transport".into(), json!(t));
    }
    if let Some(at) = args.at {
        body.insert("send_at".into(), json!(at));
    }
    let mut request = client
        .request(Method::POST, &format!("/v1/letters/{}/send", args.letter))
        .json(&body);
    if let Some(key) = &args.idempotency_key {
        request = request.header("idempotency-key", key);
    }
    let submitted = client.send(request).await?;
    let id = submitted["job_id"]
        .as_u64()
        .ok_or_else(|| ClientError::Io("the server's answer has no job_id".into()))?;
    if !args.follow {
        print(client, &submitted, || {
            format!(
                "job {id} {}; follow it with: letterbox job follow {id}",
                text(&submitted["job"]["state"])
            )
        });
        return Ok(());
    }
    if !client.json_output() {
        eprintln!("job {id} started");
    }
    let job = events::follow(client, id).await?;
    summarise(client, &job)
}

/// The summary at the end of a followed job; an error (exit code ≠ 0) when the job did
/// not complete or recipients failed.
fn summarise(client: &Client, job: &Value) -> Result<(), ClientError> {
    let c = &job["counts"];
    let n = |k: &str| c[k].as_u64().unwrap_or(0);
    let state = text(&job["state"]);
    let elapsed = match (job["started_at"].as_u64(), job["finished_at"].as_u64()) {
        (Some(start), Some(end)) => format!(" in {} s", end.saturating_sub(start)),
        _ => String::new(),
    };
    print(client, job, || {
        format!(
            "job {} {state}{elapsed}: {} delivered, {} skipped, {} failed, {} cancelled",
            job["id"],
            n("delivered"),
            n("skipped"),
            n("failed"),
            n("cancelled")
        )
    });
    if state != "completed" {
        let why = job["error"]
            .as_str()
            .map(|e| format!(": {e}"))
            .unwrap_or_default();
        return Err(ClientError::Outcome(format!(
            "job {} ended {state}{why}",
            job["id"]
        )));
    }
    if n("failed") > 0 {
        return Err(ClientError::Outcome(format!(
            "{} recipients failed; see GET /v1/jobs/{}/deliveries?state=failed, or `letterbox job retry-failed {}`",
            n("failed"),
            job["id"],
            job["id"]
        )));
    }
    Ok(())
}

/// Streams a CSV file (or sends a `.json` array) to the import route, with a bar of rows
/// sent and their rate; then the summary and the first refused rows.
async fn import(client: &Client, path: &Path, newsletter: u64) -> Result<(), ClientError> {
    let is_json = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("json"));
    let url = format!("/v1/newsletters/{newsletter}/subscribers");
    let started = Instant::now();
    let summary = if is_json {
        let body = read(path).await?;
        let request = client
            .request(Method::POST, &url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        client.send(request).await?
    } else {
        // Count the lines first (a fast scan) so the bar has a length in rows.
        let file_error = |e: std::io::Error| ClientError::Io(format!("cannot read {}: {e}", path.display()));
        let lines = {
            let path = path.to_path_buf();
            tokio::task::spawn_blocking(move || count_lines(&path))
                .await
                .map_err(|e| ClientError::Io(e.to_string()))?
                .map_err(file_error)?
        };
        let bar = ProgressBar::new(lines.saturating_sub(1));
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} rows ({per_sec}, eta {eta})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        let file = tokio::fs::File::open(path).await.map_err(file_error)?;
        let counter = bar.clone();
        let mut first = true;
        let stream = tokio_util::io::ReaderStream::with_capacity(file, 256 << 10).map(move |chunk| {
            if let Ok(chunk) = &chunk {
                let mut rows = chunk.iter().filter(|b| **b == b'\n').count() as u64;
                if first && rows > 0 {
                    rows -= 1; // the header
                    first = false;
                }
                counter.inc(rows);
            }
            chunk
        });
        let request = client
            .request(Method::POST, &url)
            .header(reqwest::header::CONTENT_TYPE, "text/csv")
            .body(reqwest::Body::wrap_stream(stream));
        let result = client.send(request).await;
        bar.finish_and_clear();
        result?
    };
    let seconds = started.elapsed().as_secs_f64();
    print(client, &summary, || {
        let n = |k: &str| summary[k].as_u64().unwrap_or(0);
        let rows = n("inserted") + n("updated") + n("rejected");
        let mut out = format!(
            "{} inserted, {} updated, {} rejected ({rows} rows in {seconds:.1} s, {:.0} rows/s)",
            n("inserted"),
            n("updated"),
            n("rejected"),
            rows as f64 / seconds.max(0.001)
        );
        if n("names_folded") > 0 {
            out.push_str(&format!(
                "\n  names folded to one line: {} (a line break or control character became a space)",
                n("names_folded")
            ));
        }
        let errors = summary["errors"].as_array().cloned().unwrap_or_default();
        for e in errors.iter().take(20) {
            let line = e["line"]
                .as_u64()
                .map(|l| format!(" (line {l})"))
                .unwrap_or_default();
            out.push_str(&format!("\n  row {}{line}: {}", e["row"], text(&e["reason"])));
        }
        if n("rejected") > 20 {
            out.push_str(&format!("\n  … and {} more", n("rejected") - 20));
        }
        out
    });
    Ok(())
}

fn count_lines(path: &Path) -> std::io::Result<u64> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut buffer = vec![0; 1 << 20];
    let mut lines = 0u64;
    let mut last = b'\n';
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        lines += buffer[..n].iter().filter(|b| **b == b'\n').count() as u64;
        last = buffer[n - 1];
    }
    // A last line without its newline is a line too.
    Ok(lines + u64::from(last != b'\n'))
}

fn plugin_kind(s: &str) -> Result<PluginKind, String> {
    PluginKind::parse(s).ok_or_else(|| "expected filter, template or automation".into())
}

/// Builds the project in `dir`, its tool's output shown as it runs.
async fn build_project(dir: &Path) -> Result<(), ClientError> {
    let project = project::open(dir)?;
    eprintln!(
        "building the {} {} policy {} ...",
        project.language, project.kind, project.name
    );
    let started = Instant::now();
    // The tools run for seconds to minutes; off the async threads.
    let built = tokio::task::spawn_blocking(move || project::build(&project))
        .await
        .map_err(|e| ClientError::Io(format!("the build stopped: {e}")))??;
    println!(
        "built {} ({:.1} MB) in {:.1} s",
        built.path.display(),
        built.size as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Waits until the uploaded plugin `p` is compiled (or failed) on the server; returns it
/// with its final status.
async fn compiled(client: &Client, mut p: Value) -> Result<Value, ClientError> {
    let path = format!("/v1/plugins/{}", encode(&text(&p["name"])));
    let started = std::time::Instant::now();
    let mut said = false;
    while p["status"] == "compiling" || p["status"] == "stored" {
        if !said && started.elapsed() > std::time::Duration::from_secs(1) && !client.json_output() {
            eprintln!("compiling {} ...", text(&p["name"]));
            said = true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let history = client.get(&path).await?;
        let Some(version) = history["versions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["id"] == p["id"])
        else {
            return Err(ClientError::Outcome(format!(
                "{} was deleted while it compiled",
                text(&p["name"])
            )));
        };
        p["status"] = version["status"].clone();
        p["error"] = version["error"].clone();
    }
    if p["error"].is_null() {
        p.as_object_mut().map(|o| o.remove("error"));
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stalled_job_says_why_and_that_it_heals() {
        let since = crate::domain::now() - 7;
        let job = json!({
            "id": 3, "state": "running", "letter_id": 1, "counts": {"delivered": 5},
            "stalled": {"reason": "the store is unavailable: disk full", "since": since},
        });
        let text = describe(&job);
        assert!(text.contains("job 3 (running)"), "{text}");
        // 7 s, or 8 if a second ticked over meanwhile.
        let why = "goes on by itself once the store answers: the store is unavailable: disk full";
        assert!(
            text.contains(&format!("stalled for 7 s, {why}"))
                || text.contains(&format!("stalled for 8 s, {why}")),
            "{text}"
        );
        let healthy = json!({"id": 3, "state": "running", "letter_id": 1, "counts": {}, "stalled": null});
        assert!(!describe(&healthy).contains("stalled"));
    }

    #[test]
    fn a_job_waiting_for_a_policy_says_which() {
        let job = json!({
            "id": 4, "state": "running", "letter_id": 1, "counts": {},
            "waiting": {"reason": "policy big-filter is compiling", "since": crate::domain::now()},
        });
        let text = describe(&job);
        assert!(text.contains(": policy big-filter is compiling"), "{text}");
        assert!(text.contains("waiting for "), "{text}");
    }
}
