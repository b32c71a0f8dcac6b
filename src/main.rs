//! The `letterbox` binary: parses flags and environment into a `Config` and calls
//! `letterbox::run`. Nothing else lives here.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(version, about = "Self-hosted newsletter delivery runner")]
struct Cli {
    /// Log lines for people (`human`) or one JSON object per line (`json`), for a log
    /// collector. Which lines: `LETTERBOX_LOG` (e.g. `info`, `warn,letterbox=debug`).
    #[arg(long, global = true, env = "LETTERBOX_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve(ServeArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "LETTERBOX_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Directory for the database, keys and the outbox.
    #[arg(long, env = "LETTERBOX_DATA", default_value = "./letterbox-data")]
    data: PathBuf,
    /// The default SMTP transport: smtp://host:25 (plain), smtp://host:587?tls=required
    /// (STARTTLS) or smtps://user:pass@host:465 (TLS). Query parameters: tls, pool
    /// (connections), rate (N/s, N/min or N/h), hello (EHLO name).
    /// Without it, messages are written to DATA/outbox as .eml files.
    #[arg(long, env = "LETTERBOX_SMTP")]
    smtp: Option<String>,
    /// The API's bearer token (at least 16 characters). Without it, a token is generated
    /// at the first start, printed once, and only its hash kept in DATA. Prefer the
    /// environment variable: arguments are visible to other users of the machine.
    #[arg(long, env = "LETTERBOX_API_TOKEN", hide_env_values = true)]
    api_token: Option<String>,
    /// Serve /metrics without the API token (for a Prometheus on a private network).
    #[arg(long, env = "LETTERBOX_PUBLIC_METRICS")]
    public_metrics: bool,
    /// Sign every message with DKIM using this key file: an RSA key in PKCS#1 PEM or an
    /// Ed25519 seed in base64. Needs --dkim-selector and --dkim-domain.
    #[arg(long, env = "LETTERBOX_DKIM_KEY", requires_all = ["dkim_selector", "dkim_domain"])]
    dkim_key: Option<PathBuf>,
    /// The DKIM selector (the public key is at SELECTOR._domainkey.DOMAIN).
    #[arg(long, env = "LETTERBOX_DKIM_SELECTOR")]
    dkim_selector: Option<String>,
    /// The DKIM signing domain (d=).
    #[arg(long, env = "LETTERBOX_DKIM_DOMAIN")]
    dkim_domain: Option<String>,
    /// A further transport a send can choose by name: NAME=URL (repeatable).
    #[arg(long = "transport", value_name = "NAME=URL")]
    transports: Vec<String>,
    /// SMTP user name (overrides one in the URL).
    #[arg(long, env = "LETTERBOX_SMTP_USER")]
    smtp_user: Option<String>,
    /// SMTP password (prefer the environment variable to the flag).
    #[arg(long, env = "LETTERBOX_SMTP_PASSWORD", hide_env_values = true)]
    smtp_password: Option<String>,
    /// Open SMTP connections kept in the pool.
    #[arg(long, env = "LETTERBOX_SMTP_POOL", default_value_t = 32)]
    smtp_pool: u32,
    /// SMTP timeout per command, in seconds.
    #[arg(long, env = "LETTERBOX_SMTP_TIMEOUT", default_value_t = 30)]
    smtp_timeout: u64,
    /// SMTP timeout to connect (TCP, greeting, EHLO, STARTTLS, AUTH), in seconds.
    #[arg(long, env = "LETTERBOX_SMTP_CONNECT_TIMEOUT", default_value_t = 10)]
    smtp_connect_timeout: u64,
    /// SMTP timeout for one whole message, in seconds.
    #[arg(long, env = "LETTERBOX_SMTP_SEND_TIMEOUT", default_value_t = 120)]
    smtp_send_timeout: u64,
    /// Deliveries in flight per job (a send request can override it).
    #[arg(long, env = "LETTERBOX_CONCURRENCY", default_value_t = 16)]
    concurrency: u32,
    /// Deliveries in flight across all jobs.
    #[arg(long, env = "LETTERBOX_MAX_DELIVERIES", default_value_t = 512)]
    max_deliveries: u32,
    /// Jobs sending at once; later ones wait queued.
    #[arg(long, env = "LETTERBOX_MAX_RUNNING_JOBS", default_value_t = 4)]
    max_running_jobs: u32,
    /// Concurrent deliveries to one recipient domain: DOMAIN=N, or *=N for every other
    /// domain (repeatable).
    #[arg(long = "domain-limit", value_name = "DOMAIN=N")]
    domain_limits: Vec<String>,
    /// Attempts per recipient for transient failures (the first included).
    #[arg(long, env = "LETTERBOX_RETRY_ATTEMPTS", default_value_t = 5)]
    retry_attempts: u32,
    /// Delay before the first retry, doubling after each (e.g. 60s, 5m).
    #[arg(long, env = "LETTERBOX_RETRY_BASE", default_value = "60s", value_parser = humantime::parse_duration)]
    retry_base: Duration,
    /// Longest delay between retries.
    #[arg(long, env = "LETTERBOX_RETRY_CAP", default_value = "1h", value_parser = humantime::parse_duration)]
    retry_cap: Duration,
    /// On shutdown, how long to let in-flight deliveries finish.
    #[arg(long, env = "LETTERBOX_DRAIN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
    /// How long a request may take before it is answered 503 (its work still finishes).
    /// CSV imports, which last as long as their upload, and event streams are exempt.
    #[arg(long, env = "LETTERBOX_REQUEST_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    request_timeout: Duration,
    /// Public base URL for unsubscribe links (default: http://LISTEN).
    #[arg(long, env = "LETTERBOX_PUBLIC_URL")]
    public_url: Option<String>,
    /// Time budget of one policy call, in milliseconds.
    #[arg(long, env = "LETTERBOX_POLICY_TIMEOUT_MS", default_value_t = 100)]
    policy_timeout_ms: u64,
    /// Memory limit of one policy instance, in MiB.
    #[arg(long, env = "LETTERBOX_POLICY_MEMORY_MIB", default_value_t = 64)]
    policy_memory_mib: usize,
    /// Largest policy component accepted at upload, in MiB.
    #[arg(long, env = "LETTERBOX_PLUGIN_MAX_MIB", default_value_t = 10)]
    plugin_max_mib: usize,
    /// A job pauses when its policies fail more than this many times...
    #[arg(long, env = "LETTERBOX_POLICY_MAX_FAILURES", default_value_t = 20)]
    policy_max_failures: u32,
    /// ...within this many seconds.
    #[arg(long, env = "LETTERBOX_POLICY_FAILURE_WINDOW", default_value_t = 10)]
    policy_failure_window: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("LETTERBOX_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt().with_env_filter(filter);
    match cli.log_format {
        LogFormat::Human => logs.init(),
        // Spans as fields of each line, so a job's or request's context travels with it.
        LogFormat::Json => logs.json().with_current_span(true).with_span_list(true).init(),
    }
    match cli.command {
        Command::Serve(args) => serve(args).await,
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    if args.concurrency == 0 || args.concurrency > letterbox::runner::MAX_CONCURRENCY {
        anyhow::bail!(
            "--concurrency must be between 1 and {}",
            letterbox::runner::MAX_CONCURRENCY
        );
    }
    if args.policy_timeout_ms == 0 || args.policy_memory_mib == 0 || args.plugin_max_mib == 0 {
        anyhow::bail!("--policy-timeout-ms, --policy-memory-mib and --plugin-max-mib must be positive");
    }
    let mut config = letterbox::Config::new(args.data);
    config.api_token = args.api_token;
    config.public_metrics = args.public_metrics;
    config.concurrency = args.concurrency;
    config.policy_limits.timeout = Duration::from_millis(args.policy_timeout_ms);
    config.policy_limits.memory_bytes = args.policy_memory_mib << 20;
    config.policy_limits.max_upload_bytes = args.plugin_max_mib << 20;
    config.policy_failures.max = args.policy_max_failures;
    config.policy_failures.window = Duration::from_secs(args.policy_failure_window.max(1));
    config.public_url = args.public_url;
    config.max_deliveries = args.max_deliveries.max(1);
    config.max_running_jobs = args.max_running_jobs.max(1);
    for entry in &args.domain_limits {
        config
            .domain_limits
            .add(entry)
            .map_err(|e| anyhow::anyhow!("--domain-limit: {e}"))?;
    }
    config.retry = letterbox::domain::RetryPolicy {
        max_attempts: args.retry_attempts,
        base_ms: args.retry_base.as_millis() as u64,
        cap_ms: args.retry_cap.as_millis() as u64,
    };
    config
        .retry
        .validate()
        .map_err(|e| anyhow::anyhow!("--retry-attempts/--retry-base/--retry-cap: {e}"))?;
    config.drain_timeout = args.drain_timeout;
    if args.request_timeout.is_zero() {
        anyhow::bail!("--request-timeout must be positive");
    }
    config.request_timeout = args.request_timeout;
    if let Some(path) = &args.dkim_key {
        let private_key =
            std::fs::read_to_string(path).with_context(|| format!("--dkim-key {}", path.display()))?;
        config.dkim = Some(letterbox::mail::DkimSettings {
            private_key,
            selector: args.dkim_selector.clone().unwrap_or_default(),
            domain: args.dkim_domain.clone().unwrap_or_default(),
        });
    }
    let smtp_settings = |url: String| {
        let mut smtp = letterbox::Config::smtp_url(url);
        smtp.pool_size = args.smtp_pool.max(1);
        smtp.command_timeout = Duration::from_secs(args.smtp_timeout.max(1));
        smtp.connect_timeout = Duration::from_secs(args.smtp_connect_timeout.max(1));
        smtp.send_timeout = Duration::from_secs(args.smtp_send_timeout.max(1));
        smtp
    };
    for entry in &args.transports {
        let (name, url) = entry
            .split_once('=')
            .filter(|(name, _)| !name.is_empty())
            .with_context(|| format!("--transport {entry:?}: expected NAME=URL"))?;
        config
            .transports
            .push((name.to_string(), smtp_settings(url.to_string())));
    }
    config.smtp = args.smtp.clone().map(|url| {
        let mut smtp = smtp_settings(url);
        smtp.username = args.smtp_user.clone();
        smtp.password = args.smtp_password.clone();
        smtp
    });
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    letterbox::run(listener, config, shutdown_signal()).await?;
    Ok(())
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}
