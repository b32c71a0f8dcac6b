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
mod tls;
mod transport;

use std::borrow::Cow;
use std::str::FromStr;

use lettre::address::Envelope;
use lettre::message::header::{
    ContentTransferEncoding, ContentType, HeaderName, HeaderValue, MIME_VERSION_1_0,
};
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
    /// The caller's `go` check said no just before the message would have gone out
    /// (a fleet node whose lease lapsed): nothing was sent.
    #[error("withheld: this node no longer holds the recipient")]
    Withheld,
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
/// A name with a line break or another control character is refused: it would be every
/// message's From line, and lettre cannot write one.
pub fn parse_mailbox(s: &str) -> Result<String, MailError> {
    let trimmed = s.trim();
    if trimmed.contains(|c: char| c.is_control()) {
        return Err(MailError::InvalidAddress(s.to_string()));
    }
    let mailbox = Mailbox::from_str(trimmed).map_err(|_| MailError::InvalidAddress(s.to_string()))?;
    if mailbox
        .name
        .as_ref()
        .is_some_and(|n| n.chars().count() > MAX_NAME_CHARS)
    {
        return Err(MailError::InvalidAddress(format!(
            "the name is longer than {MAX_NAME_CHARS} characters"
        )));
    }
    Ok(trimmed.to_string())
}

/// The longest display name kept. A header line holds at most 998 characters and a name
/// cannot always be folded (one long word), so longer ones are refused where they are
/// written and cut where they are sent.
pub const MAX_NAME_CHARS: usize = 256;

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
    /// The envelope sender (a VERP return path) when it is not the From address.
    pub return_path: Option<String>,
}

/// The message exactly as it would be sent (RFC 5322 text), e.g. for a preview.
pub fn format(outgoing: &Outgoing) -> Result<String, MailError> {
    Ok(String::from_utf8_lossy(&formatted(&build(outgoing)?)).into_owned())
}

/// The message's bytes, ending in CRLF as on the wire before SMTP's final dot, so the
/// outbox and previews hold what is sent. `build` already has lettre end every body in
/// CRLF (before DKIM signs it: see `seven_bit`); this is the last guard.
fn formatted(message: &Message) -> Vec<u8> {
    let mut bytes = message.formatted();
    if !bytes.ends_with(b"\r\n") {
        bytes.extend_from_slice(b"\r\n");
    }
    bytes
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
    let sender = match &o.return_path {
        Some(path) => Address::from_str(path).map_err(|_| MailError::InvalidAddress(path.clone()))?,
        None => from.email.clone(),
    };
    let envelope =
        Envelope::new(Some(sender), vec![to_address.clone()]).map_err(|e| MailError::Build(e.to_string()))?;
    // Names are folded when they are stored, but rows stored before that (or given to a
    // preview) may still hold a line break, which lettre cannot write and panics on.
    let to_name = o
        .to_name
        .as_deref()
        .map(|name| {
            let folded = fold_header_text(name);
            match folded.char_indices().nth(MAX_NAME_CHARS) {
                Some((cut, _)) => folded[..cut].trim_end().to_string(),
                None => folded.into_owned(),
            }
        })
        .filter(|n| !n.is_empty());
    // A letter's subject cannot hold a line break, but what a template makes of it (an
    // attribute with a newline, a policy's output) can: unfold it, as a reader of a
    // folded header line would (RFC 5322 2.2.3).
    let subject = header_value("Subject", fold_header_text(&o.subject).into_owned());
    let to = Mailbox::new(to_name, to_address);
    let builder = Message::builder()
        .envelope(envelope)
        .from(from)
        .to(to)
        .message_id(Some(format!("<{}>", o.message_id)))
        .date_now();
    let build_err = |e: lettre::error::Error| MailError::Build(e.to_string());
    let mut message = match &o.html {
        Some(html) => builder
            .multipart(MultiPart::alternative_plain_html(crlf(&o.text), crlf(html)))
            .map_err(build_err)?,
        // lettre adds MIME-Version only to multipart bodies; RFC 2045 4 wants it on
        // every message that uses MIME headers, and Content-Type is one.
        None => {
            let text = crlf(&o.text);
            let builder = builder.header(MIME_VERSION_1_0).header(ContentType::TEXT_PLAIN);
            // lettre would pick base64 for some text, and writes a base64 body without
            // a final CRLF, which DKIM then signs without the CRLF the wire carries.
            // Quoted-printable keeps it (and stays readable).
            let builder = if seven_bit(&text) {
                builder
            } else {
                builder.header(ContentTransferEncoding::QuotedPrintable)
            };
            builder.body(text).map_err(build_err)?
        }
    };
    let headers = message.headers_mut();
    headers.insert_raw(subject);
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

/// Text for a one-line header (a display name, a subject): every control character
/// (CR, LF, TAB, NUL, DEL, C1) and the Unicode line and paragraph separators become a
/// space, with the spaces around them, and the ends are trimmed of whitespace.
/// `Borrowed` when nothing changes, which is nearly always.
pub fn fold_header_text(text: &str) -> Cow<'_, str> {
    let folds = |c: char| c.is_control() || c == '\u{2028}' || c == '\u{2029}';
    if !text.contains(folds) {
        return Cow::Borrowed(text.trim());
    }
    let mut out = String::with_capacity(text.len());
    let mut after_fold = false;
    for c in text.chars() {
        if folds(c) {
            let trimmed = out.trim_end_matches(' ').len();
            out.truncate(trimmed);
            out.push(' ');
            after_fold = true;
        } else if c == ' ' && after_fold {
            continue;
        } else {
            out.push(c);
            after_fold = false;
        }
    }
    Cow::Owned(out.trim().to_string())
}

