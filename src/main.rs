//! The `letterbox` binary: `serve` parses flags and environment into a `Config` and
//! calls `letterbox::run`; every other command is the client (`letterbox::client`).
//! Nothing else lives here.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

/// mimalloc instead of glibc's malloc: a send spends ~20% less CPU (malloc and free were
/// ~12% of it), at about the same peak memory (100k recipients: the same; 1M: +8 MiB),
/// with its arenas committed as they are used (.cargo/config.toml). glibc's per-thread arenas held what they freed; capping them
/// at two cut that, but cost ~17% of the send rate (ARCHITECTURE, "Memory").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(version, about = "Self-hosted newsletter delivery runner")]
struct Cli {
    /// Log lines for people (`human`) or one JSON object per line (`json`), for a log
    /// collector. Which lines: `LETTERBOX_LOG` (e.g. `info`, `warn,letterbox=debug`).
    #[arg(long, global = true, env = "LETTERBOX_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    /// The settings file (default: ./letterbox.toml if it exists). Client commands read
    /// `[client] server` and `api_token` from it.
    #[arg(long, global = true, env = "LETTERBOX_CONFIG")]
    config: Option<PathBuf>,
    /// The server a client command talks to [default: the settings file's
    /// `client.server`, else http://127.0.0.1:8080].
    #[arg(long, global = true, env = "LETTERBOX_SERVER")]
    server: Option<String>,
    /// The server's API token, for client commands.
    #[arg(long, global = true, env = "LETTERBOX_API_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Client commands print the server's JSON instead of a summary.
    #[arg(long, global = true)]
    json: bool,
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
    Serve(Box<ServeArgs>),
    /// Copy an installation into an empty store: a single node's data directory into a
    /// PostgreSQL database, to run it as a fleet (or a fleet's database back into a data
    /// directory); the counts are checked after the copy. Stop what runs on it first.
    Migrate(MigrateArgs),
    #[command(flatten)]
    Client(letterbox::client::Command),
    /// A policy compile in a child process of the server (policy/compiler.rs).
    #[command(hide = true)]
    CompilePolicy(CompilePolicyArgs),
}

#[derive(clap::Args)]
struct CompilePolicyArgs {
    /// Where the compiled component is written.
    #[arg(long)]
    out: PathBuf,
    /// The address space the compile may use.
    #[arg(long)]
    memory_bytes: u64,
}

/// How long mimalloc keeps freed memory before giving it back to the system: 2 ms
/// instead of its default 1 s, unless `MIMALLOC_PURGE_DELAY` says otherwise. A send
/// frees and reallocates its messages' memory constantly; with 1 s, peak RSS over a
/// 300k send was 104-112 MiB, with 2 ms set here 95-97 MiB, at the same rate within
/// noise (ARCHITECTURE, "Memory"). Unlike the arena's commit policy this can be set
/// from `main`: it is read each time memory is freed.
fn shorten_purge_delay() {
    // mimalloc 3's `mi_option_purge_delay`. libmimalloc-sys's named constants follow
    // mimalloc 2's numbering, so the index is checked by its default (1000 ms, no other
    // option has it) before it is set: after an upgrade that renumbers the options this
    // changes nothing rather than the wrong option.
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    const DEFAULT_MS: std::os::raw::c_long = 1000;
    const PURGE_DELAY_MS: std::os::raw::c_long = 2;
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: reads and sets one of mimalloc's global options; any thread may.
    unsafe {
        if libmimalloc_sys::mi_option_get(PURGE_DELAY) == DEFAULT_MS {
            libmimalloc_sys::mi_option_set(PURGE_DELAY, PURGE_DELAY_MS);
        }
    }
}

