//! letterbox: a self-hosted newsletter delivery runner.
//!
//! `run` is the whole server: it opens the store, installs the built-in policies,
//! resumes unfinished jobs and serves the HTTP API until `shutdown` completes, then
//! drains in-flight deliveries. `main.rs` only turns flags into a `Config`; the tests
//! call `run` on port 0. See ARCHITECTURE.md for the module map and invariants.

pub mod automations;
pub mod bounces;
pub mod client;
pub mod config;
pub mod console;
pub mod domain;
pub mod events;
pub mod faults;
pub mod http;
pub mod import;
pub mod inbound;
pub mod logging;
pub mod mail;
pub mod messages;
pub mod migrate;
pub mod optin;
pub mod policy;
pub mod project;
pub mod providers;
pub mod runner;
pub mod settings;
pub mod store;
pub mod tls;
pub mod tokens;
pub mod webhooks;

use std::future::Future;
use std::io::Write;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;

use crate::domain::PluginKind;
use std::sync::Arc;

use crate::mail::{DEFAULT_TRANSPORT, Dkim, Transport, Transports};
use crate::policy::PolicyHost;
use crate::policy::builtin;
use crate::runner::{Runner, RunnerConfig};
use crate::store::Store;
use crate::tokens::{ApiToken, UnsubscribeKey, VerpKey};

