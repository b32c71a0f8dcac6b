//! Server configuration, as `run` receives it. `main.rs` builds it from flags and
//! `LETTERBOX_*` environment variables; tests build it directly.

use std::path::PathBuf;
use std::time::Duration;

use crate::domain::RetryPolicy;
use crate::mail::{DkimSettings, SmtpSettings};
use crate::policy::PolicyLimits;
use crate::runner::{DomainLimits, FailureLimit};

/// `Debug` leaves the API token out (see below).
#[derive(Clone)]
pub struct Config {
    /// Holds `letterbox.redb` (without `database_url`), the compiled-policy cache and
    /// (without SMTP) `outbox/`.
    pub data_dir: PathBuf,
    /// A PostgreSQL URL: shared state lives there, and several nodes may share it.
    /// `None`: redb in `data_dir`.
    pub database_url: Option<String>,
    /// How long a node's claims stay its own without a heartbeat (with `database_url`):
    /// a node that stops is noticed, and its in-flight recipients sent by others, after
    /// about this long.
    pub lease: Duration,
    /// The default transport; `None` writes `.eml` files to `data_dir/outbox`.
    pub smtp: Option<SmtpSettings>,
    /// More transports a job may choose by name.
    pub transports: Vec<(String, SmtpSettings)>,
    /// Sign every message with DKIM.
    pub dkim: Option<DkimSettings>,
    /// The bearer token of the `/v1` API; `None`: the one generated at first start
    /// (its hash is in the store).
    pub api_token: Option<String>,
    /// Serve `/metrics` without the API token (for a scraper on a private network).
    pub public_metrics: bool,
    /// Deliveries in flight per job unless the send request says otherwise.
    pub concurrency: u32,
    /// Deliveries in flight across all jobs.
    pub max_deliveries: u32,
    /// Jobs sending at once; later ones wait in `queued`.
    pub max_running_jobs: u32,
    /// Concurrent deliveries per recipient domain.
    pub domain_limits: DomainLimits,
    /// How jobs retry transient failures unless the send request says otherwise.
    pub retry: RetryPolicy,
    /// How long shutdown waits for in-flight deliveries before abandoning them (they are
    /// sent again at the next start).
    pub drain_timeout: Duration,
    /// How long a request may take before it is answered 503 (see `http::timeout`).
    pub request_timeout: Duration,
    /// How long a send's idempotency key is kept; older ones are pruned.
    pub idempotency_ttl: Duration,
    /// How long the event log keeps an event; older ones are pruned.
    pub event_retention: Duration,
    /// How long a double opt-in confirmation link lasts; an unconfirmed subscriber is
    /// erased once it has expired.
    pub confirm_within: Duration,
    /// Subscribe requests the public form takes from one IP address per minute.
    pub subscribe_per_minute: u32,
    /// Whether webhook endpoints may be on loopback, private, link-local and other
    /// special addresses (`--webhook-allow-private`): for tests and internal receivers.
    pub webhook_allow_private: bool,
    /// The longest one webhook request may take, connection to last byte read.
    pub webhook_timeout: Duration,
    /// The delays before each attempt of a webhook send after the first
    /// (`webhooks::DEFAULT_RETRY_DELAYS`; tests make them short).
    pub webhook_retry_delays: Vec<Duration>,
    /// How often housekeeping runs (pruning, the expiry of unconfirmed subscribers).
    pub housekeeping_every: Duration,
    /// What bounces and complaints do (see `crate::bounces`).
    pub bounces: crate::bounces::BounceSettings,
    /// The domain of VERP return paths (`b-…@domain`): every message's envelope sender
    /// names its job and subscriber. `None`: the From address is the envelope sender.
    pub bounce_domain: Option<String>,
    /// Where the inbound SMTP listener listens (needs `bounce_domain`); `None`: off.
    pub inbound_smtp: Option<std::net::SocketAddr>,
    /// The listener's certificate chain and key (PEM files), offered as STARTTLS.
    pub inbound_tls: Option<(PathBuf, PathBuf)>,
    /// Which provider webhooks are on, and their secrets (see `crate::providers`).
    pub providers: crate::providers::ProviderSettings,
    /// Base URL the public `/u/{token}` links use; defaults to `http://` + the listen
    /// address.
    pub public_url: Option<String>,
    pub policy_limits: PolicyLimits,
    /// The letterbox binary that compiles policies in child processes
    /// (`letterbox compile-policy`, under `policy_limits.compile_memory_bytes`). `None`
    /// compiles in this process: for embedders without the binary.
    pub policy_compiler: Option<PathBuf>,
    /// More policy failures than this within its window pause a job.
    pub policy_failures: FailureLimit,
    /// Panics a test injects (see `crate::faults`); never set outside tests.
    #[doc(hidden)]
    pub faults: crate::faults::Faults,
}

