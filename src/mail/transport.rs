//! Named transports: where messages go (an SMTP server or the outbox directory) and how
//! fast (a rate limit matching the provider's quota).

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use super::smtp::{Endpoint, Security, SmtpPool, Timeouts};
use super::tls::TlsOptions;
use super::{Dkim, MailError, Outgoing, build, formatted};

/// The transport used when a job names none.
pub const DEFAULT_TRANSPORT: &str = "default";

/// `N/s`, `N/min` or `N/h`: at most N messages per period, spread evenly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub messages: u32,
    pub per: Duration,
}

impl std::str::FromStr for RateLimit {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("invalid rate {s:?}: expected N/s, N/min or N/h with N > 0");
        let (n, unit) = s.trim().split_once('/').ok_or_else(bad)?;
        let messages: u32 = n.trim().parse().map_err(|_| bad())?;
        let per = match unit.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            _ => return Err(bad()),
        };
        if messages == 0 {
            return Err(bad());
        }
        Ok(RateLimit { messages, per })
    }
}

impl std::fmt::Display for RateLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let unit = match self.per.as_secs() {
            1 => "s",
            60 => "min",
            _ => "h",
        };
        write!(f, "{}/{unit}", self.messages)
    }
}

/// Settings of one SMTP transport. Built from a URL such as
/// `smtp://user:secret@mail.example.com:587?tls=required&pool=8&rate=10/s`.
#[derive(Clone)]
pub struct SmtpSettings {
    /// `smtp://` or `smtps://`, with optional `user:password@`, host, port and the query
    /// parameters `tls` (none, opportunistic, required), `pool`, `rate`, `hello`,
    /// `tls_ca` (a PEM file of CA certificates to trust besides the built-in roots) and
    /// `tls_verify_hostname` (`false` accepts a certificate for another name).
    pub url: String,
    /// Override or supply the credentials outside the URL (e.g. from the environment).
    pub username: Option<String>,
    pub password: Option<String>,
    /// Connections kept open to the server (the URL's `pool` wins).
    pub pool_size: u32,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
    pub send_timeout: Duration,
    /// Messages per connection before it is replaced.
    pub max_messages_per_connection: u32,
}

/// Never prints the password, nor credentials embedded in the URL.
impl std::fmt::Debug for SmtpSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpSettings")
            .field("url", &redact_url(&self.url))
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("pool_size", &self.pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .field("command_timeout", &self.command_timeout)
            .field("send_timeout", &self.send_timeout)
            .finish()
    }
}

impl SmtpSettings {
    /// Settings for `url` with the defaults `serve` uses.
    pub fn new(url: impl Into<String>) -> SmtpSettings {
        SmtpSettings {
            url: url.into(),
            username: None,
            password: None,
            pool_size: 32,
            connect_timeout: Duration::from_secs(10),
            command_timeout: Duration::from_secs(30),
            send_timeout: Duration::from_secs(120),
            max_messages_per_connection: 1000,
        }
    }
}

/// `smtps://user:secret@host` → `smtps://<redacted>@host`.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}<redacted>{}", &url[..scheme_end + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

/// What the URL says, checked.
struct Parsed {
    endpoint: Endpoint,
    pool: Option<u32>,
    rate: Option<RateLimit>,
}

/// Checks a transport's URL and credentials without connecting; the error never shows
/// the password.
pub fn check_smtp_settings(settings: &SmtpSettings) -> Result<(), String> {
    parse_url(settings).map(|_| ()).map_err(|e| e.to_string())
}

