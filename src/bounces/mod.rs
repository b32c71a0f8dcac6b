//! Hearing back: bounces, complaints and the suppression list. This room owns what a
//! report of one says (`NewBounce`, `Bounce`), how an SMTP reply is classified by its
//! enhanced status code (RFC 3463), the rules that turn reports into suppression
//! (`Rules`, applied by `decide`), and what a suppression is.
//!
//! It knows no database and no HTTP: the store applies `decide` inside the transaction
//! that records a report (so the record, the subscriber's new status and their events
//! commit together, on both backends); `http/bounces.rs` takes reports from the user's
//! pipeline; the runner classifies the rejections it gets while sending. Later steps
//! (the inbound SMTP listener, provider webhooks) only make `NewBounce`s.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::domain::{Subscriber, SubscriberStatus};
use crate::events::NewEvent;

/// What a report says happened to a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BounceKind {
    /// The address does not take mail and will not (no such mailbox or domain).
    Hard,
    /// A passing refusal (mailbox full, ...): suppresses only when it keeps happening.
    Soft,
    /// The recipient reported the message as spam.
    Complaint,
    /// The receiver refused the *sender* (policy, reputation: 5.7.x). Says nothing
    /// about the address, so it never suppresses it; counted per recipient domain.
    Blocked,
    /// Not a bounce (an automatic reply, a delay notice, a message nobody could read):
    /// kept with its evidence, never counted.
    Ignored,
}

impl BounceKind {
    pub const ALL: [BounceKind; 5] = [
        BounceKind::Hard,
        BounceKind::Soft,
        BounceKind::Complaint,
        BounceKind::Blocked,
        BounceKind::Ignored,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BounceKind::Hard => "hard",
            BounceKind::Soft => "soft",
            BounceKind::Complaint => "complaint",
            BounceKind::Blocked => "blocked",
            BounceKind::Ignored => "ignored",
        }
    }
}

/// Where a report came from.
pub mod sources {
    /// `POST /v1/bounces`: the user's own pipeline.
    pub const API: &str = "api";
    /// A rejection during the SMTP transaction of a send.
    pub const SMTP: &str = "smtp";
    /// A message to the inbound listener (`--inbound-smtp`).
    pub const INBOUND: &str = "inbound";
    /// Amazon SES, through an SNS notification.
    pub const SES: &str = "ses";
    /// Mailgun's webhook.
    pub const MAILGUN: &str = "mailgun";
    /// Postmark's webhook.
    pub const POSTMARK: &str = "postmark";
}

/// The longest raw message kept with a report; the rest is cut (and the cut said).
pub const MAX_RAW: usize = 64 * 1024;
/// The longest diagnostic kept.
pub const MAX_DIAGNOSTIC: usize = 2 * 1024;

/// A report before the store records it. The store finds whom it is about: the
/// subscriber named, else the subscriber with `email` in the newsletter named, else
/// every subscriber with `email`. A report about nobody is kept as unattributed.
#[derive(Debug, Clone, PartialEq)]
pub struct NewBounce {
    pub kind: BounceKind,
    pub source: String,
    pub email: String,
    pub newsletter_id: Option<u64>,
    pub subscriber_id: Option<u64>,
    pub job_id: Option<u64>,
    pub letter_id: Option<u64>,
    /// The enhanced status code (`5.1.1`), if the report gave one.
    pub status: Option<String>,
    /// The remote server's words (`550 5.1.1 <ann@…>: user unknown`).
    pub diagnostic: Option<String>,
    /// The report as received (a DSN, a provider's JSON), cut at `MAX_RAW`.
    pub raw: Option<String>,
}

impl NewBounce {
    pub fn new(kind: BounceKind, source: &str, email: impl Into<String>) -> NewBounce {
        NewBounce {
            kind,
            source: source.to_string(),
            email: email.into(),
            newsletter_id: None,
            subscriber_id: None,
            job_id: None,
            letter_id: None,
            status: None,
            diagnostic: None,
            raw: None,
        }
    }

    /// This report as recorded about `subscriber`: their address and newsletter; the
    /// job and letter only for the subscriber it named (a complaint reaches others
    /// with the address, whom that job did not mail).
    pub fn about(&self, subscriber: &Subscriber, named: bool) -> NewBounce {
        let mut mine = self.clone();
        mine.email = subscriber.email.clone();
        mine.newsletter_id = Some(subscriber.newsletter_id);
        if !named {
            (mine.job_id, mine.letter_id) = (None, None);
        }
        mine
    }