fn main() -> anyhow::Result<()> {
    shorten_purge_delay();
    let cli = Cli::parse();
    // Before any runtime or logging: the child is small, single-purpose and reports on
    // its pipes.
    if let Command::CompilePolicy(args) = &cli.command {
        std::process::exit(letterbox::policy::compiler::child_main(
            &args.out,
            args.memory_bytes,
        ));
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LETTERBOX_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Held to the end: dropping it writes the lines still queued.
    let _logs = letterbox::logging::init(
        match cli.log_format {
            LogFormat::Human => letterbox::logging::Format::Human,
            LogFormat::Json => letterbox::logging::Format::Json,
        },
        filter,
    );
    match cli.command {
        Command::Serve(args) => {
            letterbox::logging::log_panics();
            serve(cli.config, *args).await
        }
        Command::Migrate(args) => migrate(args).await,
        Command::CompilePolicy(_) => unreachable!("handled before the runtime starts"),
        Command::Client(command) => {
            // The settings file fills in what flags and variables leave out.
            let (file, file_token) = match letterbox::settings::file_to_read(cli.config.as_deref()) {
                Some(path) => letterbox::settings::client(&path).context("invalid settings")?,
                None => Default::default(),
            };
            let target = letterbox::client::Target {
                server: cli
                    .server
                    .or(file.server)
                    .unwrap_or_else(|| "http://127.0.0.1:8080".into()),
                token: cli.token.or(file_token),
                json: cli.json,
            };
            if let Err(e) = letterbox::client::run(target, command).await {
                eprintln!("{}", e.report());
                std::process::exit(1);
            }
            Ok(())
        }
    }
}

#[derive(clap::Args)]
struct MigrateArgs {
    /// The installation to copy: a data directory (its `letterbox.redb`) or a
    /// PostgreSQL URL (postgres://user:password@host:port/db).
    #[arg(long, value_name = "DIR|URL")]
    from: String,
    /// Where to copy it: a PostgreSQL URL or a data directory; it must hold no
    /// letterbox data yet. Prefer the environment variable when the URL holds a
    /// password.
    #[arg(
        long,
        value_name = "URL|DIR",
        env = "LETTERBOX_DATABASE_URL",
        hide_env_values = true
    )]
    to: String,
}

async fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let mut shown = 0;
    let result = letterbox::migrate::run(&args.from, &args.to, |copied| {
        if copied >= shown + 100_000 {
            shown = copied;
            eprintln!("  {copied} records copied");
        }
    })
    .await;
    match result {
        Ok(report) => {
            if report.requeued > 0 {
                println!(
                    "{} recipients that were in flight when the source stopped were put back in the queue",
                    report.requeued
                );
            }
            println!(
                "copied {} in {:.1} s; the counts match",
                letterbox::migrate::describe(&report.inventory),
                started.elapsed().as_secs_f64()
            );
            if args.to.starts_with("postgres") {
                println!("start the nodes with --database (LETTERBOX_DATABASE_URL) on that database");
            } else {
                println!("start the server with --data {}", args.to);
            }
            Ok(())
        }
        Err(e) => {
            eprintln!("letterbox migrate: {e}");
            std::process::exit(1);
        }
    }
}