impl Config {
    pub fn new(data_dir: impl Into<PathBuf>) -> Config {
        Config {
            data_dir: data_dir.into(),
            database_url: None,
            lease: Duration::from_secs(10),
            smtp: None,
            transports: Vec::new(),
            dkim: None,
            api_token: None,
            public_metrics: false,
            concurrency: 16,
            max_deliveries: 512,
            max_running_jobs: 4,
            domain_limits: DomainLimits::default(),
            retry: RetryPolicy::default(),
            drain_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(30),
            idempotency_ttl: Duration::from_secs(24 * 3600),
            event_retention: Duration::from_secs(90 * 24 * 3600),
            confirm_within: Duration::from_secs(3 * 24 * 3600),
            subscribe_per_minute: 10,
            housekeeping_every: Duration::from_secs(60),
            webhook_allow_private: false,
            webhook_timeout: Duration::from_secs(15),
            webhook_retry_delays: crate::webhooks::DEFAULT_RETRY_DELAYS.to_vec(),
            bounces: Default::default(),
            bounce_domain: None,
            inbound_smtp: None,
            inbound_tls: None,
            providers: Default::default(),
            public_url: None,
            policy_limits: PolicyLimits::default(),
            policy_compiler: None,
            policy_failures: FailureLimit::default(),
            faults: Default::default(),
        }
    }

    /// SMTP settings for `url` with the defaults used by `serve`.
    pub fn smtp_url(url: impl Into<String>) -> SmtpSettings {
        SmtpSettings::new(url)
    }
}

/// Never prints the API token (SMTP and DKIM settings redact their own secrets).
impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("data_dir", &self.data_dir)
            .field(
                "database_url",
                &self.database_url.as_deref().map(crate::mail::redact_url),
            )
            .field("lease", &self.lease)
            .field("smtp", &self.smtp)
            .field("transports", &self.transports)
            .field("dkim", &self.dkim)
            .field("api_token", &self.api_token.as_ref().map(|_| "<redacted>"))
            .field("public_metrics", &self.public_metrics)
            .field("concurrency", &self.concurrency)
            .field("max_deliveries", &self.max_deliveries)
            .field("max_running_jobs", &self.max_running_jobs)
            .field("domain_limits", &self.domain_limits)
            .field("retry", &self.retry)
            .field("drain_timeout", &self.drain_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("idempotency_ttl", &self.idempotency_ttl)
            .field("event_retention", &self.event_retention)
            .field("confirm_within", &self.confirm_within)
            .field("subscribe_per_minute", &self.subscribe_per_minute)
            .field("housekeeping_every", &self.housekeeping_every)
            .field("webhook_allow_private", &self.webhook_allow_private)
            .field("webhook_timeout", &self.webhook_timeout)
            .field("webhook_retry_delays", &self.webhook_retry_delays)
            .field("bounces", &self.bounces)
            .field("bounce_domain", &self.bounce_domain)
            .field("inbound_smtp", &self.inbound_smtp)
            .field("inbound_tls", &self.inbound_tls)
            .field("providers", &self.providers)
            .field("public_url", &self.public_url)
            .field("policy_limits", &self.policy_limits)
            .field("policy_compiler", &self.policy_compiler)
            .field("policy_failures", &self.policy_failures)
            .field("faults", &self.faults)
            .finish()
    }
}
