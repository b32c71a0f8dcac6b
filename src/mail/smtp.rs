//! Our own pool of SMTP connections, on lettre's `AsyncSmtpConnection`.
//!
//! Why not lettre's `AsyncSmtpTransport`: it never sets `TCP_NODELAY`, and it writes a
//! message body and its terminating `.` in separate writes, so Nagle's algorithm and the
//! server's delayed ACK cost ~40 ms per message per connection (measured in FACTS.md:
//! 715 msg/s over 32 connections against ~21k msg/s with `TCP_NODELAY`). Owning the
//! connections also lets us put a timeout on connecting, on every command and on the
//! whole transaction, and classify each failure as transient or permanent.
//!
//! Each message costs two writes and two waits for the server: MAIL, RCPT and DATA
//! together when the server offers PIPELINING (RFC 2920), then the dot-stuffed message
//! and its final dot together. lettre alone would make five writes and four waits.
//!
//! Every connection is opened on a tokio `TcpStream` with `TCP_NODELAY`: plain ones,
//! STARTTLS ones (lettre upgrades them) and implicit TLS ones (`smtps://`, our own
//! handshake in `tls.rs`, since lettre's own connect cannot set it).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use lettre::address::Envelope;
use lettre::transport::smtp::authentication::{Credentials, DEFAULT_MECHANISMS};
use lettre::transport::smtp::client::AsyncSmtpConnection;
use lettre::transport::smtp::commands::{Data, Ehlo, Mail, Rcpt, Rset};
use lettre::transport::smtp::extension::{ClientId, Extension, MailBodyParameter, MailParameter};
use lettre::transport::smtp::response::Response;
use tokio::sync::Semaphore;

use super::MailError;
use super::tls::{Stream, TlsOptions};

/// How the connection is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    /// Plain text (`smtp://`, the default for local relays).
    None,
    /// STARTTLS when the server offers it, plain otherwise (`?tls=opportunistic`).
    Opportunistic,
    /// STARTTLS or fail (`?tls=required`).
    Required,
    /// TLS from the first byte (`smtps://`).
    Implicit,
}

/// Where and how to connect; parsed from the transport URL.
#[derive(Clone)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub security: Security,
    pub credentials: Option<(String, String)>,
    /// The name we give in EHLO.
    pub hello: String,
    pub tls: TlsOptions,
}

#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// TCP connect, greeting, EHLO, STARTTLS and AUTH together.
    pub connect: Duration,
    /// Each command of a transaction (MAIL, RCPT, DATA, the message).
    pub command: Duration,
    /// The whole transaction, connecting included.
    pub send: Duration,
}

/// An open connection and what its server offers beyond what lettre tracks.
struct Session {
    conn: AsyncSmtpConnection,
    /// The server announced PIPELINING (RFC 2920): MAIL, RCPT and DATA go out in one
    /// write and their replies are read afterwards.
    pipelining: bool,
}

/// A connection and how it has been used.
struct Idle {
    session: Session,
    since: Instant,
    sent: u32,
}

/// Commands written together, one after the other, as one `Display` (lettre's
/// `command` writes whatever it is given in one write and reads one reply).
struct Group<'a>(&'a [&'a (dyn std::fmt::Display + Sync)]);

impl std::fmt::Display for Group<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|command| command.fmt(f))
    }
}

/// The message after DATA: dot-stuffed (RFC 5321 4.5.2) and followed by the
/// terminating `.`, ready to go out in one write. lettre's `message` writes the body and
/// the final dot separately: one more syscall and packet per message.
struct Content(String);

impl Content {
    /// `None` when the message is not UTF-8 (lettre's builder only makes UTF-8).
    fn new(message: &[u8]) -> Option<Content> {
        let text = std::str::from_utf8(message).ok()?;
        let mut out = String::with_capacity(text.len() + text.len() / 64 + 8);
        for line in text.split_inclusive('\n') {
            if line.starts_with('.') {
                out.push('.');
            }
            out.push_str(line);
        }
        if !out.ends_with("\r\n") {
            out.push_str("\r\n");
        }
        out.push_str(".\r\n");
        Some(Content(out))
    }
}