/// `text` with CRLF line ends and ending in one, in one pass. lettre would also
/// convert it, but by inserting each `\r` in place, which moves the rest of the text once
/// per line: a fifth of the send path's CPU for a typical letter. A body that ends in a
/// line break is what every MIME part and the SMTP DATA terminator expect (RFC 5322
/// 2.3: the body is lines, each ended by CRLF).
fn crlf(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + text.len() / 32 + 2);
    if text.contains('\r') {
        // CRLF already, or a bare CR (old Mac line ends), which SMTP forbids (RFC 5321
        // 2.3.8): every CR, LF and CRLF becomes one CRLF, a character at a time.
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\r' => {
                    chars.next_if_eq(&'\n');
                    out.push_str("\r\n");
                }
                '\n' => out.push_str("\r\n"),
                c => out.push(c),
            }
        }
    } else {
        let mut from = 0;
        for (i, _) in text.match_indices('\n') {
            out.push_str(&text[from..i]);
            out.push('\r');
            from = i;
        }
        out.push_str(&text[from..]);
    }
    if !out.ends_with("\r\n") {
        out.push_str("\r\n");
    }
    out
}

/// Whether CRLF text can go as it is (`7bit`, RFC 2045 2.7): ASCII without control
/// characters but tab, CR and LF, in lines of at most 998 characters.
fn seven_bit(text: &str) -> bool {
    let mut line = 0usize;
    for b in text.bytes() {
        match b {
            b'\n' => line = 0,
            b'\r' | b'\t' | 0x20..=0x7e => {
                line += 1;
                if line > 999 {
                    return false;
                }
            }
            _ => return false,
        }
    }
    true
}

