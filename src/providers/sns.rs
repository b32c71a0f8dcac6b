//! Amazon SNS deliveries over HTTP(S), which is how SES reports bounces and complaints:
//! the envelope, its signature, and the subscription handshake.
//!
//! A message is authentic when its signature (SignatureVersion 1: SHA1withRSA, 2:
//! SHA256withRSA, over the fields AWS documents) verifies with the public key of its
//! signing certificate, and that certificate was fetched over TLS (verified against the
//! web's roots) from `https://sns.<region>.amazonaws.com/…`: whoever can serve that name
//! is AWS. Messages for topics not configured are refused before anything is fetched.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use serde::Deserialize;

use super::ProviderError;

/// Where signing certificates come from: the web's roots, plus any given here; and
/// host names resolved to fixed addresses. Tests use both (a test CA and 127.0.0.1);
/// a deployment behind an egress proxy with its own CA can too.
#[derive(Clone, Default)]
pub struct CertFetch {
    /// More trusted roots (DER).
    pub extra_roots: Vec<Vec<u8>>,
    /// Host name → address overrides.
    pub resolve: Vec<(String, SocketAddr)>,
}

/// The largest signing certificate read.
const MAX_CERT_BYTES: usize = 64 * 1024;
/// Certificates kept (AWS signs with one per region at a time).
const MAX_CACHED: usize = 32;

/// An SNS HTTP(S) delivery as AWS posts it.
#[derive(Debug, Clone, Deserialize)]
pub struct Envelope {
    #[serde(rename = "Type")]
    pub kind: String,
    #[serde(rename = "MessageId")]
    pub message_id: String,
    #[serde(rename = "TopicArn")]
    pub topic_arn: String,
    #[serde(rename = "Subject", default)]
    pub subject: Option<String>,
    #[serde(rename = "Message")]
    pub message: String,
    #[serde(rename = "Timestamp")]
    pub timestamp: String,
    #[serde(rename = "SignatureVersion")]
    pub signature_version: String,
    #[serde(rename = "Signature")]
    pub signature: String,
    #[serde(rename = "SigningCertURL")]
    pub signing_cert_url: String,
    #[serde(rename = "SubscribeURL", default)]
    pub subscribe_url: Option<String>,
    #[serde(rename = "Token", default)]
    pub token: Option<String>,
}

impl Envelope {
    /// The text AWS signs: the documented fields, in order, each `Name\nvalue\n`.
    pub fn string_to_sign(&self) -> Result<String, ProviderError> {
        let mut fields: Vec<(&str, &str)> = vec![("Message", &self.message), ("MessageId", &self.message_id)];
        match self.kind.as_str() {
            "Notification" => {
                if let Some(subject) = &self.subject {
                    fields.push(("Subject", subject));
                }
            }
            "SubscriptionConfirmation" | "UnsubscribeConfirmation" => {
                let missing =
                    |name: &str| ProviderError::Invalid(format!("an SNS {} without {name}", self.kind));
                fields.push((
                    "SubscribeURL",
                    self.subscribe_url
                        .as_deref()
                        .ok_or_else(|| missing("SubscribeURL"))?,
                ));
                fields.push(("Timestamp", &self.timestamp));
                fields.push(("Token", self.token.as_deref().ok_or_else(|| missing("Token"))?));
                fields.push(("TopicArn", &self.topic_arn));
                fields.push(("Type", &self.kind));
                return Ok(join(&fields));
            }
            other => {
                return Err(ProviderError::Invalid(format!(
                    "unknown SNS message type {other:?}"
                )));
            }
        }
        fields.push(("Timestamp", &self.timestamp));
        fields.push(("TopicArn", &self.topic_arn));
        fields.push(("Type", &self.kind));
        Ok(join(&fields))
    }
}

fn join(fields: &[(&str, &str)]) -> String {
    fields
        .iter()
        .map(|(name, value)| format!("{name}\n{value}\n"))
        .collect()
}

