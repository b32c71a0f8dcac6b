//! Sign-in sessions and CSRF tokens.
//!
//! A session is 32 random bytes, sent to the browser as a cookie (`HttpOnly`,
//! `SameSite=Strict`, `Secure` behind https) and kept in the store as its SHA-256 with an
//! expiry, so the database does not give a session away and signing out ends it on
//! every node. Each form carries a CSRF token: an HMAC of a fixed label under the
//! session's secret, which a page of ours can show but another site can neither read
//! (the cookie is HttpOnly and cross-origin reads are blocked) nor compute.

use std::time::Duration;

use base64::Engine as _;
use hmac::{KeyInit, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = hmac::Hmac<Sha256>;

/// The cookie's name.
pub const COOKIE: &str = "letterbox_session";

/// How long a session lasts from sign-in.
pub const LIFETIME: Duration = Duration::from_secs(12 * 3600);

/// The secret a browser holds.
pub struct SessionSecret([u8; 32]);

impl SessionSecret {
    /// A fresh secret; `None` when the system has no randomness to give.
    pub fn generate() -> Option<SessionSecret> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).ok()?;
        Some(SessionSecret(bytes))
    }

    /// The secret in a cookie's value, if it is one (anything else is no session).
    pub fn parse(value: &str) -> Option<SessionSecret> {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(value.trim())
            .ok()?;
        Some(SessionSecret(bytes.try_into().ok()?))
    }

    /// The cookie's value.
    pub fn cookie_value(&self) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(self.0)
    }

    /// What the store keeps: the hex SHA-256 of the secret.
    pub fn id(&self) -> String {
        hex::encode(Sha256::digest(self.0))
    }

    fn csrf_mac(&self) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(b"letterbox console csrf");
        mac
    }

    /// The token every state-changing request of this session must carry.
    pub fn csrf_token(&self) -> String {
        hex::encode(self.csrf_mac().finalize().into_bytes())
    }

    /// Whether `presented` is this session's CSRF token (compared in constant time).
    pub fn csrf_matches(&self, presented: &str) -> bool {
        match hex::decode(presented.trim()) {
            Ok(bytes) => self.csrf_mac().verify_slice(&bytes).is_ok(),
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_round_trips_and_its_csrf_token_is_its_own() {
        let a = SessionSecret::generate().unwrap();
        let b = SessionSecret::generate().unwrap();
        let read = SessionSecret::parse(&a.cookie_value()).unwrap();
        assert_eq!(read.id(), a.id());
        assert_ne!(a.id(), b.id());
        assert_eq!(a.id().len(), 64);
        assert!(a.csrf_matches(&a.csrf_token()));
        assert!(!a.csrf_matches(&b.csrf_token()));
        assert!(!a.csrf_matches(""));
        assert!(!a.csrf_matches("zz"));
        assert!(SessionSecret::parse("short").is_none());
        assert!(SessionSecret::parse("!!!").is_none());
    }
}