/// A header a template or the host adds. The name must be RFC 5322 `ftext` (printable
/// ASCII but the colon), and the value may not hold control characters: both would let
/// a value end the header and start another. lettre encodes the rest (RFC 2047 for
/// non-ASCII words) and folds long lines.
fn raw_header(name: &str, value: String) -> Result<HeaderValue, MailError> {
    if name.is_empty() || name.len() > 76 || !name.bytes().all(|b| (33..=126).contains(&b) && b != b':') {
        return Err(MailError::InvalidHeader(format!(
            "{name:?} is not a valid header name"
        )));
    }
    if value.contains(['\r', '\n']) {
        return Err(MailError::InvalidHeader(format!("{name} contains a line break")));
    }
    if value.contains(|c: char| c.is_control() && c != '\t') {
        return Err(MailError::InvalidHeader(format!(
            "{name} contains a control character"
        )));
    }
    let header_name = HeaderName::new_from_ascii(name.to_string())
        .map_err(|_| MailError::InvalidHeader(format!("{name:?} is not a valid header name")))?;
    Ok(header_value_named(header_name, value))
}

/// A header with text that may need encoding. lettre encodes the words that hold
/// anything but printable ASCII as RFC 2047 encoded-words and writes the others as they
/// are, which goes wrong three ways: the spaces between two encoded words are lost (a
/// reader must ignore them, RFC 2047 6.2), a word that looks like an encoded-word
/// (`=?utf-8?q?…?=`) is decoded by readers into something else, and a word too long for
/// a header line (998 characters, RFC 5322 2.1.1) cannot be folded. Such values are
/// encoded whole as encoded-words, which keep every space and can be split; lettre
/// writes only plain ASCII text.
fn header_value(name: &'static str, value: String) -> HeaderValue {
    header_value_named(HeaderName::new_from_ascii_str(name), value)
}

fn header_value_named(name: HeaderName, value: String) -> HeaderValue {
    // The longest word lettre's folding may have to put on a line of its own; well
    // under 998 so that a word after the name on the first line fits as well.
    const LONGEST_WORD: usize = 900;
    let needs_encoding =
        !value.is_ascii() || value.contains("=?") || value.split(' ').any(|word| word.len() > LONGEST_WORD);
    if !needs_encoding {
        return HeaderValue::new(name, value);
    }
    let mut encoded = String::with_capacity(value.len() * 4 / 3 + 64);
    {
        let mut writer = email_encoding::headers::writer::EmailWriter::new(
            &mut encoded,
            name.len() + ": ".len(),
            0,
            false,
        );
        // Writing into a String cannot fail.
        let _ = email_encoding::headers::rfc2047::encode(&value, &mut writer);
    }
    HeaderValue::dangerous_new_pre_encoded(name, value, encoded)
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
            return_path: None,
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
        assert_eq!(crlf("\n\nx"), "\r\n\r\nx\r\n");
        assert_eq!(crlf("no break"), "no break\r\n");
        assert_eq!(crlf("é\n"), "é\r\n");
        assert_eq!(crlf("cr\r"), "cr\r\n");
        assert_eq!(crlf("a\rb\r\n\rc"), "a\r\nb\r\n\r\nc\r\n");
        assert_eq!(crlf(""), "\r\n");
    }

    #[test]
    fn text_only_messages_are_mime_and_end_in_crlf() {
        let mut o = outgoing();
        o.html = None;
        o.text = "no final line break".into();
        let text = String::from_utf8(formatted(&build(&o).unwrap())).unwrap();
        assert!(text.contains("MIME-Version: 1.0\r\n"), "{text}");
        assert!(
            text.contains("Content-Type: text/plain; charset=utf-8\r\n"),
            "{text}"
        );
        assert!(text.ends_with("no final line break\r\n"), "{text:?}");
    }

    #[test]
    fn a_line_break_in_a_name_or_subject_is_folded_not_a_panic() {
        let mut o = outgoing();
        o.to_name = Some("Eve\r\nBcc: x@example.org".into());
        o.subject = "Hi\r\nBcc: y@example.org".into();
        let text = String::from_utf8(formatted(&build(&o).unwrap())).unwrap();
        let parsed = mail_parser::MessageParser::default()
            .parse(text.as_bytes())
            .unwrap();
        let to = parsed.to().and_then(|a| a.first()).unwrap();
        assert_eq!(to.name(), Some("Eve Bcc: x@example.org"));
        assert_eq!(to.address(), Some("ann@example.org"));
        assert_eq!(parsed.subject(), Some("Hi Bcc: y@example.org"));
        assert!(parsed.bcc().is_none(), "{text}");
    }

    #[test]
    fn lettre_ends_every_text_body_in_crlf() {
        // Signed before `formatted` adds a missing final CRLF, so the DKIM body hash
        // must already see it: lettre's own formatting has to end in one.
        let mut o = outgoing();
        o.html = None;
        for html in [None, Some("<p>᨞</p>".to_string())] {
            o.html = html;
            for text in ["plain", "᨞", "ünïcödé\nlines", &"x".repeat(2000), "\u{0}nul"] {
                o.text = text.to_string();
                let raw = build(&o).unwrap().formatted();
                let end = String::from_utf8_lossy(&raw[raw.len().saturating_sub(40)..]).into_owned();
                assert!(raw.ends_with(b"\r\n"), "{text:?}, html {:?}: {end:?}", o.html);
            }
        }
    }

    #[test]
    fn header_names_must_be_printable_ascii() {
        let mut o = outgoing();
        for name in ["X-A\r\nBcc", "X-\u{1}", "X-é", "", "X Y", "X:Y"] {
            o.headers = vec![(name.into(), "v".into())];
            assert!(matches!(build(&o), Err(MailError::InvalidHeader(_))), "{name:?}");
        }
        o.headers = vec![("X-Tab".into(), "a\u{0}b".into())];
        assert!(matches!(build(&o), Err(MailError::InvalidHeader(_))));
    }

    #[test]
    fn validates_addresses() {
        assert!(parse_address("ann@example.org").is_ok());
        assert!(parse_address("not an address").is_err());
        assert!(parse_mailbox("News <news@example.com>").is_ok());
        assert!(parse_mailbox("\"News\r\nBcc: x@example.org\" <news@example.com>").is_err());
        assert_eq!(mailbox_domain("News <news@Example.com>"), "Example.com");
    }
}