/// Why the server could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("data directory {path}: {source}")]
    DataDir { path: String, source: std::io::Error },
    #[error("opening the store: {0}")]
    Store(#[from] store::StoreError),
    #[error("loading secrets: {0}")]
    Secret(#[from] tokens::SecretError),
    #[error("policy engine: {0}")]
    Policy(#[from] policy::PolicyError),
    #[error("mail transport: {0}")]
    Mail(#[from] mail::MailError),
    #[error("starting the runner: {0}")]
    Runner(#[from] runner::RunnerError),
    #[error("HTTP server: {0}")]
    Serve(std::io::Error),
    #[error("inbound SMTP listener's certificate: {0}")]
    InboundTls(String),
    #[error("provider webhooks: {0}")]
    Providers(providers::ProviderError),
    #[error("web console: {0}")]
    Console(console::RenderError),
    #[error("inbound SMTP listener on {address}: {source}")]
    Inbound {
        address: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Runs letterbox on `listener` until `shutdown` resolves. On shutdown the HTTP server
/// stops accepting, jobs stop claiming recipients, and in-flight deliveries finish and
/// are recorded before this returns.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let data_dir = &config.data_dir;
    let io_error = |source| Error::DataDir {
        path: data_dir.display().to_string(),
        source,
    };
    std::fs::create_dir_all(data_dir).map_err(io_error)?;
    http::install_metrics();
    let redb_file = data_dir.join("letterbox.redb");
    let location = match &config.database_url {
        Some(url) => store::Location::Postgres(url),
        None => store::Location::Redb(&redb_file),
    };
    let store = Store::open_with_faults(location, config.faults.clone()).await?;
    let unsubscribe = UnsubscribeKey::load_or_create(&store, Some(&data_dir.join("unsubscribe.key"))).await?;
    let verp = VerpKey::load_or_create(&store).await?;
    let (api_token, generated) = ApiToken::load_or_create(
        config.api_token.as_deref(),
        &store,
        Some(&data_dir.join("api-token.sha256")),
    )
    .await?;
    if let Some(token) = generated {
        // Straight to the terminal, not through the logs (which may be shipped
        // elsewhere); only its hash is kept, so this is the one time it is shown. A
        // stderr that cannot be written must not stop the server (`eprintln!` would
        // panic): the token can be replaced by setting LETTERBOX_API_TOKEN.
        let _ = writeln!(
            std::io::stderr(),
            "\nletterbox: generated an API token (shown once; only its hash is stored):\n\n    {token}\n\n\
             Send it as `Authorization: Bearer TOKEN`; set LETTERBOX_API_TOKEN to choose your own.\n"
        );
    }
    let mut policies = PolicyHost::new(config.policy_limits.clone(), Some(data_dir.join("compiled")))?;
    if let Some(exe) = &config.policy_compiler {
        policies = policies.compile_with(crate::policy::Compiler {
            exe: exe.clone(),
            memory_bytes: config.policy_limits.compile_memory_bytes as u64,
        });
    }
    let dkim = config.dkim.as_ref().map(Dkim::new).transpose()?.map(Arc::new);
    let mut transports = vec![match &config.smtp {
        Some(smtp) => Transport::smtp(DEFAULT_TRANSPORT, smtp, dkim.clone())?,
        None => Transport::outbox(DEFAULT_TRANSPORT, data_dir.join("outbox"), None, dkim.clone())?,
    }];
    for (name, smtp) in &config.transports {
        transports.push(Transport::smtp(name, smtp, dkim.clone())?);
    }
    let transports = Transports::new(transports)?;
    tracing::info!(data = %data_dir.display(), store = store.name(), "starting");
    for transport in transports.iter() {
        tracing::info!(name = transport.name(), transport = %transport.describe(), "transport");
    }

    let local_addr = listener.local_addr().map_err(Error::Serve)?;
    let public_url = config
        .public_url
        .clone()
        .unwrap_or_else(|| format!("http://{local_addr}"));
    let runner = Runner::new(
        store.clone(),
        policies,
        transports,
        RunnerConfig {
            default_concurrency: config.concurrency,
            max_deliveries: config.max_deliveries,
            max_running_jobs: config.max_running_jobs,
            domain_limits: config.domain_limits.clone(),
            retry: config.retry,
            policy_failures: config.policy_failures,
            public_url,
            lease: config.lease,
            idempotency_ttl: config.idempotency_ttl,
            event_retention: config.event_retention,
            confirm_within: config.confirm_within,
            housekeeping_every: config.housekeeping_every,
            bounces: config.bounces,
            bounce_domain: config.bounce_domain.clone(),
            faults: config.faults.clone(),
        },
        unsubscribe,
        verp.clone(),
    );
    for (name, kind, bytes) in [
        (
            builtin::DEFAULT_FILTER_NAME,
            PluginKind::Filter,
            builtin::DEFAULT_FILTER,
        ),
        (
            builtin::DEFAULT_TEMPLATE_NAME,
            PluginKind::Template,
            builtin::DEFAULT_TEMPLATE,
        ),
    ] {
        runner
            .install_plugin(name.to_string(), kind, bytes::Bytes::from_static(bytes))
            .await?;
    }
    // Compiled in the background, one at a time: the server answers meanwhile.
    runner.warm_policies().await?;
    let resumed = runner.recover().await?;
    if resumed > 0 {
        tracing::info!(jobs = resumed, "resumed unfinished jobs");
    }

    let stop = CancellationToken::new();
    let trigger = stop.clone();
    tokio::spawn(async move {
        shutdown.await;
        trigger.cancel();
    });

    let inbound = match (config.inbound_smtp, &config.bounce_domain) {
        (Some(address), Some(domain)) => {
            let tls = match &config.inbound_tls {
                Some((cert, key)) => Some(tokio_rustls::TlsAcceptor::from(
                    crate::tls::server_config(&cert.display().to_string(), &key.display().to_string())
                        .map_err(Error::InboundTls)?,
                )),
                None => None,
            };
            let listener = TcpListener::bind(address)
                .await
                .map_err(|source| Error::Inbound { address, source })?;
            tracing::info!(address = %address, domain, "inbound SMTP listener for bounces and complaints");
            let inbound = inbound::Inbound {
                store: store.clone(),
                rules: config.bounces.rules,
                verp,
                domain: domain.clone(),
                limits: inbound::Limits::default(),
                tls,
            };
            Some(tokio::spawn(inbound::serve(listener, inbound, stop.clone())))
        }
        _ => None,
    };

    // One worker per node; a panic in it drops its turn uncommitted, and it starts again.
    let automations = {
        let (store, runner, stop) = (store.clone(), runner.clone(), stop.clone());
        let config = automations::worker::WorkerConfig {
            pause_after: config.policy_failures.max,
        };
        tokio::spawn(async move {
            runner::restart_on_panic("automations", || {
                automations::worker::Worker::new(store.clone(), runner.clone(), config).run(stop.clone())
            })
            .await
        })
    };

    // One-off messages: one worker per node, restarted like the automations'.
    let messages = {
        let (store, runner, stop) = (store.clone(), runner.clone(), stop.clone());
        tokio::spawn(async move {
            runner::restart_on_panic("messages", || {
                messages::worker::Worker::new(store.clone(), runner.clone()).run(stop.clone())
            })
            .await
        })
    };

    // Webhooks out: one worker per node, restarted like the others.
    let webhook_wake = std::sync::Arc::new(tokio::sync::Notify::new());
    let webhooks = {
        let worker = webhooks::Worker {
            store: store.clone(),
            deliverer: std::sync::Arc::new(webhooks::Deliverer::new(
                config.webhook_allow_private,
                config.webhook_timeout,
            )),
            wake: webhook_wake.clone(),
            node: runner.node_id(),
            lease: config.lease,
            delays_ms: std::sync::Arc::new(
                config
                    .webhook_retry_delays
                    .iter()
                    .map(|d| d.as_millis() as u64)
                    .collect(),
            ),
        };
        let stop = stop.clone();
        tokio::spawn(async move { runner::restart_on_panic("webhooks", || worker.run(stop.clone())).await })
    };

    tracing::info!("listening on http://{local_addr}");
    let app = http::router(http::AppState {
        store: store.clone(),
        runner: runner.clone(),
        api_token,
        public_metrics: config.public_metrics,
        request_timeout: config.request_timeout,
        faults: config.faults.clone(),
        providers: providers::Providers::new(&config.providers).map_err(Error::Providers)?,
        stopping: stop.clone(),
        subscribe_limiter: std::sync::Arc::new(http::PerIpLimit::new(config.subscribe_per_minute)),
        webhook_allow_private: config.webhook_allow_private,
        webhook_wake,
        console: std::sync::Arc::new(
            http::ConsoleState::new(config.public_url.as_deref()).map_err(Error::Console)?,
        ),
    });
    // With each connection's peer address: the public subscribe form is limited per IP.
    let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(stop.clone().cancelled_owned())
        .await;
    // Whether the server ended by request or by error, let deliveries finish cleanly.
    tracing::info!("shutting down: draining in-flight deliveries");
    // A turn in progress is not committed; the next start reads its work again.
    stop.cancel();
    let _ = automations.await;
    let _ = messages.await;
    let _ = webhooks.await;
    runner.shutdown(config.drain_timeout).await;
    drop(runner);
    if let Some(inbound) = inbound {
        let _ = inbound.await;
    }
    // A connection's task lets go of its handles a moment after the server stopped
    // waiting for it; the database is closed (a redb file unlocked, the pool's
    // connections ended) when the last handle goes, and the caller may open it again
    // as soon as this returns.
    if !store.released(std::time::Duration::from_secs(5)).await {
        tracing::warn!("the store is still in use after the shutdown; it closes when the last user ends");
    }
    tracing::info!("stopped");
    served.map_err(Error::Serve)
}