    /// This report as answering a message of `job`.
    pub fn answering(mut self, job: &crate::domain::Job) -> NewBounce {
        self.job_id = Some(job.id);
        self.letter_id = Some(job.letter_id);
        self.newsletter_id = Some(job.newsletter_id);
        self
    }

    /// The report as kept, the same on every backend: texts storable
    /// (`domain::storable`: junk carries NUL bytes) and cut to their caps.
    pub fn capped(mut self) -> NewBounce {
        use crate::domain::storable;
        self.diagnostic = self.diagnostic.map(|d| cut(storable(d), MAX_DIAGNOSTIC));
        self.raw = self.raw.map(|r| cut(storable(r), MAX_RAW));
        self.status = self.status.map(storable);
        self.email = storable(self.email);
        self.source = storable(self.source);
        self
    }
}

fn cut(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("\n[cut]");
    }
    text
}

/// A recorded report, about one subscriber (or nobody: unattributed). A report about
/// an address several newsletters share makes one record per subscriber.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Bounce {
    pub id: u64,
    /// When it was recorded (unix milliseconds).
    pub at_ms: u64,
    pub kind: BounceKind,
    /// `api`, `smtp`, ...
    pub source: String,
    /// Empty once the subscriber was erased.
    pub email: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub newsletter_id: Option<u64>,
    /// `None`: nobody in the store has this address (unattributed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscriber_id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub letter_id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diagnostic: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw: Option<String>,
    /// What the rules made of it, in words ("subscriber bounced: hard bounce 5.1.1").
    pub decision: String,
    /// Whether it still counts towards the soft-bounce rule: a reinstatement clears it.
    pub counted: bool,
}

impl Bounce {
    /// The record of `report` about `subscriber_id` (if any), as the rules decided.
    pub fn new(
        id: u64,
        at_ms: u64,
        report: &NewBounce,
        subscriber_id: Option<u64>,
        decision: &Decision,
    ) -> Bounce {
        Bounce {
            id,
            at_ms,
            kind: report.kind,
            source: report.source.clone(),
            email: report.email.clone(),
            newsletter_id: report.newsletter_id,
            subscriber_id,
            job_id: report.job_id,
            letter_id: report.letter_id,
            status: report.status.clone(),
            diagnostic: report.diagnostic.clone(),
            raw: report.raw.clone(),
            decision: decision.words.clone(),
            counted: report.kind == BounceKind::Soft,
        }
    }

    /// The record with nothing personal left (the subscriber was erased).
    pub fn scrubbed(mut self) -> Bounce {
        self.email = String::new();
        self.diagnostic = None;
        self.raw = None;
        self
    }

    /// The suppression-list entry a complaint recorded as this makes, if it names an
    /// address.
    pub fn complaint_suppression(&self) -> Option<NewSuppression> {
        (!self.email.is_empty()).then(|| NewSuppression {
            email: self.email.clone(),
            reason: SuppressionReason::Complained,
            note: None,
            bounce_id: Some(self.id),
        })
    }

    /// `delivery.bounced`, `delivery.complained` or `delivery.blocked`; nothing for a
    /// message that was not a bounce.
    pub fn event(&self) -> Option<NewEvent> {
        let kind = match self.kind {
            BounceKind::Hard | BounceKind::Soft => crate::events::types::DELIVERY_BOUNCED,
            BounceKind::Complaint => crate::events::types::DELIVERY_COMPLAINED,
            BounceKind::Blocked => crate::events::types::DELIVERY_BLOCKED,
            BounceKind::Ignored => return None,
        };
        let mut event = NewEvent::new(kind);
        event.newsletter_id = self.newsletter_id;
        event.subscriber_id = self.subscriber_id;
        event.job_id = self.job_id;
        event.letter_id = self.letter_id;
        let Value::Object(data) = json!({
            "bounce_id": self.id,
            "kind": self.kind,
            "source": self.source,
            "email": self.email,
            "status": self.status,
            "diagnostic": self.diagnostic,
            "decision": self.decision,
        }) else {
            unreachable!("an object literal")
        };
        event.data = data;
        Some(event)
    }
}

/// Which reports suppress, configurable (`[bounces]` in the settings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    /// Soft bounces of one subscriber within `soft_window_ms` that make them `bounced`.
    pub soft_limit: u32,
    pub soft_window_ms: u64,
}

impl Rules {
    /// The earliest time (unix ms) a soft bounce recorded at `at_ms` counts with.
    pub fn soft_since(&self, at_ms: u64) -> u64 {
        at_ms.saturating_sub(self.soft_window_ms)
    }
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            soft_limit: 3,
            soft_window_ms: 7 * 24 * 3_600_000,
        }
    }
}

