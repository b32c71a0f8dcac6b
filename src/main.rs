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
    #[command(subcommand)]
    command: Command,
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
    /// SMTP server: smtp://host:25 (plain), smtp://host:587?tls=required (STARTTLS) or
    /// smtps://user:pass@host:465 (TLS).
    /// Without it, messages are written to DATA/outbox as .eml files.
    #[arg(long, env = "LETTERBOX_SMTP")]
    smtp: Option<String>,
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
    /// Deliveries in flight per job (a send request can override it).
    #[arg(long, env = "LETTERBOX_CONCURRENCY", default_value_t = 16)]
    concurrency: u32,
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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LETTERBOX_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match Cli::parse().command {
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
    config.concurrency = args.concurrency;
    config.policy_limits.timeout = Duration::from_millis(args.policy_timeout_ms);
    config.policy_limits.memory_bytes = args.policy_memory_mib << 20;
    config.policy_limits.max_upload_bytes = args.plugin_max_mib << 20;
    config.policy_failures.max = args.policy_max_failures;
    config.policy_failures.window = Duration::from_secs(args.policy_failure_window.max(1));
    config.public_url = args.public_url;
    config.smtp = args.smtp.map(|url| {
        let mut smtp = letterbox::Config::smtp_url(url);
        smtp.username = args.smtp_user;
        smtp.password = args.smtp_password;
        smtp.pool_size = args.smtp_pool.max(1);
        smtp.timeout = Duration::from_secs(args.smtp_timeout.max(1));
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
