//! Secrets, kept in the store so that every node of a fleet agrees on them.
//!
//! Signed unsubscribe tokens: a token names a newsletter and a subscriber and carries an
//! HMAC-SHA256 over both, so `/u/{token}` needs no lookup table and cannot be forged or
//! enumerated. The key is generated at first start and kept in the store: a link made by
//! one node works on every other.
//!
//! The API token: configured, or generated at first start and shown once; only its
//! SHA-256 is kept (in memory, and in the store when generated), so the database does
//! not give it away.
//!
//! Versions before the store kept secrets wrote them to files in the data directory
//! (`unsubscribe.key`, `api-token.sha256`); at the first start after an upgrade those
//! become the stored secrets, so old links and tokens keep working.

use std::path::Path;
use std::sync::Arc;

use crate::store::{Store, StoreError};

use hmac::{KeyInit, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = hmac::Hmac<Sha256>;

/// Bytes of the MAC kept in a token: 128 bits is far beyond guessing range and keeps
/// URLs short.
const MAC_BYTES: usize = 16;

/// The shortest API token accepted from configuration.
pub const MIN_TOKEN_LEN: usize = 16;

/// Why a secret could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{path}: {message}")]
    Legacy { path: String, message: String },
    #[error("{0}")]
    Invalid(String),
}

/// Store names of the secrets.
const UNSUBSCRIBE_KEY: &str = "unsubscribe-key";
const VERP_KEY: &str = "verp-key";
const API_TOKEN_HASH: &str = "api-token-sha256";

fn random_32() -> Result<[u8; 32], SecretError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| SecretError::Invalid(format!("no randomness: {e}")))?;
    Ok(bytes)
}

/// The contents of a secret file an older version wrote, if there is one.
fn legacy(path: Option<&Path>) -> Result<Option<(String, Vec<u8>)>, SecretError> {
    let Some(path) = path else { return Ok(None) };
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some((path.display().to_string(), bytes))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(SecretError::Legacy {
            path: path.display().to_string(),
            message: e.to_string(),
        }),
    }
}

fn exactly_32(bytes: Vec<u8>, what: &str) -> Result<[u8; 32], SecretError> {
    bytes
        .try_into()
        .map_err(|_| SecretError::Invalid(format!("the stored {what} is not 32 bytes")))
}

#[derive(Clone)]
pub struct UnsubscribeKey(Arc<[u8; 32]>);

