//! The one HTTP client webhooks are sent with, guarded against SSRF: a webhook URL is
//! the user's, but the request comes from inside the user's network, so it must not be
//! a way to reach what only the server can (the cloud's metadata service, a database's
//! HTTP port, a router's admin page).
//!
//! - The address connected to is checked, not the name: reqwest asks our resolver,
//!   which drops loopback, private, link-local (metadata), shared, multicast and
//!   reserved addresses, so the connection can only go to an address that passed. A
//!   name that resolves to a public address when it is checked and to 127.0.0.1 when
//!   it is used (DNS rebinding) gains nothing: there is one resolution, and it is the
//!   one checked. A URL whose host is an address literal is checked before sending
//!   (no resolver sees it).
//! - No proxy from the environment (it would connect elsewhere), no redirects (a
//!   public endpoint could send us to a private one), a time limit on the whole
//!   exchange, and only the first `RESPONSE_CAP` bytes of an answer read.
//! - `--webhook-allow-private` turns the address check off, for tests and receivers on
//!   the user's own network; nothing else is relaxed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

use super::model::{AttemptResult, RESPONSE_CAP};
use crate::domain::now_ms;

/// The longest URL an endpoint may have.
const MAX_URL: usize = 2048;

/// Why an address is not one webhooks may reach; `None` for a public one.
pub fn forbidden(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => forbidden_v6(v6),
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    Some(match (a, b, c) {
        (127, ..) => "loopback",
        (10, ..) | (172, 16..=31, _) | (192, 168, _) => "private",
        (169, 254, _) => "link-local (cloud metadata services live there)",
        (0, ..) => "\"this network\"",
        (100, 64..=127, _) => "shared (carrier-grade NAT)",
        (192, 0, 0) => "IETF protocol assignment",
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => "documentation",
        (198, 18..=19, _) => "benchmarking",
        (224..=239, ..) => "multicast",
        (240..=255, ..) => "reserved or broadcast",
        _ => return None,
    })
}

fn forbidden_v6(ip: Ipv6Addr) -> Option<&'static str> {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return forbidden_v4(v4);
    }
    let s = ip.segments();
    // An IPv4 address carried in IPv6 (NAT64, 6to4) is judged as that address.
    if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
        return forbidden_v4(Ipv4Addr::new(
            (s[6] >> 8) as u8,
            s[6] as u8,
            (s[7] >> 8) as u8,
            s[7] as u8,
        ));
    }
    if s[0] == 0x2002 {
        return forbidden_v4(Ipv4Addr::new(
            (s[1] >> 8) as u8,
            s[1] as u8,
            (s[2] >> 8) as u8,
            s[2] as u8,
        ));
    }
    Some(match s[0] {
        _ if ip.is_loopback() => "loopback",
        _ if ip.is_unspecified() => "unspecified",
        // ::/96, the deprecated IPv4-compatible form, and the rest of ::/8.
        0..=0x00ff => "reserved",
        0xfc00..=0xfdff => "private (unique local)",
        0xfe80..=0xfebf => "link-local",
        0xfec0..=0xfeff => "site-local",
        0xff00..=0xffff => "multicast",
        0x2001 if s[1] == 0x0db8 => "documentation",
        _ => return None,
    })
}

/// Checks an endpoint URL as the API takes it: http or https, a host, not too long,
/// and (unless private addresses are allowed) no forbidden address literal. A name is
/// checked when it is used (see the module's note).
pub fn check_url(text: &str, allow_private: bool) -> Result<url::Url, String> {
    if text.len() > MAX_URL {
        return Err(format!("a webhook URL is at most {MAX_URL} characters"));
    }
    let url = url::Url::parse(text).map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("a webhook URL is http or https, not {}", url.scheme()));
    }
    let literal = match url.host() {
        None => return Err("a webhook URL needs a host".into()),
        Some(url::Host::Domain(_)) => None,
        Some(url::Host::Ipv4(v4)) => Some(IpAddr::V4(v4)),
        Some(url::Host::Ipv6(v6)) => Some(IpAddr::V6(v6)),
    };
    if let Some(ip) = literal
        && !allow_private
        && let Some(why) = forbidden(ip)
    {
        return Err(refusal(&ip.to_string(), ip, why));
    }
    Ok(url)
}

fn refusal(host: &str, ip: IpAddr, why: &str) -> String {
    let is = if host == ip.to_string() {
        format!("{ip} is")
    } else {
        format!("{host} resolves to {ip},")
    };
    format!("{is} a {why} address, which webhooks may not reach (--webhook-allow-private allows it)")
}

/// The resolver reqwest connects through: the system's answer, less what is forbidden.
struct Guarded;