/// When refusals of the sender (5.7.x) pause a recipient domain on a node: `after`
/// of them within `window` pause that domain's sends for `pause`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockLimit {
    pub after: u32,
    pub window: std::time::Duration,
    pub pause: std::time::Duration,
}

impl Default for BlockLimit {
    fn default() -> Self {
        BlockLimit {
            after: 10,
            window: std::time::Duration::from_secs(600),
            pause: std::time::Duration::from_secs(1800),
        }
    }
}

/// The `[bounces]` settings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BounceSettings {
    pub rules: Rules,
    pub blocks: BlockLimit,
}

/// What the rules make of one report about one subscriber.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The subscriber's new status, if it changes.
    pub status: Option<SubscriberStatus>,
    /// Whether the address goes on the suppression list (every newsletter).
    pub suppress_address: bool,
    pub words: String,
}

/// Applies the rules to a report about `subscriber` (`None`: unattributed).
/// `soft_before` is how many of the subscriber's counted soft bounces fall within the
/// window before this one.
pub fn decide(
    rules: &Rules,
    report: &NewBounce,
    subscriber: Option<&Subscriber>,
    soft_before: u32,
) -> Decision {
    let code = report
        .status
        .as_deref()
        .map(|s| format!(" {s}"))
        .unwrap_or_default();
    let active = subscriber.is_some_and(|s| s.status == SubscriberStatus::Active);
    let mut decision = Decision {
        status: None,
        suppress_address: false,
        words: String::new(),
    };
    let becomes = |status: SubscriberStatus, why: String| match subscriber {
        None => format!("{why}; no subscriber has this address"),
        Some(_) if active => format!("subscriber {}: {why}", status.as_str()),
        Some(s) => format!("{why}; subscriber already {}", s.status.as_str()),
    };
    match report.kind {
        BounceKind::Hard => {
            decision.words = becomes(SubscriberStatus::Bounced, format!("hard bounce{code}"));
            decision.status = active.then_some(SubscriberStatus::Bounced);
        }
        BounceKind::Soft => {
            let count = soft_before + 1;
            let days = rules.soft_window_ms as f64 / 86_400_000.0;
            let within = format!(
                "soft bounce{code}, {count} of {} within {days} days",
                rules.soft_limit
            );
            if count >= rules.soft_limit {
                decision.words = becomes(SubscriberStatus::Bounced, within);
                decision.status = active.then_some(SubscriberStatus::Bounced);
            } else {
                decision.words = within;
            }
        }
        BounceKind::Complaint => {
            decision.suppress_address = true;
            decision.words = becomes(
                SubscriberStatus::Complained,
                "spam complaint: address suppressed in every newsletter".into(),
            );
            // Unsubscribed or bounced people who complain are complained too: the
            // complaint is the stronger statement.
            decision.status = subscriber
                .filter(|s| s.status != SubscriberStatus::Complained)
                .map(|_| SubscriberStatus::Complained);
        }
        BounceKind::Blocked => {
            decision.words = format!(
                "the receiver refused the sender{code} (policy or reputation): not counted against the address"
            );
        }
        BounceKind::Ignored => {
            decision.words = "not a bounce: kept, not counted".into();
        }
    }
    decision
}

/// Why an address is never sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SuppressionReason {
    /// Its owner reported a letter as spam.
    Complained,
    /// The operator put it on the list.
    Manual,
}

impl SuppressionReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SuppressionReason::Complained => "complained",
            SuppressionReason::Manual => "manual",
        }
    }
}

/// An address no newsletter sends to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Suppression {
    pub email: String,
    pub reason: SuppressionReason,
    /// Since when (unix seconds).
    pub since: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// The complaint that put it here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bounce_id: Option<u64>,
}

impl Suppression {
    /// The skip reason a delivery to this address gets.
    pub fn skip_reason(&self) -> String {
        let since = std::time::UNIX_EPOCH + std::time::Duration::from_secs(self.since);
        let mut reason = format!(
            "address suppressed since {}: {}",
            humantime::format_rfc3339_seconds(since),
            self.reason.as_str()
        );
        if let Some(note) = &self.note {
            reason.push_str(&format!(" ({note})"));
        }
        reason
    }
}

/// An address to add to the suppression list.
#[derive(Debug, Clone, PartialEq)]
pub struct NewSuppression {
    /// Already validated.
    pub email: String,
    pub reason: SuppressionReason,
    pub note: Option<String>,
    pub bounce_id: Option<u64>,
}