impl UnsubscribeKey {
    /// The key the store holds. At the first start it is the one in `legacy_file` (written
    /// by an older version), or else fresh random bytes.
    pub async fn load_or_create(
        store: &Store,
        legacy_file: Option<&Path>,
    ) -> Result<UnsubscribeKey, SecretError> {
        let candidate = match legacy(legacy_file)? {
            Some((path, bytes)) => {
                if bytes.len() != 32 {
                    return Err(SecretError::Legacy {
                        path,
                        message: "must hold exactly 32 bytes".into(),
                    });
                }
                bytes
            }
            None => random_32()?.to_vec(),
        };
        let (key, _) = store.secret(UNSUBSCRIBE_KEY, candidate).await?;
        Ok(UnsubscribeKey(Arc::new(exactly_32(key, "unsubscribe key")?)))
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

    /// A double opt-in confirmation link's token for a subscriber, valid until
    /// `expires` (unix seconds). Made with the same key as unsubscribe links, under
    /// another label, so neither kind of token passes for the other.
    pub fn confirm_token(&self, newsletter_id: u64, subscriber_id: u64, expires: u64) -> String {
        let tag = self
            .confirm_mac(newsletter_id, subscriber_id, expires)
            .finalize()
            .into_bytes();
        format!(
            "{newsletter_id}.{subscriber_id}.{expires}.{}",
            hex::encode(&tag[..MAC_BYTES])
        )
    }

    /// The (newsletter id, subscriber id, expiry) a genuine confirmation token names,
    /// expired or not; `None` for anything else.
    pub fn verify_confirm(&self, token: &str) -> Option<(u64, u64, u64)> {
        let mut parts = token.splitn(4, '.');
        let newsletter_id = parts.next()?.parse().ok()?;
        let subscriber_id = parts.next()?.parse().ok()?;
        let expires = parts.next()?.parse().ok()?;
        let tag = hex::decode(parts.next()?).ok()?;
        if tag.len() != MAC_BYTES {
            return None;
        }
        self.confirm_mac(newsletter_id, subscriber_id, expires)
            .verify_truncated_left(&tag)
            .ok()
            .map(|_| (newsletter_id, subscriber_id, expires))
    }

    fn confirm_mac(&self, newsletter_id: u64, subscriber_id: u64, expires: u64) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(self.0.as_slice()).expect("HMAC takes any key length");
        mac.update(b"confirm:");
        mac.update(&newsletter_id.to_be_bytes());
        mac.update(&subscriber_id.to_be_bytes());
        mac.update(&expires.to_be_bytes());
        mac
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

/// Bytes of the MAC in a return path: 64 bits. A forger gets one guess per message it
/// sends to the listener, and a wrong guess changes nothing.
const VERP_MAC_BYTES: usize = 8;

/// The key of VERP return paths (`b-JOB-SUBSCRIBER-MAC@bounce-domain`): each message's
/// envelope sender names its job and subscriber, with a MAC, so a bounce to it says
/// exactly whose it is, and a forged or guessed address is refused.
#[derive(Clone)]
pub struct VerpKey(Arc<[u8; 32]>);

impl VerpKey {
    pub async fn load_or_create(store: &Store) -> Result<VerpKey, SecretError> {
        let (key, _) = store.secret(VERP_KEY, random_32()?.to_vec()).await?;
        Ok(VerpKey(Arc::new(exactly_32(key, "VERP key")?)))
    }

    fn mac(&self, job_id: u64, subscriber_id: u64) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(self.0.as_slice()).expect("HMAC takes any key length");
        mac.update(b"verp:");
        mac.update(&job_id.to_be_bytes());
        mac.update(&subscriber_id.to_be_bytes());
        mac
    }

    /// The return path of job `job_id`'s message to `subscriber_id`. Lower-case digits
    /// only, so an MTA that changes the case of the local part changes nothing.
    pub fn address(&self, job_id: u64, subscriber_id: u64, domain: &str) -> String {
        let tag = self.mac(job_id, subscriber_id).finalize().into_bytes();
        format!(
            "b-{job_id}-{subscriber_id}-{}@{domain}",
            hex::encode(&tag[..VERP_MAC_BYTES])
        )
    }

    /// The (job id, subscriber id) a genuine return path at `domain` names; `None` for
    /// anything else (another domain, a forged or mangled MAC).
    pub fn verify(&self, address: &str, domain: &str) -> Option<(u64, u64)> {
        let (local, at) = address.rsplit_once('@')?;
        if !at.eq_ignore_ascii_case(domain) {
            return None;
        }
        let local = local.to_ascii_lowercase();
        let mut parts = local.strip_prefix("b-")?.splitn(3, '-');
        let job_id = parts.next()?.parse().ok()?;
        let subscriber_id = parts.next()?.parse().ok()?;
        let tag = hex::decode(parts.next()?).ok()?;
        if tag.len() != VERP_MAC_BYTES {
            return None;
        }
        self.mac(job_id, subscriber_id)
            .verify_truncated_left(&tag)
            .ok()
            .map(|_| (job_id, subscriber_id))
    }
}

/// The bearer token every `/v1` request must carry, as its SHA-256.
#[derive(Clone)]
pub struct ApiToken(Arc<[u8; 32]>);

impl ApiToken {
    /// The configured token if there is one; else the one whose hash the store holds
    /// (or `legacy_file`, written by an older version, held); else a new one, whose hash
    /// is stored and which is returned as the second value so it can be shown once. When
    /// several nodes start at once, one token wins and only its node shows it.
    pub async fn load_or_create(
        configured: Option<&str>,
        store: &Store,
        legacy_file: Option<&Path>,
    ) -> Result<(ApiToken, Option<String>), SecretError> {
        if let Some(token) = configured {
            if token.trim().len() < MIN_TOKEN_LEN {
                return Err(SecretError::Invalid(format!(
                    "the API token must be at least {MIN_TOKEN_LEN} characters (LETTERBOX_API_TOKEN)"
                )));
            }
            return Ok((ApiToken::of(token.trim()), None));
        }
        let (candidate, new_token) = match legacy(legacy_file)? {
            Some((path, text)) => {
                let hash: [u8; 32] = hex::decode(String::from_utf8_lossy(&text).trim())
                    .ok()
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| SecretError::Legacy {
                        path,
                        message: "must hold a SHA-256 in hex".into(),
                    })?;
                (hash, None)
            }
            None => {
                let token = format!("lbx_{}", hex::encode(random_32()?));
                (*ApiToken::of(&token).0, Some(token))
            }
        };
        let (hash, stored_now) = store.secret(API_TOKEN_HASH, candidate.to_vec()).await?;
        let api = ApiToken(Arc::new(exactly_32(hash, "API token hash")?));
        Ok((api, new_token.filter(|_| stored_now)))
    }

    fn of(token: &str) -> ApiToken {
        ApiToken(Arc::new(Sha256::digest(token.as_bytes()).into()))
    }

    /// Whether `presented` is the token, compared in constant time.
    pub fn matches(&self, presented: &str) -> bool {
        let hash: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        same_secret(&hash, self.0.as_ref())
    }
}