impl Resolve for Guarded {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut refused = None;
            let allowed: Vec<SocketAddr> = found
                .into_iter()
                .filter(|a| match forbidden(a.ip()) {
                    Some(why) => {
                        refused.get_or_insert((a.ip(), why));
                        false
                    }
                    None => true,
                })
                .collect();
            match (allowed.is_empty(), refused) {
                (true, Some((ip, why))) => Err(refusal(&host, ip, why).into()),
                (true, None) => Err(format!("{host} has no address").into()),
                (false, _) => Ok(Box::new(allowed.into_iter()) as Addrs),
            }
        })
    }
}

/// Sends webhook requests.
pub struct Deliverer {
    client: reqwest::Client,
    allow_private: bool,
}

impl Deliverer {
    /// `timeout` bounds a whole exchange, connection to the last byte read.
    pub fn new(allow_private: bool, timeout: Duration) -> Deliverer {
        crate::client::install_crypto_provider();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut builder = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .timeout(timeout)
            .user_agent(concat!("letterbox-webhooks/", env!("CARGO_PKG_VERSION")));
        if !allow_private {
            builder = builder.dns_resolver(Guarded);
        }
        let client = builder.build().expect("a webhook client with these settings");
        Deliverer {
            client,
            allow_private,
        }
    }

    /// POSTs `body` to `url` with `headers`; what came of it.
    pub async fn post(&self, url: &str, headers: &[(&str, String)], body: Vec<u8>) -> AttemptResult {
        let at_ms = now_ms();
        let started = Instant::now();
        let failed = |error: String| AttemptResult {
            at_ms,
            ok: false,
            status: None,
            latency_ms: started.elapsed().as_millis() as u64,
            response: None,
            error: Some(error),
        };
        // Checked again as it is used: the rules may have changed since it was stored.
        if let Err(why) = check_url(url, self.allow_private) {
            return failed(why);
        }
        let mut request = self
            .client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let mut response = match request.send().await {
            Ok(r) => r,
            Err(e) => return failed(chain(&e)),
        };
        let latency_ms = started.elapsed().as_millis() as u64;
        let status = response.status();
        let mut kept = Vec::new();
        let mut error = None;
        while kept.len() < RESPONSE_CAP {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    kept.extend_from_slice(&chunk[..chunk.len().min(RESPONSE_CAP - kept.len())])
                }
                Ok(None) => break,
                Err(e) => {
                    // The status came: the answer counts, with what was read of it.
                    error = Some(format!("reading the answer: {}", chain(&e)));
                    break;
                }
            }
        }
        AttemptResult {
            at_ms,
            ok: status.is_success(),
            status: Some(status.as_u16()),
            latency_ms,
            response: (!kept.is_empty()).then(|| String::from_utf8_lossy(&kept).into_owned()),
            error,
        }
    }
}

/// An error with its causes: reqwest's own text is often only "error sending request".
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_and_special_addresses_are_refused() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.20.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.100.100.200",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::",
            "fd00:ec2::254",
            "fe80::1",
            "ff02::1",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert!(forbidden(ip).is_some(), "{ip} should be refused");
        }
        for ip in [
            "93.184.215.14",
            "8.8.8.8",
            "172.32.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(forbidden(ip), None, "{ip} is public");
        }
    }

    #[test]
    fn urls_are_checked_for_scheme_host_and_address_literals() {
        assert!(check_url("https://hooks.example.com/x?y=1", false).is_ok());
        assert!(check_url("http://93.184.215.14:8080/", false).is_ok());
        let why = check_url("http://169.254.169.254/latest/meta-data/", false).unwrap_err();
        assert!(
            why.contains("link-local") && why.contains("--webhook-allow-private"),
            "{why}"
        );
        assert!(
            check_url("http://[::1]:9000/", false)
                .unwrap_err()
                .contains("loopback")
        );
        assert!(check_url("http://127.0.0.1:9000/", true).is_ok());
        assert!(
            check_url("ftp://example.com/", false)
                .unwrap_err()
                .contains("http or https")
        );
        assert!(check_url("not a url", false).unwrap_err().contains("not a URL"));
        assert!(check_url(&format!("https://example.com/{}", "a".repeat(3000)), false).is_err());
    }

    #[tokio::test]
    async fn a_name_that_resolves_to_loopback_is_refused_when_used() {
        let deliverer = Deliverer::new(false, Duration::from_secs(5));
        let result = deliverer
            .post("http://localhost:9/hook", &[], b"{}".to_vec())
            .await;
        assert!(!result.ok);
        let error = result.error.unwrap();
        assert!(
            error.contains("localhost resolves to") && error.contains("loopback"),
            "{error}"
        );
    }
}
