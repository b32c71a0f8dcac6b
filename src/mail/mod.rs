//! Building and delivering messages: the only module that knows lettre.
//!
//! Two transports: SMTP (lettre's pooled async transport, `smtp://` or `smtps://`) and an
//! outbox directory that receives one `.eml` file per message, used when no SMTP server
//! is configured. Outbox files are named after the Message-ID, so a message sent again
//! after a crash overwrites its first copy instead of adding a second.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use lettre::message::header::{ContentType, HeaderName, HeaderValue};
use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::PoolConfig;
use lettre::transport::smtp::authentication::Credentials;
use lettre::{Address, AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

/// Headers the host sets itself; a template may not set or override them.
const RESERVED_HEADERS: &[&str] = &[
    "from",
    "sender",
    "to",
    "cc",
    "bcc",
    "message-id",
    "date",
    "subject",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "return-path",
    "list-unsubscribe",
    "list-unsubscribe-post",
];

#[derive(Debug, thiserror::Error)]
pub enum MailError {
    #[error("invalid email address {0:?}")]
    InvalidAddress(String),
    #[error("invalid header: {0}")]
    InvalidHeader(String),
    #[error("cannot build message: {0}")]
    Build(String),
    /// The server refused the message for good (SMTP 5xx).
    #[error("rejected: {0}")]
    Permanent(String),
    /// Worth trying again later (SMTP 4xx, network trouble, timeouts).
    #[error("temporary failure: {0}")]
    Transient(String),
    #[error("outbox: {0}")]
    Outbox(String),
    #[error("SMTP configuration: {0}")]
    Config(String),
}

/// Checks an address (`user@example.com`) and returns it trimmed.
pub fn parse_address(s: &str) -> Result<String, MailError> {
    let trimmed = s.trim();
    Address::from_str(trimmed).map_err(|_| MailError::InvalidAddress(s.to_string()))?;
    Ok(trimmed.to_string())
}

/// Checks a mailbox as used in From (`Name <user@example.com>` or `user@example.com`).
pub fn parse_mailbox(s: &str) -> Result<String, MailError> {
    let trimmed = s.trim();
    Mailbox::from_str(trimmed).map_err(|_| MailError::InvalidAddress(s.to_string()))?;
    Ok(trimmed.to_string())
}

/// The domain part of a mailbox, for Message-IDs.
pub fn mailbox_domain(s: &str) -> String {
    Mailbox::from_str(s.trim())
        .map(|m| m.email.domain().to_string())
        .unwrap_or_else(|_| "letterbox.invalid".to_string())
}

/// One message for one recipient, fully rendered.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub from: String,
    pub to: String,
    pub to_name: Option<String>,
    pub subject: String,
    pub text: String,
    pub html: Option<String>,
    /// Extra headers from the template; validated when the message is built.
    pub headers: Vec<(String, String)>,
    /// Without angle brackets: `local@domain`.
    pub message_id: String,
    pub unsubscribe_url: Option<String>,
}

#[derive(Clone)]
pub struct SmtpSettings {
    /// lettre's URL syntax: `smtp://host:port` (plain), `smtp://host:587?tls=required`
    /// (STARTTLS), `smtps://host:465` (TLS), each with optional `user:password@`.
    pub url: String,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Connections kept open to the server.
    pub pool_size: u32,
    pub timeout: Duration,
}

/// Never prints the password, nor credentials embedded in the URL.
impl std::fmt::Debug for SmtpSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpSettings")
            .field("url", &redact_url(&self.url))
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("pool_size", &self.pool_size)
            .field("timeout", &self.timeout)
            .finish()
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

#[derive(Clone)]
pub enum Mailer {
    Outbox(PathBuf),
    Smtp {
        transport: AsyncSmtpTransport<Tokio1Executor>,
        /// The server's URL without credentials, for logs.
        label: String,
    },
}

impl Mailer {
    pub fn outbox(dir: PathBuf) -> Result<Mailer, MailError> {
        std::fs::create_dir_all(&dir).map_err(|e| MailError::Outbox(format!("{}: {e}", dir.display())))?;
        Ok(Mailer::Outbox(dir))
    }

    pub fn smtp(settings: &SmtpSettings) -> Result<Mailer, MailError> {
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::from_url(&settings.url)
            .map_err(|e| MailError::Config(format!("bad SMTP URL: {e}")))?
            .timeout(Some(settings.timeout))
            .pool_config(PoolConfig::new().max_size(settings.pool_size));
        if let (Some(user), Some(password)) = (&settings.username, &settings.password) {
            builder = builder.credentials(Credentials::new(user.clone(), password.clone()));
        }
        Ok(Mailer::Smtp {
            transport: builder.build(),
            label: redact_url(&settings.url),
        })
    }

    /// Describes the transport without secrets, for logs.
    pub fn describe(&self) -> String {
        match self {
            Mailer::Outbox(dir) => format!("outbox directory {}", dir.display()),
            Mailer::Smtp { label, .. } => format!("SMTP {label}"),
        }
    }

