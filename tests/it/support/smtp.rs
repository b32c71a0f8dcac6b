//! A small real SMTP server for tests: listens on 127.0.0.1:0, speaks the subset of
//! ESMTP letterbox uses (EHLO, MAIL, RCPT, DATA, RSET, NOOP, QUIT) and keeps every message
//! it accepts. It is scriptable: per recipient and attempt it accepts, answers 4xx or
//! 5xx, drops the connection in the middle of DATA, or stalls; it can wait before
//! accepting (a slow sink), and it records arrival times and how many transactions were
//! open at once per recipient domain. It announces PIPELINING (RFC 2920) unless told not
//! to, and counts the commands a client sent ahead of a reply, and those it sent ahead
//! when PIPELINING was not announced (a protocol violation). It can speak TLS, by
//! STARTTLS or from the first byte, with a CA and a certificate for `localhost` made by
//! `rcgen` when the test starts, and require AUTH PLAIN or LOGIN.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

/// What the server does with one recipient's transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    Accept,
    /// `451 4.3.0` at RCPT: try again later.
    TempFail,
    /// `550 5.1.1` at RCPT: no such user.
    PermFail,
    /// `550 5.6.0` at RCPT: refused for good, for a reason that says nothing about the
    /// address (no bounce).
    Refuse,
    /// `452 4.2.2` at RCPT: mailbox full (a soft bounce once it outlasts the retries).
    Full,
    /// `554 5.7.1` after the message: the receiver refuses the sender (a block).
    Blocked,
    /// Reads part of the message after DATA, then closes the connection.
    DropInData,
    /// Never answers the end of the message.
    Stall,
}

/// Decides the reply from the recipient and how many times it was tried before (0 the
/// first time).
pub type Script = Arc<dyn Fn(&str, u32) -> Reply + Send + Sync>;

#[derive(Debug, Clone)]
pub struct Received {
    pub recipients: Vec<String>,
    /// The envelope sender (MAIL FROM), without angle brackets.
    pub mail_from: String,
    /// The message as sent after DATA, dot-unstuffed, with CRLF line ends.
    pub data: String,
    /// When its transaction began (MAIL FROM).
    pub started: Instant,
    /// When it was accepted.
    pub at: Instant,
}

impl Received {
    /// The value of the first header called `name` (case-insensitive), unfolded.
    pub fn header(&self, name: &str) -> Option<String> {
        let head = self.data.split("\r\n\r\n").next()?;
        let mut value: Option<String> = None;
        for line in head.split("\r\n") {
            if let Some(v) = value.as_mut() {
                if line.starts_with([' ', '\t']) {
                    v.push_str(line);
                    continue;
                }
                break;
            }
            if let Some((n, v)) = line.split_once(':')
                && n.eq_ignore_ascii_case(name)
            {
                value = Some(v.trim().to_string());
            }
        }
        value
    }

    /// The message body (after the header block).
    pub fn body(&self) -> &str {
        self.data.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("")
    }
}

#[derive(Default)]
struct State {
    received: Vec<Received>,
    /// RCPT commands seen per recipient.
    tries: HashMap<String, u32>,
    /// Transactions open now and at most, per recipient domain.
    open: HashMap<String, usize>,
    most_open: HashMap<String, usize>,
    connections: usize,
    /// MAIL commands that arrived with more commands already behind them.
    pipelined: usize,
    /// The same, from a session where PIPELINING was not announced.
    unannounced_pipelining: usize,
    /// Sessions that completed a TLS handshake, and logins accepted.
    tls_sessions: usize,
    logins: usize,
}

/// How a server behaves beyond its script.
#[derive(Clone)]
struct Behaviour {
    close_after_message: bool,
    pipelining: bool,
    tls: Option<Tls>,
    /// AUTH is offered (after TLS, when there is TLS) and required before MAIL.
    login: Option<(String, String)>,
}

/// A plain server that announces PIPELINING and keeps connections open.
impl Default for Behaviour {
    fn default() -> Behaviour {
        Behaviour {
            close_after_message: false,
            pipelining: true,
            tls: None,
            login: None,
        }
    }
}

#[derive(Clone)]
struct Tls {
    acceptor: TlsAcceptor,
    /// TLS from the first byte (smtps); else STARTTLS.
    implicit: bool,
}

/// A certificate authority made for one test, and a server certificate it issued.
pub struct TestCa {
    /// The CA certificate, PEM: what letterbox's `tls_ca` must point to.
    pub ca_pem: String,
    /// The server certificate and its key, PEM (for a server letterbox runs itself).
    pub cert_pem: String,
    pub key_pem: String,
    config: Arc<rustls::ServerConfig>,
}

