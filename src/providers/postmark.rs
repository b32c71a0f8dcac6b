//! Postmark's bounce and spam-complaint webhooks. Postmark does not sign them; its
//! documented protection is HTTP basic auth in the webhook URL
//! (`https://user:password@…/webhooks/postmark`), checked here in constant time.

use base64::Engine;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{Finding, ProviderError, kind_by_status};
use crate::bounces::BounceKind;

pub struct Postmark {
    /// SHA-256 of `user:password`: compared as digests, so in constant time whatever
    /// the lengths.
    credentials: [u8; 32],
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Record {
    #[serde(default)]
    record_type: String,
    #[serde(rename = "Type", default)]
    kind: String,
    email: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    details: Option<String>,
}

impl Postmark {
    pub fn new(user_password: &str) -> Postmark {
        Postmark {
            credentials: Sha256::digest(user_password.as_bytes()).into(),
        }
    }

    /// Whether an `Authorization` header carries the configured credentials.
    pub fn authorized(&self, authorization: Option<&str>) -> Result<(), ProviderError> {
        let presented = authorization
            .and_then(|h| h.strip_prefix("Basic "))
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b.trim()).ok())
            .unwrap_or_default();
        let digest: [u8; 32] = Sha256::digest(&presented).into();
        if crate::tokens::same_secret(&digest, &self.credentials) {
            Ok(())
        } else {
            Err(ProviderError::Unauthenticated(
                "Postmark webhook refused: the URL's user and password (basic auth) do not match".into(),
            ))
        }
    }

    /// What an authorized webhook reports.
    pub fn read(&self, body: &[u8]) -> Result<Vec<Finding>, ProviderError> {
        let record: Record = serde_json::from_slice(body)
            .map_err(|e| ProviderError::Invalid(format!("not a Postmark webhook: {e}")))?;
        let kind_name = if record.record_type == "SpamComplaint" {
            "SpamComplaint"
        } else {
            record.kind.as_str()
        };
        let fallback = match kind_name {
            "HardBounce" | "BadEmailAddress" => BounceKind::Hard,
            "SoftBounce" | "Transient" | "DnsError" => BounceKind::Soft,
            "SpamComplaint" => BounceKind::Complaint,
            "Blocked" | "DMARCPolicy" | "SpamNotification" => BounceKind::Blocked,
            // Auto-responders, challenges, address changes, Postmark's own states:
            // kept, never counted against the address.
            _ => BounceKind::Ignored,
        };
        if !matches!(record.record_type.as_str(), "Bounce" | "SpamComplaint") {
            return Ok(Vec::new());
        }
        let status = record.details.as_deref().and_then(super::status_in);
        let kind = match fallback {
            BounceKind::Hard | BounceKind::Soft => {
                kind_by_status(status.map(|s| s.to_string()).as_deref(), fallback)
            }
            other => other,
        };
        let words: Vec<&str> = [record.description.as_deref(), record.details.as_deref()]
            .into_iter()
            .flatten()
            .filter(|s| !s.is_empty())
            .collect();
        Ok(vec![Finding {
            kind,
            email: record.email,
            status: status.map(|s| s.to_string()),
            diagnostic: Some(
                format!("Postmark {kind_name}: {}", words.join(" "))
                    .trim_end()
                    .to_string(),
            ),
            message_id: None,
        }])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_auth_and_types() {
        let postmark = Postmark::new("hooks:s3cret");
        let good = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("hooks:s3cret")
        );
        assert!(postmark.authorized(Some(&good)).is_ok());
        let bad = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("hooks:guess")
        );
        assert!(postmark.authorized(Some(&bad)).is_err());
        assert!(postmark.authorized(None).is_err());
        let hard = br#"{"RecordType":"Bounce","Type":"HardBounce","TypeCode":1,"Email":"a@example.org",
            "Description":"The server was unable to deliver your message (ex: unknown user, mailbox not found).",
            "Details":"smtp;550 5.1.1 The email account that you tried to reach does not exist."}"#;
        let found = postmark.read(hard).unwrap();
        assert_eq!(
            (found[0].kind, found[0].status.as_deref()),
            (BounceKind::Hard, Some("5.1.1"))
        );
        let auto = br#"{"RecordType":"Bounce","Type":"AutoResponder","Email":"b@example.org","Details":"I am away"}"#;
        assert_eq!(postmark.read(auto).unwrap()[0].kind, BounceKind::Ignored);
        let spam = br#"{"RecordType":"SpamComplaint","Type":"SpamComplaint","Email":"c@example.org"}"#;
        assert_eq!(postmark.read(spam).unwrap()[0].kind, BounceKind::Complaint);
        let open = br#"{"RecordType":"Open","Email":"c@example.org"}"#;
        assert!(postmark.read(open).unwrap().is_empty());
    }
}
