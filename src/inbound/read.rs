//! What an inbound message says, read with `mail-parser` (never by hand): a delivery
//! status notification (RFC 3464), a complaint (ARF, RFC 5965), an automatic reply
//! (RFC 3834 and the usual vacation markers), or nothing standard. Pure: the listener
//! attributes and records what this finds.

use mail_parser::{Message, MessageParser, MimeHeaders, PartType};

use crate::bounces::{BounceKind, Status};

/// One finding: a recipient's fate as the message tells it.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    pub kind: BounceKind,
    /// The address it is about, as the report names it (may be empty).
    pub email: String,
    pub status: Option<String>,
    pub diagnostic: Option<String>,
    /// What kind of message it was, in words, for the decision.
    pub what: String,
}

/// What the message is.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub findings: Vec<Finding>,
    /// The Message-ID of the message it answers (the original's, from the report's
    /// copy of it or its In-Reply-To/References), if it names one.
    pub original_message_id: Option<String>,
}

/// The fields of a `message/delivery-status` or `message/feedback-report` body: blocks
/// of header fields separated by blank lines, each read by mail-parser as headers.
fn field_blocks(body: &[u8]) -> Vec<Vec<(String, String)>> {
    let text = String::from_utf8_lossy(body).replace("\r\n", "\n");
    text.split("\n\n")
        .filter(|block| !block.trim().is_empty())
        .filter_map(|block| {
            let block = format!("{}\r\n\r\n", block.trim_matches('\n').replace('\n', "\r\n"));
            let parsed = MessageParser::new().parse_headers(block.as_bytes())?;
            let fields: Vec<(String, String)> = parsed
                .headers_raw()
                .map(|(name, value)| (name.to_ascii_lowercase(), value.trim().to_string()))
                .collect();
            Some(fields)
        })
        .collect()
}

fn field<'a>(block: &'a [(String, String)], name: &str) -> Option<&'a str> {
    block
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
        .filter(|v| !v.is_empty())
}

/// `rfc822; ann@example.com` → `ann@example.com`.
fn typed_address(value: &str) -> String {
    let address = value.split_once(';').map_or(value, |(_, a)| a);
    address.trim().trim_matches(|c| c == '<' || c == '>').to_string()
}

/// `smtp; 550 5.1.1 …` → `550 5.1.1 …` (unfolded to one line).
fn typed_text(value: &str) -> String {
    let text = value.split_once(';').map_or(value, |(_, t)| t);
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Every part of a message, nested messages' parts excluded.
fn parts_of<'a>(message: &'a Message<'a>) -> impl Iterator<Item = &'a mail_parser::MessagePart<'a>> {
    message.parts.iter()
}

fn content_type_of(part: &mail_parser::MessagePart<'_>) -> (String, String) {
    part.content_type()
        .map(|ct| {
            (
                ct.ctype().to_ascii_lowercase(),
                ct.subtype().unwrap_or_default().to_ascii_lowercase(),
            )
        })
        .unwrap_or_default()
}

/// The Message-ID of the original message a report carries (as `message/rfc822` or
/// `text/rfc822-headers`), if any.
fn original_message_id(message: &Message<'_>) -> Option<String> {
    for part in parts_of(message) {
        match (&part.body, content_type_of(part)) {
            (PartType::Message(original), _) => {
                if let Some(id) = original.message_id() {
                    return Some(id.to_string());
                }
            }
            (_, (ctype, subtype)) if ctype == "text" && subtype == "rfc822-headers" => {
                let headers = MessageParser::new().parse_headers(part.contents())?;
                if let Some(id) = headers.message_id() {
                    return Some(id.to_string());
                }
            }
            _ => {}
        }
    }
    None
}

