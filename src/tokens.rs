//! Secrets kept in the data directory.
//!
//! Signed unsubscribe tokens: a token names a newsletter and a subscriber and carries an
//! HMAC-SHA256 over both, so `/u/{token}` needs no lookup table and cannot be forged or
//! enumerated. The key is generated at first start and kept in the data directory.
//!
//! The API token: configured, or generated at first start and shown once; only its
//! SHA-256 is kept (in memory, and on disk when generated), so the data directory does
//! not give it away.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use hmac::{KeyInit, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = hmac::Hmac<Sha256>;

/// Bytes of the MAC kept in a token: 128 bits is far beyond guessing range and keeps
/// URLs short.
const MAC_BYTES: usize = 16;

/// The shortest API token accepted from configuration.
pub const MIN_TOKEN_LEN: usize = 16;

#[derive(Clone)]
pub struct UnsubscribeKey(Arc<[u8; 32]>);

impl UnsubscribeKey {
    /// Reads the key from `path`, creating it (mode 0600) with fresh random bytes if absent.
    pub fn load_or_create(path: &Path) -> std::io::Result<UnsubscribeKey> {
        match std::fs::read(path) {
            Ok(bytes) => {
                let key: [u8; 32] = bytes.try_into().map_err(|_| {
                    std::io::Error::other(format!("{} must hold exactly 32 bytes", path.display()))
                })?;
                Ok(UnsubscribeKey(Arc::new(key)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                getrandom::fill(&mut key).map_err(|e| std::io::Error::other(e.to_string()))?;
                let mut options = std::fs::OpenOptions::new();
                options.write(true).create_new(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
                let mut file = options.open(path)?;
                file.write_all(&key)?;
                file.sync_all()?;
                Ok(UnsubscribeKey(Arc::new(key)))
            }
            Err(e) => Err(e),
        }
    }

    fn mac(&self, newsletter_id: u64, subscriber_id: u64) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(self.0.as_slice()).expect("HMAC takes any key length");
        mac.update(b"unsubscribe:");
        mac.update(&newsletter_id.to_be_bytes());
        mac.update(&subscriber_id.to_be_bytes());
        mac
    }

    pub fn token(&self, newsletter_id: u64, subscriber_id: u64) -> String {
        let tag = self.mac(newsletter_id, subscriber_id).finalize().into_bytes();
        format!(
            "{newsletter_id}.{subscriber_id}.{}",
            hex::encode(&tag[..MAC_BYTES])
        )
    }

    /// The (newsletter id, subscriber id) a genuine token names; `None` for anything else.
    pub fn verify(&self, token: &str) -> Option<(u64, u64)> {
        let mut parts = token.splitn(3, '.');
        let newsletter_id = parts.next()?.parse().ok()?;
        let subscriber_id = parts.next()?.parse().ok()?;
        let tag = hex::decode(parts.next()?).ok()?;
        if tag.len() != MAC_BYTES {
            return None;
        }
        // Constant-time comparison of the truncated tag.
        self.mac(newsletter_id, subscriber_id)
            .verify_truncated_left(&tag)
            .ok()
            .map(|_| (newsletter_id, subscriber_id))
    }
}

/// The bearer token every `/v1` request must carry, as its SHA-256.
#[derive(Clone)]
pub struct ApiToken(Arc<[u8; 32]>);

impl ApiToken {
    /// The configured token if there is one; else the one whose hash `path` holds; else a
    /// new one, whose hash is written to `path` (mode 0600) and which is returned as the
    /// second value so it can be shown once.
    pub fn load_or_create(
        configured: Option<&str>,
        path: &Path,
    ) -> std::io::Result<(ApiToken, Option<String>)> {
        if let Some(token) = configured {
            if token.trim().len() < MIN_TOKEN_LEN {
                return Err(std::io::Error::other(format!(
                    "the API token must be at least {MIN_TOKEN_LEN} characters (LETTERBOX_API_TOKEN)"
                )));
            }
            return Ok((ApiToken::of(token.trim()), None));
        }
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let hash: [u8; 32] = hex::decode(text.trim())
                    .ok()
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| {
                        std::io::Error::other(format!("{} must hold a SHA-256 in hex", path.display()))
                    })?;
                Ok((ApiToken(Arc::new(hash)), None))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut secret = [0u8; 32];
                getrandom::fill(&mut secret).map_err(|e| std::io::Error::other(e.to_string()))?;
                let token = format!("lbx_{}", hex::encode(secret));
                let api = ApiToken::of(&token);
                let mut options = std::fs::OpenOptions::new();
                options.write(true).create_new(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
                let mut file = options.open(path)?;
                writeln!(file, "{}", hex::encode(api.0.as_slice()))?;
                file.sync_all()?;
                Ok((api, Some(token)))
            }
            Err(e) => Err(e),
        }
    }

    fn of(token: &str) -> ApiToken {
        ApiToken(Arc::new(Sha256::digest(token.as_bytes()).into()))
    }

    /// Whether `presented` is the token, compared in constant time.
    pub fn matches(&self, presented: &str) -> bool {
        let hash: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        hash.iter()
            .zip(self.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_resist_tampering() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        let key = UnsubscribeKey::load_or_create(&path).unwrap();
        let again = UnsubscribeKey::load_or_create(&path).unwrap();
        let token = key.token(3, 42);
        assert_eq!(again.verify(&token), Some((3, 42)));
        let forged = token.replacen("3.42.", "3.43.", 1);
        assert_eq!(key.verify(&forged), None);
        assert_eq!(key.verify("3.42.zz"), None);
        assert_eq!(key.verify(""), None);
    }

    #[test]
    fn a_generated_api_token_is_shown_once_and_only_its_hash_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api-token.sha256");
        let (first, shown) = ApiToken::load_or_create(None, &path).unwrap();
        let token = shown.expect("a new token is returned to be shown");
        assert!(first.matches(&token));
        assert!(!first.matches("lbx_guess"));
        let stored = std::fs::read_to_string(&path).unwrap();
        assert!(
            !stored.contains(&token[4..]),
            "the file holds the hash, not the token"
        );
        let (again, shown) = ApiToken::load_or_create(None, &path).unwrap();
        assert!(shown.is_none(), "shown only once");
        assert!(again.matches(&token));
        // A configured token wins, and must not be trivially short.
        let (configured, _) = ApiToken::load_or_create(Some("a-long-enough-token"), &path).unwrap();
        assert!(configured.matches("a-long-enough-token") && !configured.matches(&token));
        assert!(ApiToken::load_or_create(Some("short"), &path).is_err());
    }
}