/// Messages built from arbitrary names, subjects, bodies and template headers: building
/// never panics, nothing is injected, and an independent parser (`mail-parser`) reads
/// back the same recipient, name, subject and body from a well-formed message.
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    /// Header names a message may carry: the host's and the test's own.
    const EXPECTED: &[&str] = &[
        "from",
        "to",
        "subject",
        "message-id",
        "date",
        "mime-version",
        "content-type",
        "content-transfer-encoding",
        "list-unsubscribe",
        "list-unsubscribe-post",
        "x-campaign",
    ];

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            // What injection and encoding edge cases look like.
            "[ -~\\t\\r\\n\\u{0}\\u{7f}\\u{85}\\u{2028}éü€😀\\\\\\\"=?<>@,;:]{0,120}",
            Just("Eve\r\nBcc: victim@example.org".to_string()),
            Just("=?utf-8?q?looks_encoded?=".to_string()),
            Just("x".repeat(2_000)),
        ]
    }

    fn address() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("ann@example.org".to_string()),
            Just("o'brien+tag@sub.example.co.uk".to_string()),
            Just("\"ann lee\"@example.org".to_string()),
        ]
    }

    /// The name as it should read back: folded and cut.
    fn folded_name(name: &Option<String>) -> Option<String> {
        name.as_deref()
            .map(|n| {
                fold_header_text(n)
                    .chars()
                    .take(MAX_NAME_CHARS)
                    .collect::<String>()
                    .trim_end()
                    .to_string()
            })
            .filter(|n| !n.is_empty())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

        #[test]
        fn built_messages_read_back_the_same(
            to in address(),
            name in proptest::option::of(text()),
            subject in text(),
            body in text(),
            html in proptest::option::of(text()),
            header_value in text(),
        ) {
            let o = Outgoing {
                from: "News <news@example.com>".into(),
                to: parse_address(&to).unwrap(),
                to_name: name.clone(),
                subject: subject.clone(),
                text: body.clone(),
                html,
                headers: vec![("X-Campaign".into(), header_value.clone())],
                message_id: "letterbox.1.2.0123456789abcdef@example.com".into(),
                unsubscribe_url: Some("http://localhost/u/abc".into()),
                return_path: None,
            };
            let message = match build(&o) {
                Ok(message) => message,
                Err(MailError::InvalidHeader(why)) => {
                    // Refused only for a reason: a control character in the template's
                    // header.
                    prop_assert!(header_value.contains(|c: char| c.is_control() && c != '\t'), "{}", why);
                    return Ok(());
                }
                Err(e) => return Err(TestCaseError::fail(format!("{e}"))),
            };
            let raw = formatted(&message);
            // Lines: CRLF only, at most 998 characters, and a final CRLF.
            prop_assert!(raw.ends_with(b"\r\n"));
            for (i, &b) in raw.iter().enumerate() {
                if b == b'\n' {
                    prop_assert!(i > 0 && raw[i - 1] == b'\r', "bare LF at {}", i);
                }
                if b == b'\r' {
                    prop_assert!(raw.get(i + 1) == Some(&b'\n'), "bare CR at {}", i);
                }
            }
            for line in raw.split(|&b| b == b'\n') {
                prop_assert!(line.len() <= 1000, "a line of {} bytes", line.len());
            }
            prop_assert!(raw.is_ascii(), "an ASCII recipient gives an all-ASCII message");

            let parsed = mail_parser::MessageParser::default().parse(&raw[..]);
            prop_assert!(parsed.is_some());
            let parsed = parsed.unwrap();
            for header in parsed.headers() {
                let name = header.name().to_ascii_lowercase();
                prop_assert!(EXPECTED.contains(&name.as_str()), "unexpected header {}", name);
            }
            let recipients: Vec<_> = parsed.to().map(|a| a.iter().collect()).unwrap_or_default();
            prop_assert_eq!(recipients.len(), 1);
            let expected_address = o.to.replace('"', "");
            let got_address = recipients[0].address().map(|a| a.replace('"', ""));
            if o.to.starts_with('"') && folded_name(&name).is_none() {
                // mail-parser reads a bare quoted local part (`"ann lee"@example.org`,
                // valid RFC 5322 addr-spec) as a name and an empty local part; check
                // the header as written instead.
                let to_line = format!("\r\nTo: {}\r\n", o.to);
                prop_assert!(raw.windows(to_line.len()).any(|w| w == to_line.as_bytes()));
            } else {
                prop_assert_eq!(got_address, Some(expected_address));
                let want_name = folded_name(&name);
                prop_assert_eq!(recipients[0].name(), want_name.as_deref());
            }
            let folded_subject = fold_header_text(&subject);
            prop_assert_eq!(parsed.subject().unwrap_or(""), folded_subject.as_ref());
            let want_body = crlf(&body).replace("\r\n", "\n");
            let got_body = parsed.body_text(0).map(|b| b.replace("\r\n", "\n")).unwrap_or_default();
            prop_assert_eq!(got_body.trim_end_matches('\n'), want_body.trim_end_matches('\n'));
            // mail-parser leaves unknown headers RFC 2047-encoded: read the X-Campaign
            // value back as a Subject to decode it.
            let campaign = parsed.header_raw("X-Campaign").unwrap_or("");
            let as_subject = format!("Subject:{campaign}\r\n\r\n");
            let reparsed = mail_parser::MessageParser::default().parse(as_subject.as_bytes());
            let decoded = reparsed.as_ref().and_then(|m| m.subject()).unwrap_or("");
            prop_assert_eq!(decoded.trim(), header_value.trim());
        }
    }
}