/// Every flag also reads a `LETTERBOX_*` variable and overrides the settings file's key
/// (see examples/letterbox.toml); without either, the file's value or the default holds.
#[derive(clap::Args)]
struct ServeArgs {
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "LETTERBOX_LISTEN")]
    listen: Option<String>,
    /// Directory for the database (redb), the compiled-policy cache and the outbox
    /// [default: ./letterbox-data]. With --database it holds only the node's own files.
    #[arg(long, env = "LETTERBOX_DATA")]
    data: Option<PathBuf>,
    /// Keep shared state in PostgreSQL (postgres://user:password@host:port/database)
    /// instead of redb in DATA: several nodes on one database form a fleet. Prefer the
    /// environment variable when the URL holds a password.
    #[arg(long = "database", env = "LETTERBOX_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// With --database: how long a node's claims stay its own without a heartbeat; a
    /// node that stops is noticed after about this long (1s to 10m) [default: 10s].
    #[arg(long, env = "LETTERBOX_LEASE")]
    lease: Option<String>,
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
    #[arg(long, env = "LETTERBOX_PUBLIC_METRICS", num_args = 0..=1, default_missing_value = "true")]
    public_metrics: Option<bool>,
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
    /// Open SMTP connections kept in the pool [default: 32].
    #[arg(long, env = "LETTERBOX_SMTP_POOL")]
    smtp_pool: Option<u32>,
    /// SMTP timeout per command, in seconds [default: 30].
    #[arg(long, env = "LETTERBOX_SMTP_TIMEOUT")]
    smtp_timeout: Option<u64>,
    /// SMTP timeout to connect (TCP, greeting, EHLO, STARTTLS, AUTH), in seconds [default: 10].
    #[arg(long, env = "LETTERBOX_SMTP_CONNECT_TIMEOUT")]
    smtp_connect_timeout: Option<u64>,
    /// SMTP timeout for one whole message, in seconds [default: 120].
    #[arg(long, env = "LETTERBOX_SMTP_SEND_TIMEOUT")]
    smtp_send_timeout: Option<u64>,
    /// Deliveries in flight per job (a send request can override it) [default: 16].
    #[arg(long, env = "LETTERBOX_CONCURRENCY")]
    concurrency: Option<u32>,
    /// Deliveries in flight across all jobs [default: 512].
    #[arg(long, env = "LETTERBOX_MAX_DELIVERIES")]
    max_deliveries: Option<u32>,
    /// Jobs sending at once; later ones wait queued [default: 4].
    #[arg(long, env = "LETTERBOX_MAX_RUNNING_JOBS")]
    max_running_jobs: Option<u32>,
    /// Concurrent deliveries to one recipient domain: DOMAIN=N, or *=N for every other
    /// domain (repeatable).
    #[arg(long = "domain-limit", value_name = "DOMAIN=N")]
    domain_limits: Vec<String>,
    /// Attempts per recipient for transient failures (the first included) [default: 5].
    #[arg(long, env = "LETTERBOX_RETRY_ATTEMPTS")]
    retry_attempts: Option<u32>,
    /// Delay before the first retry, doubling after each (e.g. 60s, 5m) [default: 60s].
    #[arg(long, env = "LETTERBOX_RETRY_BASE")]
    retry_base: Option<String>,
    /// Longest delay between retries [default: 1h].
    #[arg(long, env = "LETTERBOX_RETRY_CAP")]
    retry_cap: Option<String>,
    /// On shutdown, how long to let in-flight deliveries finish [default: 30s].
    #[arg(long, env = "LETTERBOX_DRAIN_TIMEOUT")]
    drain_timeout: Option<String>,
    /// How long a send's Idempotency-Key is remembered: a repeat within it returns the
    /// same job; older keys are pruned in the background [default: 24h].
    #[arg(long, env = "LETTERBOX_IDEMPOTENCY_TTL")]
    idempotency_ttl: Option<String>,
    /// How long the event log keeps an event; older ones are pruned in the background
    /// [default: 90d].
    #[arg(long, env = "LETTERBOX_EVENT_RETENTION")]
    event_retention: Option<String>,
    /// How long a double opt-in confirmation link lasts; a subscriber of the public
    /// form who has not confirmed by then is erased [default: 3d].
    #[arg(long, env = "LETTERBOX_CONFIRM_WITHIN")]
    confirm_within: Option<String>,
    /// Subscribe requests the public form (`/s/{newsletter}`) takes from one IP address
    /// per minute; more get 429 [default: 10].
    #[arg(long, env = "LETTERBOX_SUBSCRIBE_PER_MINUTE")]
    subscribe_per_minute: Option<u32>,
    /// The longest one webhook request may take, connection to last byte [default: 15s].
    #[arg(long, env = "LETTERBOX_WEBHOOK_TIMEOUT")]
    webhook_timeout: Option<String>,
    /// Let webhook endpoints be on loopback, private, link-local and other special
    /// addresses (refused by default: a webhook must not reach inside your network).
    #[arg(long, env = "LETTERBOX_WEBHOOK_ALLOW_PRIVATE", num_args = 0..=1, default_missing_value = "true")]
    webhook_allow_private: Option<bool>,
    /// How long a request may take before it is answered 503 (its work still finishes).
    /// CSV imports, which last as long as their upload, and event streams are exempt
    /// [default: 30s].
    #[arg(long, env = "LETTERBOX_REQUEST_TIMEOUT")]
    request_timeout: Option<String>,
    /// The domain of VERP return paths: each message's envelope sender becomes
    /// `b-…@DOMAIN`, naming its job and subscriber, so a bounce says whose it is. Its MX
    /// must reach the inbound listener (--inbound-smtp) or a relay to it.
    #[arg(long, env = "LETTERBOX_BOUNCE_DOMAIN")]
    bounce_domain: Option<String>,
    /// Run the inbound SMTP listener for bounces and complaints on ADDR:PORT (e.g.
    /// 0.0.0.0:25, or a high port behind a forward); needs --bounce-domain [default: off].
    #[arg(long, env = "LETTERBOX_INBOUND_SMTP")]
    inbound_smtp: Option<String>,
    /// The inbound listener's certificate chain (PEM): STARTTLS is offered with it.
    #[arg(long, env = "LETTERBOX_INBOUND_TLS_CERT")]
    inbound_tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --inbound-tls-cert.
    #[arg(long, env = "LETTERBOX_INBOUND_TLS_KEY")]
    inbound_tls_key: Option<PathBuf>,
    /// Accept SES bounces and complaints from this SNS topic at /webhooks/ses (its
    /// ARN; repeat for more). The topic's HTTPS subscription is confirmed by itself.
    #[arg(long = "ses-topic", env = "LETTERBOX_SES_TOPICS", value_delimiter = ',')]
    ses_topics: Vec<String>,
    /// Mailgun's webhook signing key: accept its failed/complained events at
    /// /webhooks/mailgun.
    #[arg(long, env = "LETTERBOX_MAILGUN_SIGNING_KEY")]
    mailgun_signing_key: Option<String>,
    /// USER:PASSWORD that Postmark's webhook URL carries: accept its bounce and spam
    /// complaint webhooks at /webhooks/postmark.
    #[arg(long, env = "LETTERBOX_POSTMARK_AUTH")]
    postmark_auth: Option<String>,
    /// Public base URL for unsubscribe links (default: http://LISTEN).
    #[arg(long, env = "LETTERBOX_PUBLIC_URL")]
    public_url: Option<String>,
    /// Time budget of one policy call, in milliseconds [default: 100].
    #[arg(long, env = "LETTERBOX_POLICY_TIMEOUT_MS")]
    policy_timeout_ms: Option<u64>,
    /// Memory limit of one policy instance, in MiB [default: 64].
    #[arg(long, env = "LETTERBOX_POLICY_MEMORY_MIB")]
    policy_memory_mib: Option<usize>,
    /// The most memory per instance a policy may ask for (`memory_mib` in its
    /// policy.toml, `plugin upload --memory-mib`), in MiB [default: 512].
    #[arg(long, env = "LETTERBOX_POLICY_MEMORY_MAX_MIB")]
    policy_memory_max_mib: Option<usize>,
    /// The memory a policy's compilation may use, in MiB [default: 1024]. Each compile
    /// runs in a child process limited to this much address space; a component that
    /// needs more is refused with that reason, and the server never grows for it.
    #[arg(long, env = "LETTERBOX_COMPILE_MEMORY_MIB")]
    compile_memory_mib: Option<usize>,
    /// Largest policy component accepted at upload, in MiB [default: 64].
    #[arg(long, env = "LETTERBOX_PLUGIN_MAX_MIB")]
    plugin_max_mib: Option<usize>,
    /// A job pauses when its policies fail more than this many times... [default: 20]
    #[arg(long, env = "LETTERBOX_POLICY_MAX_FAILURES")]
    policy_max_failures: Option<u32>,
    /// ...within this many seconds [default: 10].
    #[arg(long, env = "LETTERBOX_POLICY_FAILURE_WINDOW")]
    policy_failure_window: Option<u64>,
}

