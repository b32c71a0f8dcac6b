//! Building and delivering messages: the only module that knows lettre.
//!
//! A transport is either SMTP (`smtp://` or `smtps://`, through our own connection pool,
//! `smtp.rs`) or an outbox directory that receives one `.eml` file per message, used when
//! no SMTP server is configured. Outbox files are named after the Message-ID, so a
//! message sent again after a crash overwrites its first copy instead of adding a second.
//! Transports have names, so a job can choose one, and an optional rate limit
//! (`transport.rs`). Every failure is classified as permanent or transient, which is what
//! the runner's retries go by.

mod smtp;
mod transport;

use std::str::FromStr;

use lettre::address::Envelope;
use lettre::message::header::{ContentType, HeaderName, HeaderValue};
use lettre::message::{Mailbox, MultiPart};
use lettre::{Address, Message};

pub use transport::{
    DEFAULT_TRANSPORT, RateLimit, SmtpSettings, Transport, Transports, check_smtp_settings, redact_url,
};

use lettre::message::dkim::{
    DkimCanonicalization, DkimCanonicalizationType, DkimConfig, DkimSigningAlgorithm, DkimSigningKey,
};

/// DKIM signing: the key (an RSA key in PKCS#1 PEM, `-----BEGIN RSA PRIVATE KEY-----`, or
/// an Ed25519 key as the base64 of its 32-byte seed), the selector its public key is
/// published under (`SELECTOR._domainkey.DOMAIN`) and the signing domain.
#[derive(Clone)]
pub struct DkimSettings {
    pub private_key: String,
    pub selector: String,
    pub domain: String,
}

/// Never prints the key.
impl std::fmt::Debug for DkimSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DkimSettings")
            .field("private_key", &"<redacted>")
            .field("selector", &self.selector)
            .field("domain", &self.domain)
            .finish()
    }
}

/// A ready DKIM signer.
pub struct Dkim(DkimConfig);

impl Dkim {
    pub fn new(settings: &DkimSettings) -> Result<Dkim, MailError> {
        let pem = settings.private_key.trim();
        let algorithm = if pem.starts_with("-----BEGIN RSA PRIVATE KEY-----") {
            DkimSigningAlgorithm::Rsa
        } else if pem.starts_with("-----BEGIN") {
            return Err(MailError::Config(
                "the DKIM key must be an RSA key in PKCS#1 PEM (BEGIN RSA PRIVATE KEY) or an Ed25519 seed in base64"
                    .into(),
            ));
        } else {
            DkimSigningAlgorithm::Ed25519
        };
        let key =
            DkimSigningKey::new(pem, algorithm).map_err(|e| MailError::Config(format!("DKIM key: {e}")))?;
        if settings.selector.is_empty() || settings.domain.is_empty() {
            return Err(MailError::Config("DKIM needs a selector and a domain".into()));
        }
        // RFC 8058 §4: the signature must cover List-Unsubscribe and
        // List-Unsubscribe-Post for one-click unsubscribe to be honoured.
        let headers = [
            "From",
            "To",
            "Subject",
            "Date",
            "Message-ID",
            "List-Unsubscribe",
            "List-Unsubscribe-Post",
        ]
        .into_iter()
        .map(HeaderName::new_from_ascii_str)
        .collect();
        Ok(Dkim(DkimConfig::new(
            settings.selector.clone(),
            settings.domain.clone(),
            key,
            headers,
            DkimCanonicalization {
                header: DkimCanonicalizationType::Relaxed,
                body: DkimCanonicalizationType::Relaxed,
            },
        )))
    }

    fn sign(&self, message: &mut Message) {
        message.sign(&self.0);
    }
}

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
    #[error("{0}")]
    UnknownTransport(String),
}