impl TestCa {
    /// A CA, and a certificate for `names` (e.g. `localhost`) signed by it.
    pub fn new(names: &[&str]) -> TestCa {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "letterbox test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let cert = rcgen::CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key)
            .unwrap();
        TestCa {
            ca_pem: ca.pem(),
            cert_pem,
            key_pem,
            config: Arc::new(config),
        }
    }
}

#[derive(Clone)]
pub struct SmtpServer {
    pub port: u16,
    state: Arc<Mutex<State>>,
}

impl SmtpServer {
    pub async fn start() -> SmtpServer {
        Self::start_with_delay(Duration::ZERO).await
    }

    /// Waits `delay` before accepting each message: a slow sink.
    pub async fn start_with_delay(delay: Duration) -> SmtpServer {
        Self::scripted(delay, Arc::new(|_: &str, _: u32| Reply::Accept)).await
    }

    /// Answers each recipient as `script` says, after `delay` for accepted messages.
    pub async fn scripted(delay: Duration, script: Script) -> SmtpServer {
        Self::scripted_with(delay, script, Behaviour::default()).await
    }

    /// Accepts every message but does not announce PIPELINING.
    pub async fn without_pipelining() -> SmtpServer {
        Self::accepting(Behaviour {
            pipelining: false,
            ..Behaviour::default()
        })
        .await
    }

    /// Accepts every message, then silently closes the connection after its reply (as a
    /// server does to idle or over-used clients): the next message on it finds it dead.
    pub async fn closing_after_each_message() -> SmtpServer {
        Self::accepting(Behaviour {
            close_after_message: true,
            ..Behaviour::default()
        })
        .await
    }

    /// Accepts every message over TLS with `ca`'s certificate: STARTTLS, or TLS from the
    /// first byte when `implicit`; with `login`, AUTH is required before MAIL.
    pub async fn with_tls(ca: &TestCa, implicit: bool, login: Option<(&str, &str)>) -> SmtpServer {
        Self::accepting(Behaviour {
            tls: Some(Tls {
                acceptor: TlsAcceptor::from(ca.config.clone()),
                implicit,
            }),
            login: login.map(|(u, p)| (u.to_string(), p.to_string())),
            ..Behaviour::default()
        })
        .await
    }

    /// Accepts every message at once, behaving as `behaviour` says.
    async fn accepting(behaviour: Behaviour) -> SmtpServer {
        Self::scripted_with(
            Duration::ZERO,
            Arc::new(|_: &str, _: u32| Reply::Accept),
            behaviour,
        )
        .await
    }

    /// Sessions that completed a TLS handshake, and logins accepted.
    pub fn tls_and_logins(&self) -> (usize, usize) {
        let s = self.state.lock().unwrap();
        (s.tls_sessions, s.logins)
    }

    async fn scripted_with(delay: Duration, script: Script, behaviour: Behaviour) -> SmtpServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                // Replies are small writes: without this, Nagle holds them back.
                let _ = stream.set_nodelay(true);
                shared.lock().unwrap().connections += 1;
                tokio::spawn(serve(
                    stream,
                    shared.clone(),
                    delay,
                    script.clone(),
                    behaviour.clone(),
                ));
            }
        });
        SmtpServer { port, state }
    }

    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    /// Every message accepted so far, each checked to be well-formed MIME by an
    /// independent parser (`support::mime`): a test that reads what was sent fails on
    /// a malformed message, whatever it is about.
    pub fn received(&self) -> Vec<Received> {
        let received = self.state.lock().unwrap().received.clone();
        for message in &received {
            if let Err(why) = super::mime::check_message(&message.data) {
                panic!("a malformed message: {why}\n{}", message.data);
            }
        }
        received
    }

    pub fn count(&self) -> usize {
        self.state.lock().unwrap().received.len()
    }

    /// How many times `recipient` was tried (RCPT commands seen).
    pub fn tries(&self, recipient: &str) -> u32 {
        self.state
            .lock()
            .unwrap()
            .tries
            .get(recipient)
            .copied()
            .unwrap_or(0)
    }

    /// The most transactions that were open at once for recipients of `domain`.
    pub fn most_open(&self, domain: &str) -> usize {
        self.state
            .lock()
            .unwrap()
            .most_open
            .get(domain)
            .copied()
            .unwrap_or(0)
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state.lock().unwrap().connections
    }

    /// Transactions whose MAIL command came with more commands behind it, and how many
    /// of those came from clients that were not offered PIPELINING.
    pub fn pipelined(&self) -> (usize, usize) {
        let s = self.state.lock().unwrap();
        (s.pipelined, s.unannounced_pipelining)
    }
}