fn parse_url(settings: &SmtpSettings) -> Result<Parsed, MailError> {
    let shown = redact_url(&settings.url);
    let bad = |why: String| MailError::Config(format!("SMTP URL {shown}: {why}"));
    let url = url::Url::parse(&settings.url).map_err(|e| bad(e.to_string()))?;
    let implicit = match url.scheme() {
        "smtp" => false,
        "smtps" => true,
        other => return Err(bad(format!("scheme must be smtp or smtps, not {other:?}"))),
    };
    let host = url
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| bad("no host".into()))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let mut security = if implicit {
        Security::Implicit
    } else {
        Security::None
    };
    let (mut pool, mut rate, mut hello) = (None, None, None);
    let mut tls = TlsOptions {
        extra_roots: Vec::new(),
        verify_hostname: true,
        client_config: Default::default(),
    };
    for (key, value) in url.query_pairs() {
        match key.as_ref() {
            "tls" if !implicit => {
                security = match value.as_ref() {
                    "none" => Security::None,
                    "opportunistic" => Security::Opportunistic,
                    "required" => Security::Required,
                    other => {
                        return Err(bad(format!(
                            "tls must be none, opportunistic or required, not {other:?}"
                        )));
                    }
                }
            }
            "pool" => {
                pool = Some(
                    value
                        .parse::<u32>()
                        .ok()
                        .filter(|n| (1..=1000).contains(n))
                        .ok_or_else(|| bad(format!("pool must be 1 to 1000, not {value:?}")))?,
                )
            }
            "rate" => rate = Some(value.parse::<RateLimit>().map_err(bad)?),
            "hello" => hello = Some(value.into_owned()),
            "tls_ca" => tls.extra_roots = TlsOptions::load_roots(&value).map_err(bad)?,
            "tls_verify_hostname" => {
                tls.verify_hostname = match value.as_ref() {
                    "true" => true,
                    "false" => false,
                    other => {
                        return Err(bad(format!(
                            "tls_verify_hostname must be true or false, not {other:?}"
                        )));
                    }
                }
            }
            other => {
                return Err(bad(format!(
                    "unknown parameter {other:?} (known: tls, pool, rate, hello, tls_ca, tls_verify_hostname)"
                )));
            }
        }
    }
    let port = url.port().unwrap_or(match security {
        Security::Implicit => 465,
        Security::Required => 587,
        _ => 25,
    });
    let decode = |s: &str| {
        percent_decode(s).map_err(|_| bad("the credentials are not valid percent-encoded UTF-8".into()))
    };
    let user = match &settings.username {
        Some(u) => Some(u.clone()),
        None if !url.username().is_empty() => Some(decode(url.username())?),
        None => None,
    };
    let password = match &settings.password {
        Some(p) => Some(p.clone()),
        None => url.password().map(decode).transpose()?,
    };
    let credentials = match (user, password) {
        (Some(u), Some(p)) => Some((u, p)),
        (None, None) => None,
        _ => return Err(bad("give both a user name and a password, or neither".into())),
    };
    let hello = hello.unwrap_or_else(|| hostname_or("localhost"));
    Ok(Parsed {
        endpoint: Endpoint {
            host,
            port,
            security,
            credentials,
            hello,
            tls,
        },
        pool,
        rate,
    })
}

fn percent_decode(s: &str) -> Result<String, std::str::Utf8Error> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
}

fn hostname_or(fallback: &str) -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| {
            !h.is_empty()
                && h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        })
        .unwrap_or_else(|| fallback.to_string())
}

enum Sink {
    Outbox(PathBuf),
    Smtp(Box<SmtpPool>),
}

/// One configured transport. Cheap to clone.
#[derive(Clone)]
pub struct Transport {
    inner: Arc<TransportInner>,
}

struct TransportInner {
    name: String,
    sink: Sink,
    /// Shown in logs: the kind and address, never credentials.
    label: String,
    rate: Option<RateLimit>,
    limiter: Option<DefaultDirectRateLimiter>,
    dkim: Option<Arc<Dkim>>,
}

impl Transport {
    /// An outbox directory. With `dkim`, every message is signed.
    pub fn outbox(
        name: &str,
        dir: PathBuf,
        rate: Option<RateLimit>,
        dkim: Option<Arc<Dkim>>,
    ) -> Result<Transport, MailError> {
        std::fs::create_dir_all(&dir).map_err(|e| MailError::Outbox(format!("{}: {e}", dir.display())))?;
        let label = format!("outbox directory {}", dir.display());
        Ok(Transport::new(name, Sink::Outbox(dir), label, rate, dkim))
    }

