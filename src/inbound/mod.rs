//! The inbound SMTP listener (`--inbound-smtp ADDR`, with `--bounce-domain`): where
//! bounces, complaints and replies to the return path arrive. It owns the SMTP
//! conversation (accepting mail only for the bounce domain: never a relay), its limits
//! (message size, connections, slow clients), and what it does with a message: read it
//! (`read.rs`, with mail-parser), attribute it (the VERP return path it came to, or the
//! Message-ID of the letter it answers) and record it through `store::Bounces` with
//! the raw message. A message is answered `250` only once its record is committed, so
//! an MTA that got no answer sends it again and nothing is lost.
//!
//! It knows no HTTP; the store, the rules and the VERP key are handed to it.

mod read;

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::bounces::{NewBounce, Rules, sources};
use crate::store::Store;
use crate::tokens::VerpKey;

pub use read::{Finding, Reading, read};

/// The listener's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The largest message accepted (announced as `SIZE`); larger ones get `552`.
    pub max_message_bytes: usize,
    /// Connections served at once; more get `421` and are closed.
    pub max_connections: usize,
    /// How long the listener waits for a client's next command or line of a message.
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 10 << 20,
            max_connections: 64,
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Recipients one transaction may name (RFC 5321 asks servers for at least 100).
const MAX_RECIPIENTS: usize = 100;
/// The longest command line.
const MAX_LINE: usize = 1000;