impl ServeArgs {
    /// The flags (and variables) given, as settings-file keys.
    fn overrides(self) -> letterbox::settings::Overrides {
        let seconds = |s: Option<u64>| s.map(|s| format!("{s}s"));
        let values = [
            ("listen", self.listen),
            ("data", self.data.map(|d| d.display().to_string())),
            ("database.url", self.database_url),
            ("database.lease", self.lease),
            ("smtp.url", self.smtp),
            ("smtp.username", self.smtp_user),
            ("smtp.password", self.smtp_password),
            ("smtp.pool", self.smtp_pool.map(|n| n.to_string())),
            ("smtp.timeout", seconds(self.smtp_timeout)),
            ("smtp.connect_timeout", seconds(self.smtp_connect_timeout)),
            ("smtp.send_timeout", seconds(self.smtp_send_timeout)),
            ("api_token", self.api_token),
            ("public_metrics", self.public_metrics.map(|b| b.to_string())),
            ("public_url", self.public_url),
            ("bounces.domain", self.bounce_domain),
            ("bounces.mailgun_signing_key", self.mailgun_signing_key),
            ("bounces.postmark_auth", self.postmark_auth),
            ("bounces.inbound_smtp", self.inbound_smtp),
            (
                "bounces.tls_cert",
                self.inbound_tls_cert.map(|p| p.display().to_string()),
            ),
            (
                "bounces.tls_key",
                self.inbound_tls_key.map(|p| p.display().to_string()),
            ),
            ("dkim.key_file", self.dkim_key.map(|d| d.display().to_string())),
            ("dkim.selector", self.dkim_selector),
            ("dkim.domain", self.dkim_domain),
            ("delivery.concurrency", self.concurrency.map(|n| n.to_string())),
            (
                "delivery.max_deliveries",
                self.max_deliveries.map(|n| n.to_string()),
            ),
            (
                "delivery.max_running_jobs",
                self.max_running_jobs.map(|n| n.to_string()),
            ),
            ("retry.attempts", self.retry_attempts.map(|n| n.to_string())),
            ("retry.base", self.retry_base),
            ("retry.cap", self.retry_cap),
            ("drain_timeout", self.drain_timeout),
            ("idempotency_ttl", self.idempotency_ttl),
            ("event_retention", self.event_retention),
            ("confirm_within", self.confirm_within),
            ("webhook_timeout", self.webhook_timeout),
            (
                "webhook_allow_private",
                self.webhook_allow_private.map(|b| b.to_string()),
            ),
            (
                "subscribe_per_minute",
                self.subscribe_per_minute.map(|n| n.to_string()),
            ),
            ("request_timeout", self.request_timeout),
            ("policy.timeout_ms", self.policy_timeout_ms.map(|n| n.to_string())),
            ("policy.memory_mib", self.policy_memory_mib.map(|n| n.to_string())),
            (
                "policy.memory_max_mib",
                self.policy_memory_max_mib.map(|n| n.to_string()),
            ),
            (
                "policy.compile_memory_mib",
                self.compile_memory_mib.map(|n| n.to_string()),
            ),
            (
                "policy.max_upload_mib",
                self.plugin_max_mib.map(|n| n.to_string()),
            ),
            (
                "policy.max_failures",
                self.policy_max_failures.map(|n| n.to_string()),
            ),
            ("policy.failure_window", seconds(self.policy_failure_window)),
        ];
        letterbox::settings::Overrides {
            values: values.into_iter().filter_map(|(k, v)| Some((k, v?))).collect(),
            domain_limits: self.domain_limits,
            transports: self.transports,
            ses_topics: self.ses_topics,
        }
    }
}

async fn serve(config: Option<PathBuf>, args: ServeArgs) -> anyhow::Result<()> {
    let file = letterbox::settings::file_to_read(config.as_deref());
    if let Some(path) = &file {
        tracing::info!(file = %path.display(), "reading settings");
    }
    let mut settings =
        letterbox::settings::load(file.as_deref(), args.overrides()).context("invalid settings")?;
    // This very binary compiles policies in child processes. /proc/self/exe stays this
    // binary even when an upgrade replaced or deleted the file it was started from.
    let exe = PathBuf::from("/proc/self/exe");
    settings.config.policy_compiler = Some(if exe.exists() {
        exe
    } else {
        std::env::current_exe().context("cannot find the letterbox binary to compile policies with")?
    });
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("cannot listen on {}", settings.listen))?;
    letterbox::run(listener, settings.config, shutdown_signal()).await?;
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