    /// An SMTP server. With `dkim`, every message is signed.
    pub fn smtp(
        name: &str,
        settings: &SmtpSettings,
        dkim: Option<Arc<Dkim>>,
    ) -> Result<Transport, MailError> {
        let parsed = parse_url(settings)?;
        let timeouts = Timeouts {
            connect: settings.connect_timeout,
            command: settings.command_timeout,
            send: settings.send_timeout,
        };
        let pool_size = parsed.pool.unwrap_or(settings.pool_size);
        let label = format!("SMTP {} (pool {pool_size})", redact_url(&settings.url));
        let pool = SmtpPool::new(
            parsed.endpoint,
            timeouts,
            pool_size,
            settings.max_messages_per_connection,
        );
        Ok(Transport::new(
            name,
            Sink::Smtp(Box::new(pool)),
            label,
            parsed.rate,
            dkim,
        ))
    }

    fn new(
        name: &str,
        sink: Sink,
        label: String,
        rate: Option<RateLimit>,
        dkim: Option<Arc<Dkim>>,
    ) -> Transport {
        // Evenly spaced, with no burst: providers count per second or minute, and a
        // burst of a whole hour's quota at once is exactly what trips their limits.
        let limiter = rate.map(|r| {
            let period = r.per / r.messages;
            let quota = Quota::with_period(period.max(Duration::from_nanos(1)))
                .expect("the period is positive")
                .allow_burst(NonZeroU32::MIN);
            RateLimiter::direct(quota)
        });
        Transport {
            inner: Arc::new(TransportInner {
                name: name.to_string(),
                sink,
                label,
                rate,
                limiter,
                dkim,
            }),
        }
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub fn rate(&self) -> Option<RateLimit> {
        self.inner.rate
    }

    /// Describes the transport without secrets, for logs.
    pub fn describe(&self) -> String {
        match self.inner.rate {
            Some(rate) => format!("{} at most {rate}", self.inner.label),
            None => self.inner.label.clone(),
        }
    }

    /// Waits until the rate limit lets one more message through. Separate from `send`
    /// so that a caller can give up waiting (pause, shutdown) before anything is sent.
    pub async fn ready(&self) {
        if let Some(limiter) = &self.inner.limiter {
            limiter.until_ready().await;
        }
    }

    /// Builds and delivers one message. Returns the server's reply (or the outbox path).
    /// `go` is asked once a connection is in hand just before the transaction begins,
    /// and over SMTP again right before the message (after DATA): if it says no, nothing
    /// is sent (`MailError::Withheld`).
    pub async fn send(
        &self,
        outgoing: &Outgoing,
        go: &(dyn Fn() -> bool + Sync),
    ) -> Result<String, MailError> {
        let mut message = build(outgoing)?;
        if let Some(dkim) = &self.inner.dkim {
            dkim.sign(&mut message);
        }
        match &self.inner.sink {
            Sink::Outbox(dir) => {
                let stem: String = outgoing
                    .message_id
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                            c
                        } else {
                            '_'
                        }
                    })
                    .collect();
                let path = dir.join(format!("{stem}.eml"));
                let tmp = dir.join(format!(".{stem}.eml.tmp"));
                // A full disk or similar may pass: worth retrying.
                let io = |e: std::io::Error| MailError::Transient(format!("outbox {}: {e}", path.display()));
                if !go() {
                    return Err(MailError::Withheld);
                }
                tokio::fs::write(&tmp, formatted(&message)).await.map_err(io)?;
                tokio::fs::rename(&tmp, &path).await.map_err(io)?;
                Ok(format!("written to {}", path.display()))
            }
            Sink::Smtp(pool) => {
                let started = std::time::Instant::now();
                let sent = pool.send(message.envelope(), &formatted(&message), go).await;
                let outcome = if sent.is_ok() { "ok" } else { "error" };
                metrics::histogram!("letterbox_smtp_send_seconds", "transport" => self.inner.name.clone(), "outcome" => outcome)
                    .record(started.elapsed().as_secs_f64());
                let response = sent?;
                Ok(format!(
                    "{} {}",
                    response.code(),
                    response.message().collect::<Vec<_>>().join(" ")
                ))
            }
        }
    }
}