impl NewSuppression {
    pub fn into_suppression(self, since: u64) -> Suppression {
        Suppression {
            email: self.email,
            reason: self.reason,
            since,
            note: self.note,
            bounce_id: self.bounce_id,
        }
    }
}

/// Which bounces a listing wants.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BounceFilter {
    pub subscriber_id: Option<u64>,
    /// Only those about nobody in the store.
    pub unattributed: bool,
}

impl BounceFilter {
    pub fn matches(&self, bounce: &Bounce) -> bool {
        self.subscriber_id
            .is_none_or(|id| bounce.subscriber_id == Some(id))
            && (!self.unattributed || bounce.subscriber_id.is_none())
    }
}

/// An enhanced status code (RFC 3463): class, subject, detail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    pub class: u8,
    pub subject: u16,
    pub detail: u16,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.class, self.subject, self.detail)
    }
}

impl Status {
    /// `5.1.1` (`class` 2, 4 or 5; each other part at most three digits).
    pub fn parse(text: &str) -> Option<Status> {
        let mut parts = text.split('.');
        let (class, subject, detail) = (parts.next()?, parts.next()?, parts.next()?);
        let number = |s: &str| {
            (!s.is_empty() && s.len() <= 3 && s.bytes().all(|b| b.is_ascii_digit()))
                .then(|| s.parse().ok())
                .flatten()
        };
        let class: u8 = match class {
            "2" => 2,
            "4" => 4,
            "5" => 5,
            _ => return None,
        };
        if parts.next().is_some() {
            return None;
        }
        Some(Status {
            class,
            subject: number(subject)?,
            detail: number(detail)?,
        })
    }

    /// The enhanced status code of an SMTP reply as an error quotes it (`RCPT TO: 550
    /// permanent error (550): 5.1.1 <ann@…>: user unknown`): RFC 2034 puts it first in
    /// the reply's text, of the reply code's class; the first code of a matching class
    /// within a few words after the reply code is taken.
    pub fn in_reply(reply: &str) -> Option<Status> {
        let tokens: Vec<&str> = reply
            .split_whitespace()
            .flat_map(|t| t.split('-'))
            .map(|t| t.trim_matches(|c: char| "():,;[]<>".contains(c)))
            .filter(|t| !t.is_empty())
            .collect();
        let is_code = |t: &str| {
            let b = t.as_bytes();
            b.len() == 3 && matches!(b[0], b'2' | b'4' | b'5') && b.iter().all(u8::is_ascii_digit)
        };
        let at = tokens.iter().position(|t| is_code(t))?;
        let class = tokens[at].as_bytes()[0] - b'0';
        tokens[at + 1..]
            .iter()
            .take(6)
            .filter_map(|t| Status::parse(t))
            .find(|s| s.class == class)
    }

    /// What a refusal with this code says about the address, if anything:
    /// - 5.1.x (bad mailbox, bad domain, null MX 5.1.10) and 5.2.1 (mailbox disabled)
    ///   are hard;
    /// - x.2.2 (mailbox full) is soft;
    /// - 5.7.x (policy, reputation, "rejected as spam") is the sender's problem;
    /// - anything else (protocol, size, routing, 4.x.x but x.2.2) says nothing about
    ///   the address and is a plain failure or a retry.
    pub fn bounce_kind(self) -> Option<BounceKind> {
        match (self.class, self.subject, self.detail) {
            (4 | 5, 2, 2) => Some(BounceKind::Soft),
            (5, 1, _) | (5, 2, 1) => Some(BounceKind::Hard),
            (5, 7, _) => Some(BounceKind::Blocked),
            _ => None,
        }
    }
}