    /// Builds and delivers one message. Returns the server's reply (or the outbox path).
    pub async fn send(&self, outgoing: &Outgoing) -> Result<String, MailError> {
        let message = build(outgoing)?;
        match self {
            Mailer::Outbox(dir) => {
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
                let io = |e: std::io::Error| MailError::Outbox(format!("{}: {e}", path.display()));
                tokio::fs::write(&tmp, message.formatted()).await.map_err(io)?;
                tokio::fs::rename(&tmp, &path).await.map_err(io)?;
                Ok(format!("written to {}", path.display()))
            }
            Mailer::Smtp { transport, .. } => match transport.send(message).await {
                Ok(response) => Ok(format!(
                    "{} {}",
                    response.code(),
                    response.message().collect::<Vec<_>>().join(" ")
                )),
                Err(e) if e.is_permanent() => Err(MailError::Permanent(smtp_error(&e))),
                Err(e) => Err(MailError::Transient(smtp_error(&e))),
            },
        }
    }
}

/// The message exactly as it would be sent (RFC 5322 text), e.g. for a preview.
pub fn format(outgoing: &Outgoing) -> Result<String, MailError> {
    Ok(String::from_utf8_lossy(&build(outgoing)?.formatted()).into_owned())
}

fn smtp_error(e: &lettre::transport::smtp::Error) -> String {
    use std::error::Error;
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

fn build(o: &Outgoing) -> Result<Message, MailError> {
    let from = Mailbox::from_str(&o.from).map_err(|_| MailError::InvalidAddress(o.from.clone()))?;
    let to_address = Address::from_str(&o.to).map_err(|_| MailError::InvalidAddress(o.to.clone()))?;
    let to = Mailbox::new(o.to_name.clone().filter(|n| !n.is_empty()), to_address);
    let builder = Message::builder()
        .from(from)
        .to(to)
        .subject(&o.subject)
        .message_id(Some(format!("<{}>", o.message_id)))
        .date_now();
    let build_err = |e: lettre::error::Error| MailError::Build(e.to_string());
    let mut message = match &o.html {
        Some(html) => builder
            .multipart(MultiPart::alternative_plain_html(o.text.clone(), html.clone()))
            .map_err(build_err)?,
        None => builder
            .header(ContentType::TEXT_PLAIN)
            .body(o.text.clone())
            .map_err(build_err)?,
    };
    let headers = message.headers_mut();
    if let Some(url) = &o.unsubscribe_url {
        headers.insert_raw(raw_header("List-Unsubscribe", format!("<{url}>"))?);
        headers.insert_raw(raw_header(
            "List-Unsubscribe-Post",
            "List-Unsubscribe=One-Click".into(),
        )?);
    }
    for (name, value) in &o.headers {
        if RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
            return Err(MailError::InvalidHeader(format!(
                "{name} is set by letterbox, not by a template"
            )));
        }
        headers.insert_raw(raw_header(name, value.clone())?);
    }
    Ok(message)
}

fn raw_header(name: &str, value: String) -> Result<HeaderValue, MailError> {
    if value.contains(['\r', '\n']) {
        return Err(MailError::InvalidHeader(format!("{name} contains a line break")));
    }
    let header_name = HeaderName::new_from_ascii(name.to_string())
        .map_err(|_| MailError::InvalidHeader(format!("{name:?} is not a valid header name")))?;
    Ok(HeaderValue::new(header_name, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outgoing() -> Outgoing {
        Outgoing {
            from: "News <news@example.com>".into(),
            to: "ann@example.org".into(),
            to_name: Some("Ann".into()),
            subject: "Hello".into(),
            text: "plain".into(),
            html: Some("<p>rich</p>".into()),
            headers: vec![("X-Campaign".into(), "spring".into())],
            message_id: "letterbox.1.2@example.com".into(),
            unsubscribe_url: Some("http://localhost/u/abc".into()),
        }
    }

    #[test]
    fn builds_multipart_with_host_headers() {
        let text = String::from_utf8(build(&outgoing()).unwrap().formatted()).unwrap();
        assert!(text.contains("Message-ID: <letterbox.1.2@example.com>"), "{text}");
        assert!(text.contains("multipart/alternative"), "{text}");
        assert!(
            text.contains("List-Unsubscribe: <http://localhost/u/abc>"),
            "{text}"
        );
        assert!(
            text.contains("List-Unsubscribe-Post: List-Unsubscribe=One-Click"),
            "{text}"
        );
        assert!(text.contains("X-Campaign: spring"), "{text}");
    }

    #[test]
    fn refuses_header_injection_and_reserved_headers() {
        let mut o = outgoing();
        o.headers = vec![("X-Evil".into(), "a\r\nBcc: victim@example.com".into())];
        assert!(matches!(build(&o), Err(MailError::InvalidHeader(_))));
        o.headers = vec![("Message-ID".into(), "<forged@example.com>".into())];
        assert!(matches!(build(&o), Err(MailError::InvalidHeader(_))));
        o.headers = vec![("Bad Name".into(), "x".into())];
        assert!(matches!(build(&o), Err(MailError::InvalidHeader(_))));
    }

    #[test]
    fn settings_never_print_secrets() {
        let settings = SmtpSettings {
            url: "smtps://me:hunter2@mail.example.com:465".into(),
            username: Some("me".into()),
            password: Some("swordfish".into()),
            pool_size: 1,
            timeout: Duration::from_secs(1),
        };
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

    #[test]
    fn validates_addresses() {
        assert!(parse_address("ann@example.org").is_ok());
        assert!(parse_address("not an address").is_err());
        assert!(parse_mailbox("News <news@example.com>").is_ok());
        assert_eq!(mailbox_domain("News <news@Example.com>"), "Example.com");
    }
}
