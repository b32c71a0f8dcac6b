//! An independent check that a message is what every mail system accepts: RFC 5322
//! lines (CRLF only, at most 998 characters, a final CRLF), the headers letterbox must
//! set, exactly once each, `MIME-Version: 1.0` (RFC 2045 4), and MIME parts whose
//! encodings are the ones declared. Parsing is `mail-parser`'s, not lettre's.

use mail_parser::{MessageParser, MimeHeaders, PartType};

/// Why `raw` is not a well-formed letterbox message, if it is not.
pub fn check_message(raw: &str) -> Result<(), String> {
    let bytes = raw.as_bytes();
    if !raw.ends_with("\r\n") {
        return Err("the message does not end in CRLF".into());
    }
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'\n' && (i == 0 || bytes[i - 1] != b'\r') {
            return Err(format!("a bare LF at byte {i}"));
        }
        if b == b'\r' && bytes.get(i + 1) != Some(&b'\n') {
            return Err(format!("a bare CR at byte {i}"));
        }
    }
    for (n, line) in raw.split("\r\n").enumerate() {
        if line.len() > 998 {
            return Err(format!(
                "line {} has {} characters (at most 998)",
                n + 1,
                line.len()
            ));
        }
    }
    let head = raw.split("\r\n\r\n").next().unwrap_or_default();
    if !head.is_ascii() {
        return Err("the header block is not ASCII".into());
    }
    for name in [
        "From",
        "To",
        "Date",
        "Message-ID",
        "Subject",
        "MIME-Version",
        "Content-Type",
    ] {
        let count = head
            .split("\r\n")
            .filter(|line| {
                line.split_once(':')
                    .is_some_and(|(n, _)| n.eq_ignore_ascii_case(name))
            })
            .count();
        if count != 1 {
            return Err(format!("{count} {name} headers, not 1"));
        }
    }
    let message = MessageParser::default()
        .parse(bytes)
        .ok_or("mail-parser cannot parse the message")?;
    let mime_version = message.header_raw("MIME-Version").unwrap_or_default();
    if mime_version.trim() != "1.0" {
        return Err(format!("MIME-Version is {mime_version:?}"));
    }
    let id = message.message_id().ok_or("no parsable Message-ID")?;
    if !id.contains('@') {
        return Err(format!("Message-ID {id:?} has no @"));
    }
    if message
        .to()
        .and_then(|to| to.first())
        .and_then(|a| a.address())
        .is_none()
    {
        return Err("no parsable To address".into());
    }
    let root_type = message
        .content_type()
        .map(|ct| format!("{}/{}", ct.ctype(), ct.subtype().unwrap_or_default()))
        .unwrap_or_default()
        .to_ascii_lowercase();
    let text_parts = message.text_body.len();
    match root_type.as_str() {
        "text/plain" if text_parts == 1 && message.html_body_count() <= 1 => {}
        "multipart/alternative" => {
            if message.parts.len() != 3 {
                return Err(format!(
                    "multipart/alternative with {} parts, not text and html",
                    message.parts.len() - 1
                ));
            }
        }
        other => return Err(format!("unexpected Content-Type {other:?}")),
    }
    for (i, part) in message.parts.iter().enumerate() {
        if let PartType::Multipart(_) = part.body {
            continue;
        }
        let ct = part
            .content_type()
            .ok_or(format!("part {i} has no Content-Type"))?;
        let charset = ct.attribute("charset").unwrap_or_default();
        if !charset.eq_ignore_ascii_case("utf-8") {
            return Err(format!("part {i} has charset {charset:?}"));
        }
        let encoding = part
            .content_transfer_encoding()
            .unwrap_or("7bit")
            .to_ascii_lowercase();
        let body = &raw[part.raw_body_offset() as usize..part.raw_end_offset() as usize];
        match encoding.as_str() {
            "7bit" if body.is_ascii() => {}
            "quoted-printable" | "base64" => {
                if let Some(line) = body.split("\r\n").find(|l| l.len() > 76) {
                    return Err(format!(
                        "part {i}: a {encoding} line of {} characters",
                        line.len()
                    ));
                }
                if !body.is_ascii() {
                    return Err(format!("part {i}: {encoding} with non-ASCII bytes"));
                }
            }
            other => return Err(format!("part {i}: transfer encoding {other:?} for this body")),
        }
        if !matches!(part.body, PartType::Text(_) | PartType::Html(_)) {
            return Err(format!("part {i} is not text"));
        }
    }
    Ok(())
}