impl MailError {
    /// Whether trying again later may succeed (SMTP 4xx, network trouble, timeouts).
    pub fn is_transient(&self) -> bool {
        matches!(self, MailError::Transient(_))
    }
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

/// The message exactly as it would be sent (RFC 5322 text), e.g. for a preview.
pub fn format(outgoing: &Outgoing) -> Result<String, MailError> {
    Ok(String::from_utf8_lossy(&build(outgoing)?.formatted()).into_owned())
}

/// Parses a From mailbox, remembering the last one per thread: a job sends thousands of
/// messages from the same address, and parsing it was ~3% of the send path's CPU.
fn from_mailbox(from: &str) -> Result<Mailbox, MailError> {
    thread_local! {
        static LAST: std::cell::RefCell<Option<(String, Mailbox)>> = const { std::cell::RefCell::new(None) };
    }
    LAST.with(|last| {
        if let Some((text, mailbox)) = &*last.borrow()
            && text == from
        {
            return Ok(mailbox.clone());
        }
        let mailbox = Mailbox::from_str(from).map_err(|_| MailError::InvalidAddress(from.to_string()))?;
        *last.borrow_mut() = Some((from.to_string(), mailbox.clone()));
        Ok(mailbox)
    })
}

fn build(o: &Outgoing) -> Result<Message, MailError> {
    let from = from_mailbox(&o.from)?;
    let to_address = Address::from_str(&o.to).map_err(|_| MailError::InvalidAddress(o.to.clone()))?;
    // Given, the envelope is not derived by parsing the From and To headers back.
    let envelope = Envelope::new(Some(from.email.clone()), vec![to_address.clone()])
        .map_err(|e| MailError::Build(e.to_string()))?;
    let to = Mailbox::new(o.to_name.clone().filter(|n| !n.is_empty()), to_address);
    let builder = Message::builder()
        .envelope(envelope)
        .from(from)
        .to(to)
        .subject(&o.subject)
        .message_id(Some(format!("<{}>", o.message_id)))
        .date_now();
    let build_err = |e: lettre::error::Error| MailError::Build(e.to_string());
    let mut message = match &o.html {
        Some(html) => builder
            .multipart(MultiPart::alternative_plain_html(crlf(&o.text), crlf(html)))
            .map_err(build_err)?,
        None => builder
            .header(ContentType::TEXT_PLAIN)
            .body(crlf(&o.text))
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

/// `text` with CRLF line ends, in one pass. lettre would also convert it, but by
/// inserting each `\r` in place, which moves the rest of the text once per line: a
/// fifth of the send path's CPU for a typical letter.
fn crlf(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + text.len() / 32 + 2);
    let mut from = 0;
    for (i, _) in text.match_indices('\n') {
        if i == 0 || text.as_bytes()[i - 1] != b'\r' {
            out.push_str(&text[from..i]);
            out.push('\r');
            from = i;
        }
    }
    out.push_str(&text[from..]);
    out
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
    fn dkim_signs_the_unsubscribe_headers() {
        // An Ed25519 seed (any 32 bytes), base64.
        let settings = DkimSettings {
            private_key: "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=".into(),
            selector: "lb1".into(),
            domain: "example.com".into(),
        };
        let dkim = Dkim::new(&settings).unwrap();
        let mut message = build(&outgoing()).unwrap();
        dkim.sign(&mut message);
        let text = String::from_utf8(message.formatted()).unwrap();
        let signature = text
            .split("\r\n")
            .skip_while(|l| !l.starts_with("DKIM-Signature:"))
            .take_while(|l| l.starts_with("DKIM-Signature:") || l.starts_with([' ', '\t']))
            .collect::<String>();
        assert!(signature.contains("d=example.com"), "{signature}");
        assert!(signature.contains("s=lb1"), "{signature}");
        assert!(signature.contains("a=ed25519-sha256"), "{signature}");
        assert!(signature.contains("list-unsubscribe-post"), "{signature}");
        assert!(
            !format!("{settings:?}").contains("AAEC"),
            "the key is not printed"
        );
        let bad = DkimSettings {
            private_key: "-----BEGIN PRIVATE KEY-----".into(),
            ..settings
        };
        assert!(matches!(Dkim::new(&bad), Err(MailError::Config(_))));
    }

    #[test]
    fn line_ends_become_crlf_once() {
        assert_eq!(crlf("a\nb\r\nc\n"), "a\r\nb\r\nc\r\n");
        assert_eq!(crlf("\n\nx"), "\r\n\r\nx");
        assert_eq!(crlf("no break"), "no break");
        assert_eq!(crlf("é\n"), "é\r\n");
    }

    #[test]
    fn validates_addresses() {
        assert!(parse_address("ann@example.org").is_ok());
        assert!(parse_address("not an address").is_err());
        assert!(parse_mailbox("News <news@example.com>").is_ok());
        assert_eq!(mailbox_domain("News <news@Example.com>"), "Example.com");
    }
}