/// Why a message is an automatic reply, if it is one (RFC 3834's `Auto-Submitted`, and
/// the headers and subjects vacation programs use).
fn auto_reply(message: &Message<'_>) -> Option<String> {
    let header = |name: &'static str| message.header_raw(name).map(str::trim);
    if let Some(value) = header("Auto-Submitted")
        && !value.eq_ignore_ascii_case("no")
    {
        return Some(format!("Auto-Submitted: {value}"));
    }
    for name in ["X-Autoreply", "X-Autorespond", "X-Auto-Response-Suppress"] {
        if header(name).is_some() {
            return Some(format!("{name} is set"));
        }
    }
    if let Some(precedence) = header("Precedence")
        && ["auto_reply", "bulk", "junk"].contains(&precedence.to_ascii_lowercase().as_str())
    {
        return Some(format!("Precedence: {precedence}"));
    }
    let subject = message.subject().unwrap_or_default().to_ascii_lowercase();
    let vacation = [
        "out of office",
        "out of the office",
        "automatic reply",
        "auto reply",
        "autoreply",
        "auto:",
        "vacation",
        "away from",
        "abwesenheit",
        "absence",
    ];
    vacation
        .iter()
        .find(|v| subject.contains(**v))
        .map(|v| format!("the subject says {v:?}"))
}

/// Reads an inbound message. Never panics: what cannot be read is a finding of kind
/// `Ignored` with the reason.
pub fn read(raw: &[u8]) -> Reading {
    let Some(message) = MessageParser::new().parse(raw) else {
        return Reading {
            findings: vec![ignored("not a readable message")],
            original_message_id: None,
        };
    };
    let (ctype, subtype) = message
        .content_type()
        .map(|ct| {
            (
                ct.ctype().to_ascii_lowercase(),
                ct.subtype().unwrap_or_default().to_ascii_lowercase(),
            )
        })
        .unwrap_or_default();
    let report_type = message
        .content_type()
        .and_then(|ct| ct.attribute("report-type"))
        .map(str::to_ascii_lowercase);
    let original =
        original_message_id(&message).or_else(|| message.in_reply_to().as_text().map(str::to_string));
    let is_report = ctype == "multipart" && subtype == "report";
    let findings = match report_type.as_deref() {
        Some("delivery-status") if is_report => dsn(&message),
        Some("feedback-report") if is_report => arf(&message),
        _ => match auto_reply(&message) {
            Some(why) => vec![ignored(&format!("an automatic reply ({why}): not a bounce"))],
            None => vec![nonstandard(&message)],
        },
    };
    Reading {
        findings,
        original_message_id: original,
    }
}

fn ignored(what: &str) -> Finding {
    Finding {
        kind: BounceKind::Ignored,
        email: String::new(),
        status: None,
        diagnostic: None,
        what: what.to_string(),
    }
}

/// A DSN: one finding per recipient whose action is `failed`. Delays, relays and
/// deliveries are not bounces: one `Ignored` finding says so.
fn dsn(message: &Message<'_>) -> Vec<Finding> {
    let status_part = parts_of(message).find(|p| {
        let (ctype, subtype) = content_type_of(p);
        ctype == "message" && (subtype == "delivery-status" || subtype == "global-delivery-status")
    });
    let Some(part) = status_part else {
        return vec![ignored("a delivery report without its delivery-status part")];
    };
    let blocks = field_blocks(part.contents());
    let mut findings = Vec::new();
    let mut other_actions = Vec::new();
    // The first block is about the message; the rest, one per recipient.
    for block in blocks.iter().skip(1) {
        let action = field(block, "action").unwrap_or_default().to_ascii_lowercase();
        if action != "failed" {
            other_actions.push(action);
            continue;
        }
        let email = field(block, "final-recipient")
            .or_else(|| field(block, "original-recipient"))
            .map(typed_address)
            .unwrap_or_default();
        let status = field(block, "status").and_then(|s| Status::parse(s.split_whitespace().next()?));
        let kind = match status {
            Some(status) => status.bounce_kind().unwrap_or(match status.class {
                4 => BounceKind::Soft,
                _ => BounceKind::Hard,
            }),
            // A failure without a code: the address is not blamed on no evidence.
            None => BounceKind::Soft,
        };
        findings.push(Finding {
            kind,
            email,
            status: status.map(|s| s.to_string()),
            diagnostic: field(block, "diagnostic-code").map(typed_text),
            what: "a delivery status notification".into(),
        });
    }
    if findings.is_empty() {
        let actions = if other_actions.is_empty() {
            "no recipient".to_string()
        } else {
            other_actions.join(", ")
        };
        findings.push(ignored(&format!(
            "a delivery report of no failure ({actions}): not a bounce"
        )));
    }
    findings
}

