//! Server configuration, as `run` receives it. `main.rs` builds it from flags and
//! `LETTERBOX_*` environment variables; tests build it directly.

use std::path::PathBuf;
use std::time::Duration;

use crate::mail::SmtpSettings;
use crate::policy::PolicyLimits;
use crate::runner::FailureLimit;

#[derive(Debug, Clone)]
pub struct Config {
    /// Holds `letterbox.redb`, `unsubscribe.key` and (without SMTP) `outbox/`.
    pub data_dir: PathBuf,
    /// Deliver over SMTP; `None` writes `.eml` files to `data_dir/outbox`.
    pub smtp: Option<SmtpSettings>,
    /// Deliveries in flight per job unless the send request says otherwise.
    pub concurrency: u32,
    /// Base URL the public `/u/{token}` links use; defaults to `http://` + the listen
    /// address.
    pub public_url: Option<String>,
    pub policy_limits: PolicyLimits,
    /// More policy failures than this within its window pause a job.
    pub policy_failures: FailureLimit,
}

impl Config {
    pub fn new(data_dir: impl Into<PathBuf>) -> Config {
        Config {
            data_dir: data_dir.into(),
            smtp: None,
            concurrency: 16,
            public_url: None,
            policy_limits: PolicyLimits::default(),
            policy_failures: FailureLimit::default(),
        }
    }

    /// SMTP settings for `url` with the defaults used by `serve`.
    pub fn smtp_url(url: impl Into<String>) -> SmtpSettings {
        SmtpSettings {
            url: url.into(),
            username: None,
            password: None,
            pool_size: 32,
            timeout: Duration::from_secs(30),
        }
    }
}