/// What the listener needs to attribute and record a message.
#[derive(Clone)]
pub struct Inbound {
    pub store: Store,
    pub rules: Rules,
    pub verp: VerpKey,
    /// Lower-case; mail only for `…@domain` is accepted.
    pub domain: String,
    pub limits: Limits,
    /// Offered as STARTTLS when a certificate is configured.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

/// How a session ended.
enum Ended {
    /// The client quit, went away or was too slow.
    Closed,
    /// The client asked for TLS and was told to go ahead.
    StartTls,
}

/// Serves SMTP on `listener` until `stop` is cancelled.
pub async fn serve(listener: TcpListener, inbound: Inbound, stop: CancellationToken) {
    let slots = Arc::new(Semaphore::new(inbound.limits.max_connections));
    let inbound = Arc::new(inbound);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.cancelled() => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors and the like: pass, rather than spin.
                tracing::warn!(error = %e, "inbound SMTP: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let inbound = inbound.clone();
        let stop = stop.clone();
        let permit = slots.clone().try_acquire_owned();
        tokio::spawn(async move {
            let mut stream = BufReader::new(stream);
            let Ok(_permit) = permit else {
                metrics::counter!("letterbox_inbound_refused_total", "why" => "connections").increment(1);
                let _ = stream
                    .write_all(b"421 4.7.0 too many connections, try later\r\n")
                    .await;
                return;
            };
            // A session in the middle of a message when the server stops just ends:
            // nothing was answered 250, so the sender sends it again.
            tokio::select! {
                _ = connection(&inbound, stream) => {}
                _ = stop.cancelled() => {}
            }
            tracing::debug!(%peer, "inbound SMTP session ended");
        });
    }
}

/// Reads one line, keeping at most `max` bytes of it (the rest of a longer one is
/// read and dropped); returns whether it fitted and how long it was. `None` at the
/// end of the stream, on a read error, or after the idle timeout.
async fn line(
    reader: &mut (impl AsyncBufReadExt + Unpin),
    out: &mut Vec<u8>,
    max: usize,
    idle: Duration,
) -> Option<(bool, usize)> {
    out.clear();
    let mut too_long = false;
    let mut total = 0;
    loop {
        let buffer = match tokio::time::timeout(idle, reader.fill_buf()).await {
            Ok(Ok(buffer)) if !buffer.is_empty() => buffer,
            _ => return None,
        };
        let (chunk, done) = match buffer.iter().position(|b| *b == b'\n') {
            Some(at) => (&buffer[..=at], true),
            None => (buffer, false),
        };
        let n = chunk.len();
        total += n;
        if out.len() + n <= max {
            out.extend_from_slice(chunk);
        } else {
            too_long = true;
        }
        reader.consume(n);
        if done {
            return Some((!too_long, total));
        }
    }
}

/// One connection: a session, and after STARTTLS a new one over TLS (RFC 3207: the
/// client starts again from EHLO, and nothing said before counts).
async fn connection(inbound: &Inbound, mut stream: BufReader<tokio::net::TcpStream>) {
    let greeting = format!("220 {} letterbox ESMTP\r\n", inbound.domain);
    if stream.write_all(greeting.as_bytes()).await.is_err() {
        return;
    }
    let tls = inbound.tls.as_ref();
    if let Ended::StartTls = session(inbound, &mut stream, tls.is_some()).await
        && let Some(acceptor) = tls
    {
        // Commands sent after STARTTLS before the handshake would be read as if they
        // came over TLS (CVE-2011-0411): such a client is dropped.
        if !stream.buffer().is_empty() {
            return;
        }
        let handshake =
            tokio::time::timeout(inbound.limits.idle_timeout, acceptor.accept(stream.into_inner()));
        let Ok(Ok(secure)) = handshake.await else {
            metrics::counter!("letterbox_inbound_refused_total", "why" => "tls").increment(1);
            return;
        };
        session(inbound, &mut BufReader::new(secure), false).await;
    }
}

/// One SMTP session on `stream` (buffered for reading, written through); STARTTLS is
/// offered if `offer_tls`.
async fn session(
    inbound: &Inbound,
    stream: &mut (impl AsyncBufReadExt + AsyncRead + AsyncWrite + Unpin),
    offer_tls: bool,
) -> Ended {
    let limits = inbound.limits;
    let reply = |text: &str| format!("{text}\r\n");
    let mut buffer = Vec::with_capacity(256);
    let mut recipients: Vec<String> = Vec::new();
    let mut mail_from = false;
    loop {
        let Some((fits, _)) = line(stream, &mut buffer, MAX_LINE, limits.idle_timeout).await else {
            return Ended::Closed;
        };
        let command = String::from_utf8_lossy(&buffer).trim_end().to_string();
        let upper = command.to_ascii_uppercase();
        let answer = if !fits {
            "500 5.5.2 line too long".to_string()
        } else if upper.starts_with("EHLO") {
            let starttls = if offer_tls { "250-STARTTLS\r\n" } else { "" };
            format!(
                "250-{}\r\n250-SIZE {}\r\n{starttls}250-8BITMIME\r\n250 ENHANCEDSTATUSCODES",
                inbound.domain, limits.max_message_bytes
            )
        } else if upper == "STARTTLS" {
            if offer_tls {
                if stream
                    .write_all(b"220 2.0.0 ready to start TLS\r\n")
                    .await
                    .is_err()
                {
                    return Ended::Closed;
                }
                return Ended::StartTls;
            }
            "454 4.7.0 TLS not available".to_string()
        } else if upper.starts_with("HELO") {
            format!("250 {}", inbound.domain)
        } else if upper.starts_with("MAIL FROM:") {
            let declared = upper
                .split_whitespace()
                .find_map(|p| p.strip_prefix("SIZE="))
                .and_then(|n| n.parse::<usize>().ok());
            if declared.is_some_and(|n| n > limits.max_message_bytes) {
                "552 5.3.4 message too big".to_string()
            } else {
                mail_from = true;
                recipients.clear();
                "250 2.1.0 ok".to_string()
            }
        } else if upper.starts_with("RCPT TO:") {
            let address = command[8..]
                .trim()
                .trim_start_matches('<')
                .split('>')
                .next()
                .unwrap_or_default()
                .to_string();
            let ours = address
                .rsplit_once('@')
                .is_some_and(|(_, d)| d.eq_ignore_ascii_case(&inbound.domain));
            if !mail_from {
                "503 5.5.1 MAIL first".to_string()
            } else if !ours {
                metrics::counter!("letterbox_inbound_refused_total", "why" => "relay").increment(1);
                "550 5.7.1 relaying denied: this server takes mail for its bounce domain only".to_string()
            } else if recipients.len() >= MAX_RECIPIENTS {
                "452 4.5.3 too many recipients".to_string()
            } else {
                recipients.push(address);
                "250 2.1.5 ok".to_string()
            }
        } else if upper == "DATA" {
            if recipients.is_empty() {
                "554 5.5.1 no valid recipients".to_string()
            } else {
                if stream.write_all(b"354 end with <CRLF>.<CRLF>\r\n").await.is_err() {
                    return Ended::Closed;
                }
                let Some(message) = data(stream, &mut buffer, limits).await else {
                    return Ended::Closed;
                };
                let rcpts = std::mem::take(&mut recipients);
                mail_from = false;
                match message {
                    None => {
                        metrics::counter!("letterbox_inbound_refused_total", "why" => "size").increment(1);
                        "552 5.3.4 message too big".to_string()
                    }
                    Some(raw) => match accept(inbound, &raw, &rcpts).await {
                        Ok(n) => format!("250 2.0.0 ok: {n} report(s) recorded"),
                        Err(e) => {
                            tracing::warn!(error = %e, "inbound message not recorded: the sender will retry");
                            "451 4.3.0 cannot record it now, try again later".to_string()
                        }
                    },
                }
            }
        } else if upper == "RSET" {
            mail_from = false;
            recipients.clear();
            "250 2.0.0 ok".to_string()
        } else if upper == "NOOP" {
            "250 2.0.0 ok".to_string()
        } else if upper == "QUIT" {
            let _ = stream.write_all(b"221 2.0.0 bye\r\n").await;
            return Ended::Closed;
        } else if upper.starts_with("VRFY") {
            "252 2.5.2 cannot verify".to_string()
        } else {
            "500 5.5.2 command not recognised".to_string()
        };
        if stream.write_all(reply(&answer).as_bytes()).await.is_err() {
            return Ended::Closed;
        }
    }
}

/// The message after `DATA`, dot-unstuffed: `Some(Some(bytes))`, `Some(None)` when it
/// was larger than the limit (read to its end and dropped), `None` if the client went.
async fn data(
    reader: &mut (impl AsyncBufReadExt + Unpin),
    buffer: &mut Vec<u8>,
    limits: Limits,
) -> Option<Option<Vec<u8>>> {
    let mut message = Vec::new();
    let mut size = 0;
    loop {
        // A line longer than this is not mail (RFC 5321: 1,000): kept cut, but counted
        // whole against the size limit.
        let (_, length) = line(reader, buffer, 64 << 10, limits.idle_timeout).await?;
        if buffer.as_slice() == b".\r\n" || buffer.as_slice() == b".\n" {
            return Some((size <= limits.max_message_bytes).then_some(message));
        }
        size += length;
        if size > limits.max_message_bytes {
            // Read to the end and dropped: the answer is 552, after the final dot.
            message = Vec::new();
        } else {
            message.extend_from_slice(buffer.strip_prefix(b".").unwrap_or(buffer));
        }
    }
}

/// A job, if it exists; a store that fails is an error (the message is answered `451`
/// and comes again), never a reason to record it as someone else's.
async fn job_of(inbound: &Inbound, id: u64) -> Result<Option<crate::domain::Job>, crate::store::StoreError> {
    match inbound.store.job(id).await {
        Ok(job) => Ok(Some(job)),
        Err(crate::store::StoreError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Reads, attributes and records one message; how many records it made.
async fn accept(
    inbound: &Inbound,
    raw: &[u8],
    recipients: &[String],
) -> Result<usize, crate::store::StoreError> {
    let reading = read(raw);
    // The return path it came to names the job and subscriber, if it is genuine.
    let verp = recipients
        .iter()
        .find_map(|r| inbound.verp.verify(r, &inbound.domain));
    // Whom it is about (the subscriber, and the job that mailed them, if it is still
    // kept), looked up once for all its findings.
    let mut attributed = match verp {
        Some((job, subscriber)) => Some((job_of(inbound, job).await?, subscriber)),
        None => None,
    };
    if attributed.is_none()
        && let Some(id) = reading.original_message_id.as_deref()
        && let Some((job, subscriber)) = crate::bounces::answered(&inbound.store, id).await?
    {
        attributed = Some((Some(job), subscriber));
    }
    let raw_text = String::from_utf8_lossy(raw).into_owned();
    let mut recorded = 0;
    for finding in reading.findings {
        metrics::counter!("letterbox_inbound_messages_total", "kind" => finding.kind.as_str()).increment(1);
        let mut report = NewBounce::new(finding.kind, sources::INBOUND, finding.email);
        report.status = finding.status;
        report.diagnostic = Some(match finding.diagnostic {
            Some(d) => format!("{}: {d}", finding.what),
            None => finding.what,
        });
        report.raw = Some(raw_text.clone());
        if let Some((job, subscriber_id)) = &attributed {
            // The return path (or the Message-ID) says whom it is about, whatever
            // address the report quotes (a forwarded one, say).
            report.subscriber_id = Some(*subscriber_id);
            if let Some(job) = job {
                report = report.answering(job);
            }
        }
        recorded += inbound.store.record_bounce(report, inbound.rules).await?.len();
    }
    Ok(recorded)
}