/// An ARF complaint: the recipient it is about, from the report's fields or the
/// original's `To`.
fn arf(message: &Message<'_>) -> Vec<Finding> {
    let report =
        parts_of(message).find(|p| content_type_of(p) == ("message".into(), "feedback-report".into()));
    let fields = report.map(|p| field_blocks(p.contents())).unwrap_or_default();
    let first: &[(String, String)] = fields.first().map(Vec::as_slice).unwrap_or_default();
    let feedback_type = field(first, "feedback-type")
        .unwrap_or("abuse")
        .to_ascii_lowercase();
    let email = field(first, "original-rcpt-to")
        .map(typed_address)
        .or_else(|| {
            parts_of(message).find_map(|p| {
                let original = p.message()?;
                let to = original.to()?.first()?.address()?;
                Some(to.to_string())
            })
        })
        .unwrap_or_default();
    let kind = match feedback_type.as_str() {
        // Not a complaint about the letter: a report that something else went wrong.
        "not-spam" | "auth-failure" | "dkim" | "virus" => BounceKind::Ignored,
        _ => BounceKind::Complaint,
    };
    vec![Finding {
        kind,
        email,
        status: None,
        diagnostic: field(first, "user-agent").map(|ua| format!("reported by {ua}")),
        what: format!("a complaint report (ARF, Feedback-Type: {feedback_type})"),
    }]
}