/// Whether two secrets (or their digests) are equal, in time that depends on their
/// length only, never on where they differ.
pub fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn open_store(dir: &Path) -> Store {
        Store::open(crate::store::Location::Redb(&dir.join("db.redb")))
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn tokens_round_trip_and_resist_tampering() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(dir.path()).await;
        let key = UnsubscribeKey::load_or_create(&store, None).await.unwrap();
        let again = UnsubscribeKey::load_or_create(&store, None).await.unwrap();
        let token = key.token(3, 42);
        assert_eq!(again.verify(&token), Some((3, 42)));
        let forged = token.replacen("3.42.", "3.43.", 1);
        assert_eq!(key.verify(&forged), None);
        assert_eq!(key.verify("3.42.zz"), None);
        assert_eq!(key.verify(""), None);
        // Confirmation tokens carry their expiry under the MAC, and are no unsubscribe
        // tokens (nor the other way round).
        let confirm = key.confirm_token(3, 42, 1_900_000_000);
        assert_eq!(again.verify_confirm(&confirm), Some((3, 42, 1_900_000_000)));
        let later = confirm.replacen(".1900000000.", ".1900000001.", 1);
        assert_eq!(key.verify_confirm(&later), None);
        assert_eq!(key.verify(&confirm), None);
        assert_eq!(key.verify_confirm(&token), None);
    }

    #[tokio::test]
    async fn return_paths_name_their_recipient_and_resist_forgery() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(dir.path()).await;
        let key = VerpKey::load_or_create(&store).await.unwrap();
        let again = VerpKey::load_or_create(&store).await.unwrap();
        let path = key.address(7, 1234, "bounces.example.com");
        assert!(
            path.starts_with("b-7-1234-") && path.ends_with("@bounces.example.com"),
            "{path}"
        );
        assert_eq!(again.verify(&path, "bounces.example.com"), Some((7, 1234)));
        // An MTA may change the case of the address.
        assert_eq!(
            key.verify(&path.to_ascii_uppercase(), "bounces.example.com"),
            Some((7, 1234))
        );
        assert_eq!(key.verify(&path, "other.example.com"), None);
        let forged = path.replacen("b-7-1234-", "b-7-1235-", 1);
        assert_eq!(key.verify(&forged, "bounces.example.com"), None);
        assert_eq!(
            key.verify("b-7-1234-00@bounces.example.com", "bounces.example.com"),
            None
        );
        assert_eq!(
            key.verify("postmaster@bounces.example.com", "bounces.example.com"),
            None
        );
    }

    #[tokio::test]
    async fn secrets_written_by_an_older_version_are_adopted() {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("unsubscribe.key");
        std::fs::write(&key_file, [7u8; 32]).unwrap();
        let hash_file = dir.path().join("api-token.sha256");
        let old_token = "an-old-generated-token";
        std::fs::write(
            &hash_file,
            format!("{}\n", hex::encode(Sha256::digest(old_token))),
        )
        .unwrap();
        let store = open_store(dir.path()).await;
        let key = UnsubscribeKey::load_or_create(&store, Some(&key_file))
            .await
            .unwrap();
        assert_eq!(*key.0, [7u8; 32]);
        let (api, shown) = ApiToken::load_or_create(None, &store, Some(&hash_file))
            .await
            .unwrap();
        assert!(shown.is_none() && api.matches(old_token));
        // Adopted once: the store answers even without the files.
        let key = UnsubscribeKey::load_or_create(&store, None).await.unwrap();
        assert_eq!(*key.0, [7u8; 32]);
        std::fs::write(&key_file, [1u8; 3]).unwrap();
        std::fs::create_dir(dir.path().join("other")).unwrap();
        let fresh = open_store(&dir.path().join("other")).await;
        let err = UnsubscribeKey::load_or_create(&fresh, Some(&key_file))
            .await
            .err()
            .unwrap();
        assert!(err.to_string().contains("exactly 32 bytes"), "{err}");
    }

    #[tokio::test]
    async fn a_generated_api_token_is_shown_once_and_only_its_hash_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(dir.path()).await;
        let (first, shown) = ApiToken::load_or_create(None, &store, None).await.unwrap();
        let token = shown.expect("a new token is returned to be shown");
        assert!(first.matches(&token));
        assert!(!first.matches("lbx_guess"));
        let (stored, _) = store.secret(API_TOKEN_HASH, Vec::new()).await.unwrap();
        assert!(
            !String::from_utf8_lossy(&stored).contains(&token[4..])
                && !hex::encode(&stored).contains(&token[4..]),
            "the store holds the hash, not the token"
        );
        let (again, shown) = ApiToken::load_or_create(None, &store, None).await.unwrap();
        assert!(shown.is_none(), "shown only once");
        assert!(again.matches(&token));
        // A configured token wins, and must not be trivially short.
        let (configured, _) = ApiToken::load_or_create(Some("a-long-enough-token"), &store, None)
            .await
            .unwrap();
        assert!(configured.matches("a-long-enough-token") && !configured.matches(&token));
        assert!(
            ApiToken::load_or_create(Some("short"), &store, None)
                .await
                .is_err()
        );
    }
}