impl std::fmt::Display for Content {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

pub struct SmtpPool {
    endpoint: Endpoint,
    timeouts: Timeouts,
    /// One permit per connection that may be open at once.
    permits: Semaphore,
    idle: Mutex<Vec<Idle>>,
    /// A connection idle for longer is closed rather than reused (servers drop idle
    /// clients after a while; reusing a dropped one would fail a delivery).
    max_idle: Duration,
    /// Messages per connection before it is closed and a new one opened, as providers
    /// limit them.
    max_messages: u32,
}

/// Which step failed, for the error message.
fn step_error(step: &str, e: lettre::transport::smtp::Error) -> MailError {
    let text = full_error(&e);
    match e.status() {
        Some(code) if e.is_permanent() => MailError::Permanent(format!("{step}: {code} {text}")),
        Some(code) => MailError::Transient(format!("{step}: {code} {text}")),
        // A client-side refusal (e.g. a non-ASCII address to a server without SMTPUTF8)
        // will not change by retrying.
        None if e.is_client() => MailError::Permanent(format!("{step}: {text}")),
        None => MailError::Transient(format!("{step}: {text}")),
    }
}

fn full_error(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !out.contains(&s_text) {
            out.push_str(": ");
            out.push_str(&s_text);
        }
        source = s.source();
    }
    out
}

/// A failed step, and whether the session is still in step with the server (it answered
/// with an error code) or not (timeout, network error, garbled reply): only a session in
/// step can be reset and reused.
struct Failure {
    error: MailError,
    in_sync: bool,
    /// Whether the failure came while or after the message itself was sent (so the
    /// server may have it).
    body_sent: bool,
}

async fn timed<T>(
    step: &str,
    limit: Duration,
    f: impl Future<Output = Result<T, lettre::transport::smtp::Error>>,
) -> Result<T, Failure> {
    match tokio::time::timeout(limit, f).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(Failure {
            in_sync: e.status().is_some(),
            error: step_error(step, e),
            body_sent: false,
        }),
        Err(_) => Err(Failure {
            error: MailError::Transient(format!("{step}: timed out after {limit:?}")),
            in_sync: false,
            body_sent: false,
        }),
    }
}

impl SmtpPool {
    pub fn new(endpoint: Endpoint, timeouts: Timeouts, size: u32, max_messages: u32) -> SmtpPool {
        SmtpPool {
            endpoint,
            timeouts,
            permits: Semaphore::new(size.max(1) as usize),
            idle: Mutex::new(Vec::new()),
            max_idle: Duration::from_secs(30),
            max_messages: max_messages.max(1),
        }
    }

