//! The settings file, `letterbox.toml`, and what overrides it: the only place that knows
//! the `config` crate. `serve` reads the file (if any), lays the flags and `LETTERBOX_*`
//! variables clap found on top, and checks the result here, naming the key of each
//! problem, before anything starts. `examples/letterbox.toml` documents every key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::config::Config;
use crate::domain::RetryPolicy;
use crate::mail::{DkimSettings, RateLimit, SmtpSettings};

/// The file read when `--config` is not given, if it exists.
pub const DEFAULT_FILE: &str = "letterbox.toml";

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The file is missing, not TOML, or a key has the wrong type or is unknown.
    #[error("{0}")]
    Load(String),
    /// A key's value is out of range or malformed.
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: &str, message: impl Into<String>) -> SettingsError {
    SettingsError::Invalid {
        key: key.to_string(),
        message: message.into(),
    }
}

/// The file's layout. Durations are strings such as `30s` or `5m`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    listen: String,
    data: PathBuf,
    api_token: Option<String>,
    public_url: Option<String>,
    public_metrics: bool,
    request_timeout: String,
    drain_timeout: String,
    idempotency_ttl: String,
    event_retention: String,
    confirm_within: String,
    subscribe_per_minute: u32,
    webhook_timeout: String,
    webhook_allow_private: bool,
    delivery: Delivery,
    retry: Retry,
    bounces: Bounces,
    policy: Policy,
    smtp: Option<Smtp>,
    #[serde(default)]
    transports: BTreeMap<String, Smtp>,
    dkim: Option<Dkim>,
    #[serde(default)]
    database: Database,
    /// Read by the client commands only.
    #[serde(default)]
    #[allow(dead_code)]
    client: Option<Client>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Delivery {
    concurrency: u32,
    max_deliveries: u32,
    max_running_jobs: u32,
    #[serde(default)]
    domain_limits: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Retry {
    attempts: u32,
    base: String,
    cap: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Bounces {
    /// The domain of VERP return paths; the listener takes mail for it only.
    domain: Option<String>,
    /// Where the inbound SMTP listener listens (`ADDR:PORT`); off when absent.
    inbound_smtp: Option<String>,
    /// The listener's certificate chain and private key (PEM): STARTTLS is offered.
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    soft_limit: u32,
    soft_window: String,
    block_after: u32,
    block_window: String,
    block_pause: String,
    /// SNS topics (ARNs) whose SES notifications `/webhooks/ses` accepts.
    #[serde(default)]
    ses_topics: Vec<String>,
    /// Mailgun's webhook signing key: `/webhooks/mailgun` is on with it.
    mailgun_signing_key: Option<String>,
    /// `user:password` in Postmark's webhook URL: `/webhooks/postmark` is on with it.
    postmark_auth: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Policy {
    timeout_ms: u64,
    memory_mib: usize,
    memory_max_mib: usize,
    compile_memory_mib: usize,
    max_upload_mib: usize,
    max_failures: u32,
    failure_window: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Smtp {
    url: String,
    username: Option<String>,
    password: Option<String>,
    pool: Option<u32>,
    /// `N/s`, `N/min` or `N/h`: the provider's sending limit.
    rate: Option<String>,
    timeout: Option<String>,
    connect_timeout: Option<String>,
    send_timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Dkim {
    key_file: PathBuf,
    selector: String,
    domain: String,
}

/// Where shared state lives: without a URL, redb in `data`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Database {
    url: Option<String>,
    lease: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Client {
    pub server: Option<String>,
}

/// Every default, as the file would write it.
const DEFAULTS: &[(&str, &str)] = &[
    ("listen", "127.0.0.1:8080"),
    ("data", "./letterbox-data"),
    ("public_metrics", "false"),
    ("request_timeout", "30s"),
    ("drain_timeout", "30s"),
    ("idempotency_ttl", "24h"),
    ("event_retention", "90d"),
    ("confirm_within", "3d"),
    ("subscribe_per_minute", "10"),
    ("webhook_timeout", "15s"),
    ("webhook_allow_private", "false"),
    ("delivery.concurrency", "16"),
    ("delivery.max_deliveries", "512"),
    ("delivery.max_running_jobs", "4"),
    ("retry.attempts", "5"),
    ("retry.base", "60s"),
    ("retry.cap", "1h"),
    ("bounces.soft_limit", "3"),
    ("bounces.soft_window", "7d"),
    ("bounces.block_after", "10"),
    ("bounces.block_window", "10m"),
    ("bounces.block_pause", "30m"),
    ("policy.timeout_ms", "100"),
    ("policy.memory_mib", "64"),
    ("policy.memory_max_mib", "512"),
    ("policy.compile_memory_mib", "1024"),
    ("policy.max_upload_mib", "64"),
    ("policy.max_failures", "20"),
    ("policy.failure_window", "10s"),
];

/// What `serve` needs: where to listen, and the server's configuration.
#[derive(Debug)]
pub struct Settings {
    pub listen: SocketAddr,
    pub config: Config,
}

/// Values given on the command line or in the environment, by file key (e.g.
/// `delivery.concurrency`); they win over the file.
#[derive(Debug, Default)]
pub struct Overrides {
    pub values: Vec<(&'static str, String)>,
    /// `DOMAIN=N` entries added to (or replacing) the file's `delivery.domain_limits`.
    pub domain_limits: Vec<String>,
    /// `NAME=URL` transports added to the file's `[transports]`.
    pub transports: Vec<String>,
    /// SNS topic ARNs added to the file's `bounces.ses_topics`.
    pub ses_topics: Vec<String>,
}

/// The file to read: `explicit` (which must exist), else `letterbox.toml` in the
/// working directory if there is one.
pub fn file_to_read(explicit: Option<&Path>) -> Option<PathBuf> {
    explicit.map(Path::to_path_buf).or_else(|| {
        Path::new(DEFAULT_FILE)
            .exists()
            .then(|| PathBuf::from(DEFAULT_FILE))
    })
}

fn builder(file: Option<&Path>) -> config::ConfigBuilder<config::builder::DefaultState> {
    let mut builder = config::Config::builder();
    if let Some(path) = file {
        builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
    }
    builder
}

/// The `[client]` table and `api_token` of `file`, for the client commands.
pub fn client(file: &Path) -> Result<(Client, Option<String>), SettingsError> {
    #[derive(Deserialize)]
    struct ClientView {
        #[serde(default)]
        client: Client,
        api_token: Option<String>,
    }
    let view: ClientView = builder(Some(file))
        .build()
        .and_then(|c| c.try_deserialize())
        .map_err(|e| SettingsError::Load(e.to_string()))?;
    Ok((view.client, view.api_token))
}

/// Reads `file` (if any) under `overrides` and checks every value.
pub fn load(file: Option<&Path>, overrides: Overrides) -> Result<Settings, SettingsError> {
    let mut builder = builder(file);
    let load_error = |e: config::ConfigError| SettingsError::Load(e.to_string());
    for (key, value) in DEFAULTS {
        builder = builder.set_default(*key, *value).map_err(load_error)?;
    }
    for (key, value) in overrides.values {
        builder = builder.set_override(key, value).map_err(load_error)?;
    }
    let file: File = builder
        .build()
        .and_then(|c| c.try_deserialize())
        .map_err(load_error)?;
    resolve(
        file,
        overrides.domain_limits,
        overrides.transports,
        overrides.ses_topics,
    )
}

fn duration(key: &str, value: &str) -> Result<Duration, SettingsError> {
    humantime::parse_duration(value)
        .map_err(|e| invalid(key, format!("{value:?} is not a duration like 30s or 5m: {e}")))
}

fn positive_duration(key: &str, value: &str) -> Result<Duration, SettingsError> {
    let d = duration(key, value)?;
    if d.is_zero() {
        return Err(invalid(key, "must be more than zero"));
    }
    Ok(d)
}

fn in_range<T: PartialOrd + std::fmt::Display + Copy>(
    key: &str,
    value: T,
    min: T,
    max: T,
) -> Result<T, SettingsError> {
    if value < min || value > max {
        return Err(invalid(
            key,
            format!("must be between {min} and {max}, got {value}"),
        ));
    }
    Ok(value)
}

fn transport(key: &str, smtp: &Smtp) -> Result<SmtpSettings, SettingsError> {
    let mut url = smtp.url.clone();
    if let Some(rate) = &smtp.rate {
        rate.parse::<RateLimit>()
            .map_err(|e| invalid(&format!("{key}.rate"), e))?;
        url.push(if url.contains('?') { '&' } else { '?' });
        url.push_str("rate=");
        url.push_str(rate);
    }
    let mut settings = SmtpSettings::new(url);
    settings.username = smtp.username.clone();
    settings.password = smtp.password.clone();
    if let Some(pool) = smtp.pool {
        settings.pool_size = in_range(&format!("{key}.pool"), pool, 1, 1000)?;
    }
    if let Some(t) = &smtp.timeout {
        settings.command_timeout = positive_duration(&format!("{key}.timeout"), t)?;
    }
    if let Some(t) = &smtp.connect_timeout {
        settings.connect_timeout = positive_duration(&format!("{key}.connect_timeout"), t)?;
    }
    if let Some(t) = &smtp.send_timeout {
        settings.send_timeout = positive_duration(&format!("{key}.send_timeout"), t)?;
    }
    // The URL itself (scheme, host, tls, credentials) is checked here too, so a typo is
    // reported with its key rather than at the first send.
    crate::mail::check_smtp_settings(&settings).map_err(|e| invalid(&format!("{key}.url"), e))?;
    Ok(settings)
}

fn resolve(
    file: File,
    extra_limits: Vec<String>,
    extra_transports: Vec<String>,
    extra_topics: Vec<String>,
) -> Result<Settings, SettingsError> {
    let listen: SocketAddr = file.listen.parse().map_err(|e| {
        invalid(
            "listen",
            format!("{:?} is not an address like 127.0.0.1:8080: {e}", file.listen),
        )
    })?;
    let mut config = Config::new(file.data);
    if let Some(url) = file.database.url {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(invalid(
                "database.url",
                "must be a PostgreSQL URL: postgres://user:password@host:port/database",
            ));
        }
        config.database_url = Some(url);
    }
    if let Some(lease) = &file.database.lease {
        let lease = positive_duration("database.lease", lease)?;
        if lease < std::time::Duration::from_secs(1) || lease > std::time::Duration::from_secs(600) {
            return Err(invalid("database.lease", "must be between 1s and 10m"));
        }
        config.lease = lease;
    }
    if let Some(token) = &file.api_token
        && token.trim().len() < crate::tokens::MIN_TOKEN_LEN
    {
        return Err(invalid(
            "api_token",
            format!("must be at least {} characters", crate::tokens::MIN_TOKEN_LEN),
        ));
    }
    config.api_token = file.api_token;
    if let Some(url) = &file.public_url
        && !(url.starts_with("http://") || url.starts_with("https://"))
    {
        return Err(invalid(
            "public_url",
            format!("{url:?} must start with http:// or https://"),
        ));
    }
    config.public_url = file.public_url;
    config.public_metrics = file.public_metrics;
    config.request_timeout = positive_duration("request_timeout", &file.request_timeout)?;
    config.drain_timeout = duration("drain_timeout", &file.drain_timeout)?;
    config.idempotency_ttl = positive_duration("idempotency_ttl", &file.idempotency_ttl)?;
    config.event_retention = positive_duration("event_retention", &file.event_retention)?;
    config.confirm_within = positive_duration("confirm_within", &file.confirm_within)?;
    if file.subscribe_per_minute == 0 {
        return Err(invalid("subscribe_per_minute", "must be at least 1"));
    }
    config.subscribe_per_minute = file.subscribe_per_minute;
    config.webhook_timeout = positive_duration("webhook_timeout", &file.webhook_timeout)?;
    config.webhook_allow_private = file.webhook_allow_private;
    let b = &file.bounces;
    if let Some(domain) = &b.domain {
        let domain = domain.trim().trim_start_matches('@').to_ascii_lowercase();
        let valid = !domain.is_empty()
            && domain.len() <= 253
            && domain.contains('.')
            && domain.split('.').all(|label| {
                !label.is_empty() && label.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
            });
        if !valid {
            return Err(invalid(
                "bounces.domain",
                format!("{domain:?} is not a domain name like bounces.example.com"),
            ));
        }
        config.bounce_domain = Some(domain);
    }
    if let Some(address) = &b.inbound_smtp {
        let address: SocketAddr = address.parse().map_err(|e| {
            invalid(
                "bounces.inbound_smtp",
                format!("{address:?} is not an address like 0.0.0.0:2525: {e}"),
            )
        })?;
        if config.bounce_domain.is_none() {
            return Err(invalid(
                "bounces.inbound_smtp",
                "needs bounces.domain (--bounce-domain): the listener takes mail for that domain only",
            ));
        }
        config.inbound_smtp = Some(address);
    }
    config.inbound_tls = match (&b.tls_cert, &b.tls_key) {
        (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
        (None, None) => None,
        _ => {
            return Err(invalid(
                "bounces.tls_cert",
                "give both the certificate (tls_cert) and its key (tls_key), or neither",
            ));
        }
    };
    config.bounces = crate::bounces::BounceSettings {
        rules: crate::bounces::Rules {
            soft_limit: in_range("bounces.soft_limit", b.soft_limit, 1, 100)?,
            soft_window_ms: positive_duration("bounces.soft_window", &b.soft_window)?.as_millis() as u64,
        },
        blocks: crate::bounces::BlockLimit {
            after: in_range("bounces.block_after", b.block_after, 1, 1_000_000)?,
            window: positive_duration("bounces.block_window", &b.block_window)?,
            pause: positive_duration("bounces.block_pause", &b.block_pause)?,
        },
    };

    for topic in b.ses_topics.iter().chain(&extra_topics) {
        let topic = topic.trim();
        // arn:aws:sns:REGION:ACCOUNT:NAME (arn:aws-cn:…, arn:aws-us-gov:… too).
        let parts: Vec<&str> = topic.split(':').collect();
        if parts.len() != 6
            || !parts[0].eq("arn")
            || !parts[1].starts_with("aws")
            || parts[2] != "sns"
            || parts[5].is_empty()
        {
            return Err(invalid(
                "bounces.ses_topics",
                format!(
                    "{topic:?} is not an SNS topic ARN like arn:aws:sns:us-east-1:123456789012:ses-bounces"
                ),
            ));
        }
        config.providers.ses_topics.push(topic.to_string());
    }
    if let Some(key) = &b.mailgun_signing_key {
        if key.trim().is_empty() {
            return Err(invalid("bounces.mailgun_signing_key", "is empty"));
        }
        config.providers.mailgun_signing_key = Some(key.trim().to_string());
    }
    if let Some(auth) = &b.postmark_auth {
        match auth.split_once(':') {
            Some((user, password)) if !user.is_empty() && password.len() >= 12 => {}
            _ => {
                return Err(invalid(
                    "bounces.postmark_auth",
                    "must be USER:PASSWORD with a password of at least 12 characters",
                ));
            }
        }
        config.providers.postmark_auth = Some(auth.clone());
    }

    let d = &file.delivery;
    config.concurrency = in_range(
        "delivery.concurrency",
        d.concurrency,
        1,
        crate::runner::MAX_CONCURRENCY,
    )?;
    config.max_deliveries = in_range("delivery.max_deliveries", d.max_deliveries, 1, 100_000)?;
    config.max_running_jobs = in_range("delivery.max_running_jobs", d.max_running_jobs, 1, 1000)?;
    for entry in d.domain_limits.iter().chain(&extra_limits) {
        config
            .domain_limits
            .add(entry)
            .map_err(|e| invalid("delivery.domain_limits", e))?;
    }

    let base = positive_duration("retry.base", &file.retry.base)?;
    let cap = positive_duration("retry.cap", &file.retry.cap)?;
    config.retry = RetryPolicy {
        max_attempts: in_range(
            "retry.attempts",
            file.retry.attempts,
            1,
            RetryPolicy::MAX_ATTEMPTS,
        )?,
        base_ms: base.as_millis() as u64,
        cap_ms: cap.as_millis() as u64,
    };
    config.retry.validate().map_err(|e| invalid("retry", e))?;

    let p = &file.policy;
    config.policy_limits.timeout =
        Duration::from_millis(in_range("policy.timeout_ms", p.timeout_ms, 1, 60_000)?);
    config.policy_limits.memory_bytes = in_range("policy.memory_mib", p.memory_mib, 1, 4096)? << 20;
    // The ceiling of what a component may ask for (its letterbox:limits section); never
    // below the default, so raising only memory_mib does what it says.
    config.policy_limits.max_memory_bytes =
        in_range("policy.memory_max_mib", p.memory_max_mib, 1, 4096)?.max(p.memory_mib) << 20;
    config.policy_limits.compile_memory_bytes =
        in_range("policy.compile_memory_mib", p.compile_memory_mib, 64, 1 << 20)? << 20;
    config.policy_limits.max_upload_bytes =
        in_range("policy.max_upload_mib", p.max_upload_mib, 1, 1024)? << 20;
    config.policy_failures.max = p.max_failures;
    config.policy_failures.window = positive_duration("policy.failure_window", &p.failure_window)?;

    config.smtp = file.smtp.as_ref().map(|s| transport("smtp", s)).transpose()?;
    for (name, smtp) in &file.transports {
        config
            .transports
            .push((name.clone(), transport(&format!("transports.{name}"), smtp)?));
    }
    for entry in &extra_transports {
        let (name, url) = entry
            .split_once('=')
            .filter(|(name, _)| !name.is_empty())
            .ok_or_else(|| invalid("transports", format!("{entry:?}: expected NAME=URL")))?;
        let smtp = Smtp {
            url: url.to_string(),
            username: None,
            password: None,
            pool: None,
            rate: None,
            timeout: None,
            connect_timeout: None,
            send_timeout: None,
        };
        let settings = transport(&format!("transports.{name}"), &smtp)?;
        config.transports.retain(|(n, _)| n != name);
        config.transports.push((name.to_string(), settings));
    }
    if let Some(dkim) = file.dkim {
        let private_key = std::fs::read_to_string(&dkim.key_file).map_err(|e| {
            invalid(
                "dkim.key_file",
                format!("cannot read {}: {e}", dkim.key_file.display()),
            )
        })?;
        config.dkim = Some(DkimSettings {
            private_key,
            selector: dkim.selector,
            domain: dkim.domain,
        });
    }
    Ok(Settings { listen, config })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(text: &str, values: Vec<(&'static str, String)>) -> Result<Settings, SettingsError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("letterbox.toml");
        std::fs::write(&path, text).unwrap();
        load(
            Some(&path),
            Overrides {
                values,
                ..Overrides::default()
            },
        )
    }

    fn error(text: &str) -> String {
        load_text(text, Vec::new()).unwrap_err().to_string()
    }

    #[test]
    fn the_documented_example_loads() {
        let example = include_str!("../examples/letterbox.toml");
        let settings = load_text(example, Vec::new()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(settings.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(settings.config.transports.len(), 1);
    }

    #[test]
    fn flags_win_over_the_file_and_the_file_over_defaults() {
        let settings = load_text(
            "listen = \"0.0.0.0:9000\"\n[delivery]\nconcurrency = 8\n",
            vec![("delivery.concurrency", "4".into())],
        )
        .unwrap();
        assert_eq!(settings.listen.to_string(), "0.0.0.0:9000");
        assert_eq!(settings.config.concurrency, 4);
        assert_eq!(settings.config.max_deliveries, 512, "a default");
    }

    #[test]
    fn errors_name_the_key() {
        assert!(
            error("[delivery]\nconcurrency = 0\n").starts_with("delivery.concurrency: must be between 1")
        );
        assert!(error("[delivery]\nconcurrency = \"many\"\n").contains("delivery.concurrency"));
        assert!(error("listen = \"nowhere\"\n").starts_with("listen: "));
        assert!(error("[retry]\nbase = \"soon\"\n").starts_with("retry.base: "));
        assert!(
            error("[transports.bulk]\nurl = \"smtp://h\"\nrate = \"fast\"\n")
                .starts_with("transports.bulk.rate: ")
        );
        assert!(error("[smtp]\nurl = \"ftp://h\"\n").starts_with("smtp.url: "));
        assert!(
            error("[database]\nurl = \"mysql://h/db\"\n")
                .starts_with("database.url: must be a PostgreSQL URL")
        );
        assert!(error("api_token = \"short\"\n").starts_with("api_token: "));
        assert!(
            error("[bounces]\ninbound_smtp = \"127.0.0.1:2525\"\n")
                .starts_with("bounces.inbound_smtp: needs bounces.domain")
        );
        assert!(error("[bounces]\ndomain = \"not a domain\"\n").starts_with("bounces.domain: "));
        assert!(error("[bounces]\nsoft_limit = 0\n").starts_with("bounces.soft_limit: "));
        assert!(error("[bounces]\nses_topics = [\"ses-bounces\"]\n").starts_with("bounces.ses_topics: "));
        assert!(error("[bounces]\npostmark_auth = \"hooks:short\"\n").starts_with("bounces.postmark_auth: "));
        let topics = load_text(
            "[bounces]\nses_topics = [\"arn:aws:sns:eu-west-1:123456789012:bounces\"]\nmailgun_signing_key = \"k\"\n",
            Vec::new(),
        )
        .unwrap();
        assert_eq!(
            topics.config.providers.ses_topics,
            ["arn:aws:sns:eu-west-1:123456789012:bounces"]
        );
        assert_eq!(topics.config.providers.mailgun_signing_key.as_deref(), Some("k"));
        assert!(error("[bounces]\ntls_cert = \"a.pem\"\n").starts_with("bounces.tls_cert: give both"));
        let unknown = error("[delivery]\nconcurency = 3\n");
        assert!(unknown.contains("concurency"), "{unknown}");
        let syntax = error("listen = \n");
        assert!(syntax.contains("letterbox.toml"), "{syntax}");
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let settings = load_text(
            "api_token = \"a-very-secret-token-123\"\n[smtp]\nurl = \"smtp://u:pw-in-url@h:25\"\npassword = \"hunter2-password\"\nusername = \"u\"\n[database]\nurl = \"postgres://lb:db-password@h/lb\"\n",
            Vec::new(),
        )
        .unwrap();
        let shown = format!("{settings:?}");
        assert_eq!(
            settings.config.database_url.as_deref(),
            Some("postgres://lb:db-password@h/lb")
        );
        for secret in [
            "a-very-secret-token-123",
            "pw-in-url",
            "hunter2-password",
            "db-password",
        ] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
    }
}
