//! Bounce and complaint reports from email providers' webhooks: Amazon SES (through
//! SNS), Mailgun and Postmark. This room owns each provider's authentication (the SNS
//! message signature checked against its signing certificate, Mailgun's HMAC, Postmark's
//! basic auth) and reading its payload into `Finding`s; nothing is recorded before the
//! request is authenticated. Recording goes through `store::Bounces` like every other
//! report (`record`), attributed by the Message-ID of the letter when the provider
//! quotes it, else by address.
//!
//! It knows no HTTP framework: `http/providers.rs` hands it the headers it needs and the
//! body. It fetches SNS signing certificates itself (reqwest), over TLS, from
//! `amazonaws.com` hosts only.

mod mailgun;
mod postmark;
mod ses;
mod sns;

use std::sync::Arc;

use crate::bounces::{Bounce, BounceKind, NewBounce, Rules};
use crate::store::{Store, StoreError};

pub use mailgun::Mailgun;
pub use postmark::Postmark;
pub use sns::{CertFetch, Sns};

/// How each provider's webhooks are authenticated; a provider left out is off (its
/// endpoint answers 404).
#[derive(Clone, Default)]
pub struct ProviderSettings {
    /// The SNS topics (ARNs) whose notifications are accepted.
    pub ses_topics: Vec<String>,
    /// Mailgun's HTTP webhook signing key.
    pub mailgun_signing_key: Option<String>,
    /// `user:password` Postmark's webhook URL carries (basic auth).
    pub postmark_auth: Option<String>,
    /// Where SNS signing certificates are fetched from and which roots are trusted.
    pub sns_fetch: CertFetch,
}

impl std::fmt::Debug for ProviderSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderSettings")
            .field("ses_topics", &self.ses_topics)
            .field(
                "mailgun_signing_key",
                &self.mailgun_signing_key.as_ref().map(|_| "<secret>"),
            )
            .field("postmark_auth", &self.postmark_auth.as_ref().map(|_| "<secret>"))
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The provider is not configured: its endpoint does not exist.
    #[error("{0}")]
    Off(&'static str),
    /// The request is not from the provider: a signature or credentials that do not
    /// check out. Nothing was recorded.
    #[error("{0}")]
    Unauthenticated(String),
    /// Authentic (or not yet checked) but not something we can read.
    #[error("{0}")]
    Invalid(String),
    /// The signing certificate could not be fetched: try again later.
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One bounce or complaint a provider reported.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    pub kind: BounceKind,
    pub email: String,
    pub status: Option<String>,
    pub diagnostic: Option<String>,
    /// The Message-ID of the letter it answers, when the provider quotes it.
    pub message_id: Option<String>,
}

/// The providers' verifiers, built once from the settings.
#[derive(Clone)]
pub struct Providers {
    pub sns: Option<Arc<Sns>>,
    pub mailgun: Option<Arc<Mailgun>>,
    pub postmark: Option<Arc<Postmark>>,
}

impl Providers {
    pub fn new(settings: &ProviderSettings) -> Result<Providers, ProviderError> {
        Ok(Providers {
            sns: (!settings.ses_topics.is_empty())
                .then(|| Sns::new(settings.ses_topics.clone(), &settings.sns_fetch))
                .transpose()?
                .map(Arc::new),
            mailgun: settings
                .mailgun_signing_key
                .as_deref()
                .map(|k| Arc::new(Mailgun::new(k))),
            postmark: settings
                .postmark_auth
                .as_deref()
                .map(|a| Arc::new(Postmark::new(a))),
        })
    }
}

/// What an authentic SNS delivery from SES reports, with the SES notification to keep
/// as its raw form. A subscription request is confirmed (and reports nothing).
pub async fn ses(sns: &Sns, body: &[u8]) -> Result<(Vec<Finding>, String), ProviderError> {
    let envelope = sns.verify(body).await?;
    match envelope.kind.as_str() {
        "SubscriptionConfirmation" => {
            sns.confirm(&envelope).await?;
            tracing::info!(topic = %envelope.topic_arn, "SNS subscription confirmed");
            Ok((Vec::new(), String::new()))
        }
        "UnsubscribeConfirmation" => {
            tracing::warn!(topic = %envelope.topic_arn, "SNS unsubscribed this endpoint: SES reports stop");
            Ok((Vec::new(), String::new()))
        }
        _ => Ok((ses::read(&envelope.message)?, envelope.message)),
    }
}

/// Records what a provider reported, each finding attributed by its Message-ID when it
/// is one of ours (its job's nonce checked), else by address. `raw` is kept with each.
pub async fn record(
    store: &Store,
    rules: Rules,
    source: &str,
    findings: Vec<Finding>,
    raw: &str,
) -> Result<Vec<Bounce>, StoreError> {
    let mut recorded = Vec::new();
    for finding in findings {
        let mut report = NewBounce::new(finding.kind, source, finding.email);
        report.status = finding.status;
        report.diagnostic = finding.diagnostic;
        report.raw = Some(raw.to_string());
        if let Some(id) = finding.message_id.as_deref()
            && let Some((job, subscriber)) = crate::bounces::answered(store, id).await?
        {
            report.subscriber_id = Some(subscriber);
            report = report.answering(&job);
        }
        recorded.extend(store.record_bounce(report, rules).await?);
    }
    Ok(recorded)
}

/// The kind an enhanced status code says, with `fallback` for one that says nothing
/// more precise (or none).
fn kind_by_status(status: Option<&str>, fallback: BounceKind) -> BounceKind {
    status
        .and_then(crate::bounces::Status::parse)
        .and_then(|s| s.bounce_kind())
        .filter(|kind| *kind != BounceKind::Hard || fallback == BounceKind::Hard)
        .unwrap_or(fallback)
}

/// The enhanced status code in a provider's words: after a reply code
/// (`smtp;550 5.1.1 …`, `550 5.1.1 …`), or opening them (`5.1.1 The account …`).
fn status_in(text: &str) -> Option<crate::bounces::Status> {
    use crate::bounces::Status;
    let text = text.replace(';', " ");
    Status::in_reply(&text).or_else(|| {
        text.split_whitespace()
            .take(3)
            .filter_map(Status::parse)
            .find(|s| s.class == 4 || s.class == 5)
    })
}