/// Whether `url` is where AWS serves SNS certificates or confirmations:
/// `https://sns.<region>.amazonaws.com[.cn]/…` on the default port, no credentials.
pub fn aws_url(url: &str) -> Result<url::Url, ProviderError> {
    let refuse = |why: &str| ProviderError::Unauthenticated(format!("SNS URL {url:?} refused: {why}"));
    let parsed = url::Url::parse(url).map_err(|_| refuse("not a URL"))?;
    if parsed.scheme() != "https" {
        return Err(refuse("not https"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() || parsed.port().is_some() {
        return Err(refuse("credentials or a port"));
    }
    let host = parsed.host_str().unwrap_or_default();
    let region = host.strip_prefix("sns.").and_then(|h| {
        h.strip_suffix(".amazonaws.com")
            .or_else(|| h.strip_suffix(".amazonaws.com.cn"))
    });
    match region {
        Some(r)
            if !r.is_empty()
                && r.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') =>
        {
            Ok(parsed)
        }
        _ => Err(refuse("not an sns.<region>.amazonaws.com host")),
    }
}

/// A signing certificate's key, and until when it may be used.
struct Key {
    rsa_public_key: Vec<u8>,
    not_after_secs: u64,
}

pub struct Sns {
    topics: Vec<String>,
    http: reqwest::Client,
    keys: Mutex<HashMap<String, Arc<Key>>>,
}

impl Sns {
    pub fn new(topics: Vec<String>, fetch: &CertFetch) -> Result<Sns, ProviderError> {
        crate::client::install_crypto_provider();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        for der in &fetch.extra_roots {
            roots
                .add(rustls::pki_types::CertificateDer::from(der.clone()))
                .map_err(|e| ProviderError::Invalid(format!("a trusted root for SNS certificates: {e}")))?;
        }
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ProviderError::Invalid(format!("TLS: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut builder = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .https_only(true)
            // A redirect could lead anywhere: the URL itself must be AWS's.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10));
        for (host, address) in &fetch.resolve {
            builder = builder.resolve(host, *address);
        }
        let http = builder
            .build()
            .map_err(|e| ProviderError::Invalid(format!("cannot build the SNS HTTP client: {e}")))?;
        Ok(Sns {
            topics,
            http,
            keys: Mutex::new(HashMap::new()),
        })
    }

    /// The envelope in `body`, once its topic is one configured and its signature
    /// verifies. Nothing in it may be trusted before.
    pub async fn verify(&self, body: &[u8]) -> Result<Envelope, ProviderError> {
        let envelope: Envelope = serde_json::from_slice(body)
            .map_err(|e| ProviderError::Invalid(format!("not an SNS message: {e}")))?;
        if !self.topics.contains(&envelope.topic_arn) {
            return Err(ProviderError::Unauthenticated(format!(
                "SNS topic {:?} is not one configured (bounces.ses_topics)",
                envelope.topic_arn
            )));
        }
        let algorithm: &dyn ring::signature::VerificationAlgorithm = match envelope.signature_version.as_str()
        {
            "1" => &ring::signature::RSA_PKCS1_2048_8192_SHA1_FOR_LEGACY_USE_ONLY,
            "2" => &ring::signature::RSA_PKCS1_2048_8192_SHA256,
            other => {
                return Err(ProviderError::Unauthenticated(format!(
                    "SNS SignatureVersion {other:?} is not 1 or 2"
                )));
            }
        };
        let signature = base64::engine::general_purpose::STANDARD
            .decode(envelope.signature.trim())
            .map_err(|_| ProviderError::Unauthenticated("the SNS signature is not base64".into()))?;
        let text = envelope.string_to_sign()?;
        let key = self.key(&envelope.signing_cert_url).await?;
        if key.not_after_secs < crate::domain::now() {
            return Err(ProviderError::Unauthenticated(
                "the SNS signing certificate has expired".into(),
            ));
        }
        ring::signature::UnparsedPublicKey::new(algorithm, &key.rsa_public_key)
            .verify(text.as_bytes(), &signature)
            .map_err(|_| ProviderError::Unauthenticated("the SNS signature does not verify".into()))?;
        Ok(envelope)
    }

    /// Confirms a subscription: visits its SubscribeURL (an AWS one; verified
    /// envelopes only).
    pub async fn confirm(&self, envelope: &Envelope) -> Result<(), ProviderError> {
        let url = aws_url(envelope.subscribe_url.as_deref().unwrap_or_default())?;
        let response = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| ProviderError::Unavailable(format!("confirming the SNS subscription: {e}")))?;
        if !response.status().is_success() {
            return Err(ProviderError::Unavailable(format!(
                "confirming the SNS subscription: AWS answered {}",
                response.status()
            )));
        }
        Ok(())
    }

    async fn key(&self, url: &str) -> Result<Arc<Key>, ProviderError> {
        if let Some(key) = self.keys.lock().unwrap_or_else(|p| p.into_inner()).get(url) {
            return Ok(key.clone());
        }
        let parsed = aws_url(url)?;
        let unavailable = |e: String| {
            ProviderError::Unavailable(format!("fetching the SNS signing certificate {url}: {e}"))
        };
        let response = self
            .http
            .get(parsed)
            .send()
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        if !response.status().is_success() {
            return Err(unavailable(format!("answered {}", response.status())));
        }
        if response
            .content_length()
            .is_some_and(|n| n > MAX_CERT_BYTES as u64)
        {
            return Err(unavailable("too large".into()));
        }
        let pem = response.bytes().await.map_err(|e| unavailable(e.to_string()))?;
        if pem.len() > MAX_CERT_BYTES {
            return Err(unavailable("too large".into()));
        }
        let key = Arc::new(read_certificate(&pem)?);
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if keys.len() >= MAX_CACHED {
            keys.clear();
        }
        keys.insert(url.to_string(), key.clone());
        Ok(key)
    }
}

/// The RSA public key and expiry of a PEM certificate.
fn read_certificate(pem: &[u8]) -> Result<Key, ProviderError> {
    use x509_cert::der::DecodePem;
    let bad = |e: String| ProviderError::Unauthenticated(format!("the SNS signing certificate: {e}"));
    let cert = x509_cert::Certificate::from_pem(pem).map_err(|e| bad(e.to_string()))?;
    let tbs = &cert.tbs_certificate;
    // rsaEncryption: the key is an RSAPublicKey, which ring reads as it is.
    if tbs.subject_public_key_info.algorithm.oid.to_string() != "1.2.840.113549.1.1.1" {
        return Err(bad("not an RSA key".into()));
    }
    Ok(Key {
        rsa_public_key: tbs
            .subject_public_key_info
            .subject_public_key
            .raw_bytes()
            .to_vec(),
        not_after_secs: tbs.validity.not_after.to_unix_duration().as_secs(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_aws_sns_hosts_are_trusted() {
        for good in [
            "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-abc.pem",
            "https://sns.cn-north-1.amazonaws.com.cn/x.pem",
        ] {
            assert!(aws_url(good).is_ok(), "{good}");
        }
        for bad in [
            "http://sns.us-east-1.amazonaws.com/x.pem",
            "https://sns.us-east-1.amazonaws.com.evil.example/x.pem",
            "https://evil.example/sns.us-east-1.amazonaws.com/x.pem",
            "https://sns.us-east-1.amazonaws.com:8443/x.pem",
            "https://user@sns.us-east-1.amazonaws.com/x.pem",
            "https://s3.amazonaws.com/x.pem",
            "https://sns..amazonaws.com/x.pem",
            "https://sns.a_b.amazonaws.com/x.pem",
            "not a url",
        ] {
            assert!(aws_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_signed_text_follows_the_type() {
        let envelope = Envelope {
            kind: "Notification".into(),
            message_id: "m".into(),
            topic_arn: "arn:t".into(),
            subject: None,
            message: "{}".into(),
            timestamp: "2026-12-06T00:00:00.000Z".into(),
            signature_version: "2".into(),
            signature: String::new(),
            signing_cert_url: String::new(),
            subscribe_url: None,
            token: None,
        };
        assert_eq!(
            envelope.string_to_sign().unwrap(),
            "Message\n{}\nMessageId\nm\nTimestamp\n2026-12-06T00:00:00.000Z\nTopicArn\narn:t\nType\nNotification\n"
        );
        let confirmation = Envelope {
            kind: "SubscriptionConfirmation".into(),
            subscribe_url: Some("https://sns/x".into()),
            token: Some("tok".into()),
            ..envelope
        };
        assert_eq!(
            confirmation.string_to_sign().unwrap(),
            "Message\n{}\nMessageId\nm\nSubscribeURL\nhttps://sns/x\nTimestamp\n2026-12-06T00:00:00.000Z\nToken\ntok\nTopicArn\narn:t\nType\nSubscriptionConfirmation\n"
        );
    }
}