/// A message that follows no standard, to a return path: counted as a soft bounce (or
/// as its enhanced status code says, if its text gives one), never a hard one on no
/// evidence.
fn nonstandard(message: &Message<'_>) -> Finding {
    let text = message.body_text(0).unwrap_or_default();
    let status = text
        .lines()
        .take(200)
        .find_map(|line| Status::in_reply(line).or_else(|| line.split_whitespace().find_map(Status::parse)))
        .filter(|s| s.class != 2);
    let kind = status.and_then(|s| s.bounce_kind()).unwrap_or(BounceKind::Soft);
    Finding {
        kind,
        email: String::new(),
        status: status.map(|s| s.to_string()),
        diagnostic: message.subject().map(|s| format!("Subject: {s}")),
        what: "a bounce that follows no standard".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(kind: &str, part_type: &str, fields: &str) -> String {
        format!(
            "From: MAILER-DAEMON@mx.example.org\r\nMIME-Version: 1.0\r\n\
Content-Type: multipart/report; report-type={kind}; boundary=\"B\"\r\n\r\n\
--B\r\nContent-Type: text/plain\r\n\r\nA report.\r\n\
--B\r\nContent-Type: {part_type}\r\n\r\n{fields}\r\n--B--\r\n"
        )
    }

    #[test]
    fn a_dsn_gives_one_finding_per_failed_recipient() {
        let fields = "Reporting-MTA: dns; mx\r\n\r\n\
Final-Recipient: rfc822; a@example.org\r\nAction: failed\r\nStatus: 5.2.2\r\n\
Diagnostic-Code: smtp; 552 5.2.2 mailbox full\r\n\r\n\
Final-Recipient: rfc822; b@example.org\r\nAction: delayed\r\nStatus: 4.4.1\r\n\r\n\
Final-Recipient: rfc822;<c@example.org>\r\nAction: FAILED\r\nStatus: 5.0.0\r\n";
        let reading = read(report("delivery-status", "message/delivery-status", fields).as_bytes());
        let found: Vec<_> = reading
            .findings
            .iter()
            .map(|f| (f.kind, f.email.as_str(), f.status.as_deref()))
            .collect();
        assert_eq!(
            found,
            [
                (BounceKind::Soft, "a@example.org", Some("5.2.2")),
                (BounceKind::Hard, "c@example.org", Some("5.0.0")),
            ]
        );
        assert_eq!(
            reading.findings[0].diagnostic.as_deref(),
            Some("552 5.2.2 mailbox full")
        );
        // Only delays: not a bounce.
        let delayed = "Reporting-MTA: dns; mx\r\n\r\nFinal-Recipient: rfc822; b@x.org\r\nAction: delayed\r\nStatus: 4.4.1\r\n";
        let reading = read(report("delivery-status", "message/delivery-status", delayed).as_bytes());
        assert_eq!(reading.findings[0].kind, BounceKind::Ignored);
        assert!(
            reading.findings[0].what.contains("delayed"),
            "{:?}",
            reading.findings
        );
    }

    #[test]
    fn an_arf_report_is_a_complaint_about_its_recipient() {
        let fields = "Feedback-Type: abuse\r\nUser-Agent: Yahoo!-Mail-Feedback/2.0\r\nVersion: 1\r\n\
Original-Rcpt-To: <ann@example.org>\r\n";
        let reading = read(report("feedback-report", "message/feedback-report", fields).as_bytes());
        let f = &reading.findings[0];
        assert_eq!(
            (f.kind, f.email.as_str()),
            (BounceKind::Complaint, "ann@example.org")
        );
        let not_spam = "Feedback-Type: not-spam\r\nVersion: 1\r\n";
        let reading = read(report("feedback-report", "message/feedback-report", not_spam).as_bytes());
        assert_eq!(reading.findings[0].kind, BounceKind::Ignored);
    }

    #[test]
    fn automatic_replies_are_never_bounces() {
        for headers in [
            "Auto-Submitted: auto-replied\r\nSubject: Re: Hello",
            "Precedence: bulk\r\nSubject: Re: Hello",
            "X-Autoreply: yes\r\nSubject: Re: Hello",
            "Subject: Out of Office: Hello",
            "Subject: Automatic reply: Hello",
        ] {
            let message = format!("From: ann@example.org\r\n{headers}\r\n\r\nAway.\r\n");
            let reading = read(message.as_bytes());
            assert_eq!(reading.findings[0].kind, BounceKind::Ignored, "{headers}");
            assert!(reading.findings[0].what.contains("automatic reply"), "{headers}");
        }
        // `Auto-Submitted: no` is a person writing.
        let person = "From: ann@example.org\r\nAuto-Submitted: no\r\nSubject: Hello\r\n\r\nhi\r\n";
        assert_eq!(read(person.as_bytes()).findings[0].kind, BounceKind::Soft);
    }

    #[test]
    fn a_nonstandard_bounce_counts_only_as_its_code_says() {
        let message = "From: postmaster@x.org\r\nSubject: failure notice\r\n\r\n\
Sorry, we were unable to deliver your message.\r\n<ann@x.org>: 550 5.1.1 user unknown\r\n";
        let f = &read(message.as_bytes()).findings[0];
        assert_eq!((f.kind, f.status.as_deref()), (BounceKind::Hard, Some("5.1.1")));
        let vague = "From: postmaster@x.org\r\nSubject: failure notice\r\n\r\nIt did not work.\r\n";
        assert_eq!(read(vague.as_bytes()).findings[0].kind, BounceKind::Soft);
    }

    proptest::proptest! {
        /// No message makes the reader panic: bytes, and reports cut anywhere.
        #[test]
        fn reading_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..4096), cut in 0usize..2000) {
            let _ = read(&bytes);
            let fields = "Reporting-MTA: dns; mx\r\n\r\nFinal-Recipient: rfc822; a@x.org\r\nAction: failed\r\nStatus: 5.1.1\r\n";
            let whole = report("delivery-status", "message/delivery-status", fields);
            let cut = cut.min(whole.len());
            let mut mangled = whole.as_bytes()[..cut].to_vec();
            mangled.extend_from_slice(&bytes);
            let _ = read(&mangled);
        }
    }
}