/// The job and subscriber one of our Message-IDs names, if it is genuine: its job is
/// still kept and the nonce matches. A store that fails is an error, never a "no".
pub async fn answered(
    store: &crate::store::Store,
    message_id: &str,
) -> Result<Option<(crate::domain::Job, u64)>, crate::store::StoreError> {
    let Some((job, subscriber, nonce)) = crate::runner::parse_message_id(message_id) else {
        return Ok(None);
    };
    match store.job(job).await {
        Ok(found) if found.message_id_nonce == nonce => Ok(Some((found, subscriber))),
        Ok(_) | Err(crate::store::StoreError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The recipient domain of an address, lower-cased, for counting blocks per domain.
pub fn domain_of(email: &str) -> String {
    email
        .rsplit_once('@')
        .map(|(_, d)| d.to_ascii_lowercase())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(s: &str) -> Status {
        Status::parse(s).unwrap()
    }

    #[test]
    fn enhanced_codes_classify_as_rfc_3463_says() {
        assert_eq!(status("5.1.1").bounce_kind(), Some(BounceKind::Hard));
        assert_eq!(status("5.1.10").bounce_kind(), Some(BounceKind::Hard), "null MX");
        assert_eq!(status("5.2.1").bounce_kind(), Some(BounceKind::Hard));
        assert_eq!(status("5.2.2").bounce_kind(), Some(BounceKind::Soft));
        assert_eq!(status("4.2.2").bounce_kind(), Some(BounceKind::Soft));
        assert_eq!(status("5.7.1").bounce_kind(), Some(BounceKind::Blocked));
        assert_eq!(status("5.7.26").bounce_kind(), Some(BounceKind::Blocked));
        assert_eq!(status("4.7.0").bounce_kind(), None, "a greylisting is retried");
        assert_eq!(status("5.3.4").bounce_kind(), None, "too big: the sender's");
        assert_eq!(status("5.5.2").bounce_kind(), None);
        assert_eq!(status("4.4.1").bounce_kind(), None);
        assert_eq!(status("2.2.2").bounce_kind(), None);
        for bad in ["5.1", "6.1.1", "5.1.1.1", "5..1", "5.1.1000", "x.1.1", ""] {
            assert_eq!(Status::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_code_is_found_in_an_smtp_reply() {
        assert_eq!(
            Status::in_reply("RCPT TO: 550 5.1.1 <ann@example.com>: user unknown"),
            Some(status("5.1.1"))
        );
        assert_eq!(
            Status::in_reply("DATA: 554-5.7.1 rejected as spam"),
            Some(status("5.7.1"))
        );
        assert_eq!(Status::in_reply("RCPT TO: 550 user unknown"), None);
        assert_eq!(Status::in_reply("version 5.1.1 of something said 550"), None);
        assert_eq!(Status::in_reply("DATA: 550 4.2.2 mixed classes"), None);
        assert_eq!(
            Status::in_reply("RCPT TO: 550 permanent error (550): 5.1.1 no such user"),
            Some(status("5.1.1"))
        );
    }

    fn subscriber(status: SubscriberStatus) -> Subscriber {
        Subscriber {
            id: 1,
            newsletter_id: 1,
            email: "ann@example.com".into(),
            name: None,
            attributes: serde_json::Map::new(),
            status,
            created_at: 0,
        }
    }

    #[test]
    fn the_rules_bounce_complain_and_count() {
        let rules = Rules::default();
        let active = subscriber(SubscriberStatus::Active);
        let report = |kind| NewBounce {
            status: Some("5.1.1".into()),
            ..NewBounce::new(kind, sources::API, "ann@example.com")
        };
        let hard = decide(&rules, &report(BounceKind::Hard), Some(&active), 0);
        assert_eq!(hard.status, Some(SubscriberStatus::Bounced));
        assert_eq!(hard.words, "subscriber bounced: hard bounce 5.1.1");
        let soft = decide(&rules, &report(BounceKind::Soft), Some(&active), 1);
        assert_eq!(soft.status, None);
        assert!(soft.words.contains("2 of 3 within 7 days"), "{}", soft.words);
        let third = decide(&rules, &report(BounceKind::Soft), Some(&active), 2);
        assert_eq!(third.status, Some(SubscriberStatus::Bounced));
        let complaint = decide(&rules, &report(BounceKind::Complaint), Some(&active), 0);
        assert_eq!(complaint.status, Some(SubscriberStatus::Complained));
        assert!(complaint.suppress_address);
        let gone = subscriber(SubscriberStatus::Unsubscribed);
        assert_eq!(
            decide(&rules, &report(BounceKind::Complaint), Some(&gone), 0).status,
            Some(SubscriberStatus::Complained)
        );
        assert_eq!(
            decide(&rules, &report(BounceKind::Hard), Some(&gone), 0).status,
            None
        );
        let blocked = decide(&rules, &report(BounceKind::Blocked), Some(&active), 0);
        assert_eq!((blocked.status, blocked.suppress_address), (None, false));
        let nobody = decide(&rules, &report(BounceKind::Complaint), None, 0);
        assert!(
            nobody.suppress_address,
            "an unknown address is suppressed all the same"
        );
    }

    #[test]
    fn raw_reports_are_cut_on_a_char_boundary() {
        let report = NewBounce {
            raw: Some("é".repeat(MAX_RAW)),
            ..NewBounce::new(BounceKind::Hard, sources::API, "a@b")
        }
        .capped();
        let raw = report.raw.unwrap();
        assert!(raw.len() <= MAX_RAW + 6 && raw.ends_with("[cut]"));
    }
}