/// Every configured transport by name; one of them is the default.
#[derive(Clone)]
pub struct Transports {
    by_name: BTreeMap<String, Transport>,
}

impl Transports {
    /// `transports` must contain one named `DEFAULT_TRANSPORT`.
    pub fn new(transports: Vec<Transport>) -> Result<Transports, MailError> {
        let mut by_name = BTreeMap::new();
        for t in transports {
            if by_name.insert(t.name().to_string(), t.clone()).is_some() {
                return Err(MailError::Config(format!(
                    "transport {:?} is configured twice",
                    t.name()
                )));
            }
        }
        if !by_name.contains_key(DEFAULT_TRANSPORT) {
            return Err(MailError::Config(format!(
                "no transport named {DEFAULT_TRANSPORT:?}"
            )));
        }
        Ok(Transports { by_name })
    }

    /// The transport called `name`, or the default one.
    pub fn get(&self, name: Option<&str>) -> Result<&Transport, MailError> {
        let name = name.unwrap_or(DEFAULT_TRANSPORT);
        self.by_name.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.by_name.keys().map(String::as_str).collect();
            MailError::UnknownTransport(format!(
                "no transport named {name:?} (configured: {})",
                known.join(", ")
            ))
        })
    }

    pub fn iter(&self) -> impl Iterator<Item = &Transport> {
        self.by_name.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rates() {
        assert_eq!(
            "10/s".parse::<RateLimit>().unwrap(),
            RateLimit {
                messages: 10,
                per: Duration::from_secs(1)
            }
        );
        assert_eq!(
            "600/min".parse::<RateLimit>().unwrap().per,
            Duration::from_secs(60)
        );
        assert_eq!("1000/h".parse::<RateLimit>().unwrap().to_string(), "1000/h");
        for bad in ["0/s", "ten/s", "10", "10/day", ""] {
            assert!(bad.parse::<RateLimit>().is_err(), "{bad}");
        }
    }

    #[test]
    fn parses_urls_with_our_parameters() {
        let mut settings =
            SmtpSettings::new("smtp://us%40er:p%3Ass@mail.example.com?tls=required&pool=4&rate=5/s");
        let parsed = parse_url(&settings).unwrap();
        assert_eq!(parsed.endpoint.host, "mail.example.com");
        assert_eq!(parsed.endpoint.port, 587);
        assert_eq!(parsed.endpoint.security, Security::Required);
        assert_eq!(
            parsed.endpoint.credentials,
            Some(("us@er".to_string(), "p:ss".to_string()))
        );
        assert_eq!(parsed.pool, Some(4));
        assert_eq!(parsed.rate.unwrap().messages, 5);

        settings.url = "smtps://mail.example.com".into();
        let parsed = parse_url(&settings).unwrap();
        assert_eq!(
            (parsed.endpoint.port, parsed.endpoint.security),
            (465, Security::Implicit)
        );

        for bad in [
            "http://mail.example.com",
            "smtp://mail.example.com?tls=maybe",
            "smtp://mail.example.com?pool=0",
            "smtp://mail.example.com?colour=blue",
            "smtp://user@mail.example.com",
        ] {
            settings.url = bad.into();
            let err = parse_url(&settings)
                .err()
                .unwrap_or_else(|| panic!("{bad} parsed"));
            assert!(matches!(err, MailError::Config(_)), "{bad}: {err}");
        }
    }

    #[test]
    fn settings_never_print_secrets() {
        let mut settings = SmtpSettings::new("smtps://me:hunter2@mail.example.com:465");
        settings.password = Some("swordfish".into());
        let printed = format!("{settings:?}");
        assert!(
            !printed.contains("hunter2") && !printed.contains("swordfish"),
            "{printed}"
        );
        assert!(
            printed.contains("smtps://<redacted>@mail.example.com:465"),
            "{printed}"
        );
        assert_eq!(redact_url("smtp://localhost:25"), "smtp://localhost:25");
    }
}