fn domain_of(address: &str) -> String {
    address
        .rsplit_once('@')
        .map(|(_, d)| d.to_string())
        .unwrap_or_default()
}

/// Counts a transaction as open for its recipients' domains until dropped.
struct Open {
    state: Arc<Mutex<State>>,
    domains: Vec<String>,
}

impl Open {
    fn new(state: &Arc<Mutex<State>>, recipients: &[String]) -> Open {
        let domains: Vec<String> = recipients.iter().map(|r| domain_of(r)).collect();
        let mut s = state.lock().unwrap();
        for d in &domains {
            let now = {
                let open = s.open.entry(d.clone()).or_default();
                *open += 1;
                *open
            };
            let most = s.most_open.entry(d.clone()).or_default();
            *most = (*most).max(now);
        }
        Open {
            state: state.clone(),
            domains,
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        let mut s = self.state.lock().unwrap();
        for d in &self.domains {
            if let Some(open) = s.open.get_mut(d) {
                *open -= 1;
            }
        }
    }
}

/// One client: plain, STARTTLS (a plain session that hands its socket back for the
/// handshake, then a TLS one) or implicit TLS.
async fn serve(
    stream: TcpStream,
    state: Arc<Mutex<State>>,
    delay: Duration,
    script: Script,
    behaviour: Behaviour,
) {
    let handshake = |tls: Tls, stream: TcpStream| async move {
        let stream = tls.acceptor.accept(stream).await.ok()?;
        Some(stream)
    };
    match behaviour.tls.clone() {
        Some(tls) if tls.implicit => {
            if let Some(stream) = handshake(tls, stream).await {
                state.lock().unwrap().tls_sessions += 1;
                session(stream, state, delay, script, behaviour, true).await;
            }
        }
        Some(tls) => {
            let upgrade = session(
                stream,
                state.clone(),
                delay,
                script.clone(),
                behaviour.clone(),
                false,
            )
            .await;
            if let Some(stream) = upgrade
                && let Some(stream) = handshake(tls, stream).await
            {
                state.lock().unwrap().tls_sessions += 1;
                session(stream, state, delay, script, behaviour, true).await;
            }
        }
        None => {
            session(stream, state, delay, script, behaviour, false).await;
        }
    }
}

/// Speaks SMTP on `stream` until the client leaves; returns the stream when the
/// client asked for STARTTLS and the server offers it.
async fn session<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    state: Arc<Mutex<State>>,
    delay: Duration,
    script: Script,
    behaviour: Behaviour,
    secure: bool,
) -> Option<S> {
    let (read, mut write) = tokio::io::split(stream);
    let mut lines = BufReader::new(read);
    let mut recipients: Vec<String> = Vec::new();
    let mut started = Instant::now();
    let mut planned = Reply::Accept;
    let mut mail_from = String::new();
    let offers_starttls = behaviour.tls.is_some() && !secure;
    // Credentials travel only once the session is encrypted, when it can be.
    let offers_auth = behaviour.login.is_some() && (secure || behaviour.tls.is_none());
    let mut logged_in = false;
    let mut ehlo = String::from("250-test-smtp\r\n250-8BITMIME\r\n");
    if behaviour.pipelining {
        ehlo.push_str("250-PIPELINING\r\n");
    }
    if offers_starttls {
        ehlo.push_str("250-STARTTLS\r\n");
    }
    if offers_auth {
        ehlo.push_str("250-AUTH PLAIN LOGIN\r\n");
    }
    ehlo.push_str("250 SMTPUTF8\r\n");
    // After STARTTLS the client speaks first (EHLO again); otherwise the server greets.
    if (!secure || behaviour.tls.as_ref().is_some_and(|t| t.implicit))
        && write.write_all(b"220 test-smtp ready\r\n").await.is_err()
    {
        return None;
    }
    let mut line = String::new();
    loop {
        line.clear();
        match lines.read_line(&mut line).await {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
        let command = line.trim_end().to_ascii_uppercase();
        let reply: &[u8] = if command.starts_with("EHLO") {
            ehlo.as_bytes()
        } else if command.starts_with("HELO") || command.starts_with("NOOP") {
            b"250 ok\r\n"
        } else if command == "STARTTLS" && offers_starttls {
            if write.write_all(b"220 2.0.0 go ahead\r\n").await.is_err() {
                return None;
            }
            return Some(lines.into_inner().unsplit(write));
        } else if command.starts_with("AUTH ") && offers_auth {
            let words: Vec<&str> = line.split_whitespace().collect();
            let mechanism = words.get(1).map(|m| m.to_ascii_uppercase()).unwrap_or_default();
            let decode = |b64: &str| {
                base64::engine::general_purpose::STANDARD
                    .decode(b64.trim())
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .unwrap_or_default()
            };
            let mut ask = async |prompt: &[u8]| -> Option<String> {
                write.write_all(prompt).await.ok()?;
                let mut answer = String::new();
                lines.read_line(&mut answer).await.ok()?;
                Some(decode(&answer))
            };
            let given = match (mechanism.as_str(), words.get(2)) {
                ("PLAIN", Some(initial)) => {
                    let plain = decode(initial);
                    let mut parts = plain.split('\0').skip(1);
                    parts
                        .next()
                        .zip(parts.next())
                        .map(|(u, p)| (u.to_string(), p.to_string()))
                }
                ("LOGIN", _) => {
                    let user = ask(b"334 VXNlcm5hbWU6\r\n").await?;
                    let password = ask(b"334 UGFzc3dvcmQ6\r\n").await?;
                    Some((user, password))
                }
                _ => None,
            };
            if given.is_some() && given == behaviour.login {
                logged_in = true;
                state.lock().unwrap().logins += 1;
                b"235 2.7.0 authenticated\r\n"
            } else {
                b"535 5.7.8 bad credentials\r\n"
            }
        } else if command.starts_with("MAIL FROM") && behaviour.login.is_some() && !logged_in {
            b"530 5.7.0 authentication required\r\n"
        } else if command.starts_with("MAIL FROM") || command.starts_with("RSET") {
            if command.starts_with("MAIL FROM") && !lines.buffer().is_empty() {
                let mut s = state.lock().unwrap();
                s.pipelined += 1;
                if !behaviour.pipelining {
                    s.unannounced_pipelining += 1;
                }
            }
            recipients.clear();
            started = Instant::now();
            if command.starts_with("MAIL FROM") {
                mail_from = line.trim_end()[10..]
                    .trim()
                    .trim_start_matches('<')
                    .split('>')
                    .next()
                    .unwrap_or_default()
                    .to_string();
            }
            planned = Reply::Accept;
            b"250 ok\r\n"
        } else if command.starts_with("RCPT TO:") {
            let address = line.trim_end()[8..].trim().trim_start_matches('<');
            let address = address.split('>').next().unwrap_or_default().to_string();
            let before = {
                let mut s = state.lock().unwrap();
                let tries = s.tries.entry(address.clone()).or_default();
                *tries += 1;
                *tries - 1
            };
            match script(&address, before) {
                Reply::TempFail => b"451 4.3.0 try again later\r\n",
                Reply::PermFail => b"550 5.1.1 no such user\r\n",
                Reply::Refuse => b"550 5.6.0 refused\r\n",
                Reply::Full => b"452 4.2.2 mailbox full\r\n",
                other => {
                    planned = other;
                    recipients.push(address);
                    b"250 ok\r\n"
                }
            }
        } else if command == "DATA" {
            if recipients.is_empty() {
                b"554 5.5.1 no valid recipients\r\n"
            } else {
                let _open = Open::new(&state, &recipients);
                if write.write_all(b"354 go ahead\r\n").await.is_err() {
                    return None;
                }
                let mut data = String::new();
                loop {
                    line.clear();
                    match lines.read_line(&mut line).await {
                        Ok(0) | Err(_) => return None,
                        Ok(_) => {}
                    }
                    if planned == Reply::DropInData && data.len() > 100 {
                        return None; // closes the connection mid-DATA
                    }
                    if line == ".\r\n" {
                        break;
                    }
                    data.push_str(line.strip_prefix('.').unwrap_or(&line));
                }
                if planned == Reply::Stall {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    return None;
                }
                if planned == Reply::Blocked {
                    recipients.clear();
                    b"554 5.7.1 rejected as spam\r\n"
                } else {
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    state.lock().unwrap().received.push(Received {
                        recipients: std::mem::take(&mut recipients),
                        mail_from: mail_from.clone(),
                        data,
                        started,
                        at: Instant::now(),
                    });
                    b"250 2.0.0 accepted\r\n"
                }
            }
        } else if command.starts_with("QUIT") {
            let _ = write.write_all(b"221 bye\r\n").await;
            return None;
        } else {
            b"502 command not implemented\r\n"
        };
        if write.write_all(reply).await.is_err() {
            return None;
        }
        if behaviour.close_after_message && reply.starts_with(b"250 2.0.0") {
            return None;
        }
    }
}