    /// Sends one message. On success returns the server's reply to the message.
    /// `go` is asked once a connection is in hand, right before the transaction, and
    /// again right before the message itself (after DATA).
    pub async fn send(
        &self,
        envelope: &Envelope,
        message: &[u8],
        go: &(dyn Fn() -> bool + Sync),
    ) -> Result<Response, MailError> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| MailError::Transient("the SMTP pool is closed".into()))?;
        let limit = self.timeouts.send;
        match tokio::time::timeout(limit, self.send_on_pooled(envelope, message, go)).await {
            Ok(result) => result,
            Err(_) => Err(MailError::Transient(format!(
                "the SMTP transaction took longer than {limit:?}"
            ))),
        }
    }

    async fn send_on_pooled(
        &self,
        envelope: &Envelope,
        message: &[u8],
        go: &(dyn Fn() -> bool + Sync),
    ) -> Result<Response, MailError> {
        let reused = self.take_idle();
        let was_reused = reused.is_some();
        let (mut session, mut sent) = match reused {
            Some(idle) => (idle.session, idle.sent),
            None => (self.connect().await?, 0),
        };
        // Waiting for a permit or a connection may have taken long: ask now, when
        // only writing the transaction remains.
        if !go() {
            self.idle.lock().unwrap_or_else(|e| e.into_inner()).push(Idle {
                session,
                since: Instant::now(),
                sent,
            });
            return Err(MailError::Withheld);
        }
        let mut result = self.transaction(&mut session, envelope, message, go).await;
        // A pooled connection that the server closed while it sat idle fails on its first
        // command, before any of the message went out: try once more on a fresh
        // connection instead of making the recipient wait for a retry.
        if was_reused
            && matches!(&result, Err(f) if !f.in_sync && !f.body_sent && !matches!(f.error, MailError::Withheld))
        {
            session = self.connect().await?;
            sent = 0;
            result = self.transaction(&mut session, envelope, message, go).await;
        }
        let keep = match &result {
            Ok(_) => true,
            // The server refused this message but the session is fine: reset it and
            // keep the connection.
            Err(failure) if failure.in_sync && !session.conn.has_broken() => {
                timed("RSET", self.timeouts.command, session.conn.command(Rset))
                    .await
                    .is_ok()
            }
            Err(_) => false,
        };
        if keep && sent + 1 < self.max_messages {
            self.idle.lock().unwrap_or_else(|e| e.into_inner()).push(Idle {
                session,
                since: Instant::now(),
                sent: sent + 1,
            });
        } else {
            // QUIT politely in the background; the caller has its answer already.
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(5), session.conn.quit()).await;
            });
        }
        result.map_err(|failure| failure.error)
    }

    /// A pooled connection that is neither broken nor idle for too long.
    fn take_idle(&self) -> Option<Idle> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(candidate) = idle.pop() {
            if !candidate.session.conn.has_broken() && candidate.since.elapsed() < self.max_idle {
                return Some(candidate);
            }
        }
        None
    }

    async fn connect(&self) -> Result<Session, MailError> {
        let limit = self.timeouts.connect;
        match tokio::time::timeout(limit, self.connect_inner()).await {
            Ok(result) => result,
            Err(_) => Err(MailError::Transient(format!(
                "connecting to {}:{} timed out after {limit:?}",
                self.endpoint.host, self.endpoint.port
            ))),
        }
    }

    async fn connect_inner(&self) -> Result<Session, MailError> {
        let e = &self.endpoint;
        let hello = ClientId::Domain(e.hello.clone());
        let stream = tokio::net::TcpStream::connect((e.host.as_str(), e.port))
            .await
            .map_err(|err| MailError::Transient(format!("connect to {}:{}: {err}", e.host, e.port)))?;
        // The point of owning the connection: see the module docs.
        stream
            .set_nodelay(true)
            .map_err(|err| MailError::Transient(format!("TCP_NODELAY: {err}")))?;
        let mut conn = if e.security == Security::Implicit {
            let tls = e.tls.connect(&e.host, stream).await?;
            AsyncSmtpConnection::connect_with_transport(Box::new(Stream(tls)), &hello)
                .await
                .map_err(|err| step_error("greeting", err))?
        } else {
            let mut conn = AsyncSmtpConnection::connect_with_transport(Box::new(stream), &hello)
                .await
                .map_err(|err| step_error("greeting", err))?;
            let offers_tls = conn.server_info().supports_feature(Extension::StartTls);
            match e.security {
                Security::Required if !offers_tls => {
                    conn.abort().await;
                    return Err(MailError::Permanent(format!(
                        "{}:{} does not offer STARTTLS, which tls=required demands",
                        e.host, e.port
                    )));
                }
                Security::Required | Security::Opportunistic if offers_tls => {
                    let parameters = e.tls.lettre_parameters(&e.host)?;
                    conn.starttls(parameters, &hello)
                        .await
                        .map_err(|err| step_error("STARTTLS", err))?;
                }
                _ => {}
            }
            conn
        };
        // lettre keeps only the EHLO keywords it uses itself, and PIPELINING is not one
        // of them: ask again (a repeated EHLO is allowed and resets nothing we hold) and
        // read the keywords from the reply. Before AUTH, after which some servers refuse
        // a new EHLO.
        let ehlo = conn
            .command(Ehlo::new(hello.clone()))
            .await
            .map_err(|err| step_error("EHLO", err))?;
        let pipelining = ehlo.message().skip(1).any(|line| {
            line.split_whitespace()
                .next()
                .is_some_and(|k| k.eq_ignore_ascii_case("PIPELINING"))
        });
        if let Some((user, password)) = &e.credentials {
            let credentials = Credentials::new(user.clone(), password.clone());
            if let Err(err) = conn.auth(DEFAULT_MECHANISMS, &credentials).await {
                conn.abort().await;
                // A refused login does not heal by retrying each recipient; say so.
                return Err(match err.status() {
                    Some(_) if err.is_transient() => step_error("AUTH", err),
                    _ => MailError::Permanent(format!("AUTH: {}", full_error(&err))),
                });
            }
        }
        Ok(Session { conn, pipelining })
    }

    /// MAIL, RCPT, DATA and the message, each with its own timeout. `go` is asked
    /// again once the server waits for the message: the message's end is the point of
    /// no return, and a node frozen between the first ask and MAIL FROM would otherwise
    /// send, when it wakes, a recipient another node has taken over.
    async fn transaction(
        &self,
        session: &mut Session,
        envelope: &Envelope,
        message: &[u8],
        go: &(dyn Fn() -> bool + Sync),
    ) -> Result<Response, Failure> {
        let limit = self.timeouts.command;
        let conn = &mut session.conn;
        let mut params = Vec::new();
        let ascii = |a: &lettre::Address| AsRef::<str>::as_ref(a).is_ascii();
        let non_ascii = envelope.from().is_some_and(|a| !ascii(a)) || envelope.to().iter().any(|a| !ascii(a));
        if non_ascii {
            if !conn.server_info().supports_feature(Extension::SmtpUtfEight) {
                return Err(Failure {
                    error: MailError::Permanent(
                        "the address is not ASCII and the server does not support SMTPUTF8".into(),
                    ),
                    in_sync: true,
                    body_sent: false,
                });
            }
            params.push(MailParameter::SmtpUtfEight);
        }
        if !message.is_ascii() && conn.server_info().supports_feature(Extension::EightBitMime) {
            params.push(MailParameter::Body(MailBodyParameter::EightBitMime));
        }
        let mail = Mail::new(envelope.from().cloned(), params);
        let rcpts: Vec<Rcpt> = envelope
            .to()
            .iter()
            .map(|to| Rcpt::new(to.clone(), vec![]))
            .collect();
        if session.pipelining {
            let mut group: Vec<&(dyn std::fmt::Display + Sync)> = vec![&mail];
            group.extend(rcpts.iter().map(|r| r as &(dyn std::fmt::Display + Sync)));
            group.push(&Data);
            // One write, then one reply per command, in order. Every reply must be
            // read, refusals included, to stay in step with the server.
            let mut refused = timed("MAIL FROM", limit, conn.command(Group(&group))).await.err();
            if let Some(lost) = refused.take_if(|f| !f.in_sync) {
                return Err(lost);
            }
            for _ in &rcpts {
                match timed("RCPT TO", limit, conn.read_response()).await {
                    Ok(_) => {}
                    Err(f) if !f.in_sync => return Err(f),
                    Err(f) => {
                        refused.get_or_insert(f);
                    }
                }
            }
            let data = timed("DATA", limit, conn.read_response()).await;
            match (refused, data) {
                (None, Ok(_)) => {}
                // A server that takes DATA after refusing the sender or every recipient
                // breaks RFC 2920 and now waits for a message; dropping the connection
                // is the only way to send nothing.
                (Some(f), Ok(_)) => return Err(Failure { in_sync: false, ..f }),
                (Some(f), Err(d)) => {
                    return Err(Failure {
                        in_sync: f.in_sync && d.in_sync,
                        ..f
                    });
                }
                (None, Err(d)) => return Err(d),
            }
        } else {
            timed("MAIL FROM", limit, conn.command(mail)).await?;
            for rcpt in rcpts {
                timed("RCPT TO", limit, conn.command(rcpt)).await?;
            }
            timed("DATA", limit, conn.command(Data)).await?;
        }
        if !go() {
            // After DATA the only way to send nothing is to drop the connection.
            return Err(Failure {
                error: MailError::Withheld,
                in_sync: false,
                body_sent: false,
            });
        }
        let sent = match Content::new(message) {
            Some(content) => timed("message", limit, conn.command(content)).await,
            None => timed("message", limit, conn.message(message)).await,
        };
        sent.map_err(|f| Failure { body_sent: true, ..f })
    }
}
