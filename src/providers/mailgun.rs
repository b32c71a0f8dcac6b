//! Mailgun's webhooks (`failed`, `complained`): JSON with a `signature` block, HMAC-
//! SHA256 of timestamp and token under the account's webhook signing key. A timestamp
//! older than 15 minutes, or a token seen before, is a replay and is refused.

use std::collections::HashMap;
use std::sync::Mutex;

use hmac::{Hmac, KeyInit, Mac};
use serde::Deserialize;
use serde_json::Value;
use sha2::Sha256;

use super::{Finding, ProviderError, kind_by_status};
use crate::bounces::{BounceKind, Status};

/// How far a signed timestamp may be from now.
const MAX_SKEW_SECS: u64 = 15 * 60;
/// Tokens remembered against replays (each for `MAX_SKEW_SECS`).
const MAX_TOKENS: usize = 100_000;

pub struct Mailgun {
    key: Vec<u8>,
    /// Token → its timestamp.
    seen: Mutex<HashMap<String, u64>>,
}

#[derive(Deserialize)]
struct Body {
    signature: Signature,
    #[serde(rename = "event-data")]
    event: Value,
}

#[derive(Deserialize)]
struct Signature {
    timestamp: String,
    token: String,
    signature: String,
}

impl Mailgun {
    pub fn new(key: &str) -> Mailgun {
        Mailgun {
            key: key.trim().as_bytes().to_vec(),
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// What an authentic webhook reports.
    pub fn read(&self, body: &[u8]) -> Result<Vec<Finding>, ProviderError> {
        let body: Body = serde_json::from_slice(body)
            .map_err(|e| ProviderError::Invalid(format!("not a Mailgun webhook: {e}")))?;
        self.check(&body.signature)?;
        Ok(findings(&body.event).into_iter().collect())
    }

    fn check(&self, signature: &Signature) -> Result<(), ProviderError> {
        let refuse = |why: &str| ProviderError::Unauthenticated(format!("Mailgun signature refused: {why}"));
        let expected = hex::decode(signature.signature.trim()).map_err(|_| refuse("not hex"))?;
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).map_err(|_| refuse("no key"))?;
        mac.update(signature.timestamp.as_bytes());
        mac.update(signature.token.as_bytes());
        mac.verify_slice(&expected)
            .map_err(|_| refuse("it does not verify"))?;
        let at: u64 = signature
            .timestamp
            .parse()
            .map_err(|_| refuse("a bad timestamp"))?;
        let now = crate::domain::now();
        if at.abs_diff(now) > MAX_SKEW_SECS {
            return Err(refuse("its timestamp is more than 15 minutes off"));
        }
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.len() >= MAX_TOKENS {
            seen.retain(|_, t| t.abs_diff(now) <= MAX_SKEW_SECS);
        }
        if seen.insert(signature.token.clone(), at).is_some() {
            return Err(refuse("its token was used before (a replay)"));
        }
        Ok(())
    }
}

/// A `failed` or `complained` event; others report nothing.
fn findings(event: &Value) -> Option<Finding> {
    let text = |v: &Value| v.as_str().map(str::to_string);
    let email = text(&event["recipient"])?;
    let message_id = text(&event["message"]["headers"]["message-id"]);
    match event["event"].as_str()? {
        "failed" => {
            let delivery = &event["delivery-status"];
            let words = [&delivery["message"], &delivery["description"]]
                .into_iter()
                .filter_map(|v| v.as_str())
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join(" ");
            let status = text(&delivery["enhanced-code"])
                .filter(|s| Status::parse(s).is_some())
                .or_else(|| super::status_in(&words).map(|s| s.to_string()));
            let permanent = event["severity"].as_str() == Some("permanent");
            let fallback = if permanent {
                BounceKind::Hard
            } else {
                BounceKind::Soft
            };
            let code = delivery["code"]
                .as_u64()
                .map(|c| format!("{c} "))
                .unwrap_or_default();
            let reason = event["reason"].as_str().unwrap_or("failed");
            Some(Finding {
                kind: kind_by_status(status.as_deref(), fallback),
                email,
                status,
                diagnostic: Some(format!("Mailgun {reason}: {code}{words}").trim_end().to_string()),
                message_id,
            })
        }
        "complained" => Some(Finding {
            kind: BounceKind::Complaint,
            email,
            status: None,
            diagnostic: Some("Mailgun complaint".into()),
            message_id,
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signed(key: &str, timestamp: u64, token: &str, event: Value) -> Vec<u8> {
        let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).unwrap();
        mac.update(format!("{timestamp}{token}").as_bytes());
        let signature = hex::encode(mac.finalize().into_bytes());
        serde_json::to_vec(&serde_json::json!({
            "signature": { "timestamp": timestamp.to_string(), "token": token, "signature": signature },
            "event-data": event,
        }))
        .unwrap()
    }

    #[test]
    fn signed_events_are_read_and_replays_refused() {
        let mailgun = Mailgun::new("key-1");
        let now = crate::domain::now();
        let failed = serde_json::json!({
            "event": "failed", "severity": "permanent", "reason": "bounce", "recipient": "a@example.org",
            "delivery-status": { "code": 550, "message": "5.1.1 The email account does not exist", "description": "" },
            "message": { "headers": { "message-id": "letterbox.1.2.n@example.com" } },
        });
        let body = signed("key-1", now, "t1", failed.clone());
        let found = mailgun.read(&body).unwrap();
        assert_eq!(found[0].kind, BounceKind::Hard);
        assert_eq!(found[0].status.as_deref(), Some("5.1.1"));
        assert_eq!(
            found[0].diagnostic.as_deref(),
            Some("Mailgun bounce: 550 5.1.1 The email account does not exist")
        );
        assert!(
            matches!(mailgun.read(&body), Err(ProviderError::Unauthenticated(_))),
            "replayed"
        );
        let forged = signed("other-key", now, "t2", failed.clone());
        assert!(matches!(
            mailgun.read(&forged),
            Err(ProviderError::Unauthenticated(_))
        ));
        let stale = signed("key-1", now - 3600, "t3", failed);
        assert!(matches!(
            mailgun.read(&stale),
            Err(ProviderError::Unauthenticated(_))
        ));
        let temporary = serde_json::json!({ "event": "failed", "severity": "temporary", "recipient": "b@example.org",
            "delivery-status": { "code": 452, "message": "4.2.2 mailbox full" } });
        assert_eq!(
            mailgun.read(&signed("key-1", now, "t4", temporary)).unwrap()[0].kind,
            BounceKind::Soft
        );
        let opened = serde_json::json!({ "event": "opened", "recipient": "b@example.org" });
        assert!(
            mailgun
                .read(&signed("key-1", now, "t5", opened))
                .unwrap()
                .is_empty()
        );
    }
}
