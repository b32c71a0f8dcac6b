//! Double opt-in: the public subscribe form's request, the confirmation link it mails,
//! and the confirmation.
//!
//! A request makes (or finds) the subscriber and, when they are not active, queues a
//! confirmation message: a one-off message (`crate::messages`) marked as one, so it is
//! the only thing sent to a subscriber who is `unconfirmed`. Its link is signed
//! (`tokens::UnsubscribeKey::confirm_token`, expiry under the MAC). Confirming makes
//! the subscriber active with `subscriber.confirmed`; an unconfirmed subscriber whose
//! link has expired is erased by the runner's housekeeping. Every request gets the same
//! answer whatever the address's state, so the form says nothing about who is on a list.
//!
//! It knows no HTTP (`http/subscribe.rs` is the edge) and no database (the store is).

use serde_json::json;

use crate::domain::{SubscriberPatch, SubscriberStatus, now};
use crate::messages::{MessageContent, NewMessage, one_off_message_id};
use crate::policy::builtin::DEFAULT_TEMPLATE_NAME;
use crate::runner::{Runner, RunnerError};
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum OptinError {
    /// The address (or name) is not one that can be subscribed.
    #[error("{0}")]
    Invalid(String),
    #[error("there is no newsletter {0}")]
    NoNewsletter(u64),
    /// Not a link letterbox made (or its subscriber is gone).
    #[error("unknown or invalid confirmation link")]
    UnknownLink,
    #[error("this confirmation link has expired: subscribe again to get a new one")]
    Expired,
    /// The address bounced or complained: it is not subscribed again by a link.
    #[error("this address cannot be subscribed")]
    Refused,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Runner(#[from] RunnerError),
}

/// What a confirmation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confirmed {
    /// The subscriber is active from now on.
    Now,
    /// They were active already (the link followed twice): nothing changed.
    Already,
}

/// The subject and text of the confirmation message, rendered by the built-in template
/// (`params.newsletter`, `params.confirm_url`).
const SUBJECT: &str = "Confirm your subscription to {{ params.newsletter }}";
const TEXT: &str = "Hello,\n\nplease confirm that you want to receive {{ params.newsletter }}:\n\n\
                    {{ params.confirm_url }}\n\nIf you did not ask for it, ignore this message: \
                    you will not hear from us again.\n";

/// A subscribe request from the public form. `Ok` whatever the address's state (the
/// caller answers every request alike); a confirmation is queued when the subscriber
/// is new, unconfirmed, or unsubscribed and asking again.
pub async fn request(
    store: &Store,
    runner: &Runner,
    newsletter_id: u64,
    email: &str,
    name: Option<&str>,
) -> Result<(), OptinError> {
    let new = crate::import::subscriber(email, name, Default::default()).map_err(OptinError::Invalid)?;
    let newsletter = match store.newsletter(newsletter_id).await {
        Ok(n) => n,
        Err(StoreError::NotFound { .. }) => return Err(OptinError::NoNewsletter(newsletter_id)),
        Err(e) => return Err(e.into()),
    };
    let (subscriber, _) = store.subscribe_unconfirmed(newsletter_id, new).await?;
    let expires = match subscriber.status {
        // The link lasts as long as the unconfirmed subscriber does.
        SubscriberStatus::Unconfirmed => subscriber.created_at + runner.confirm_within().as_secs(),
        SubscriberStatus::Unsubscribed => now() + runner.confirm_within().as_secs(),
        // Subscribed already, or an address that must not be mailed.
        SubscriberStatus::Active | SubscriberStatus::Bounced | SubscriberStatus::Complained => return Ok(()),
    };
    let token = runner
        .unsubscribe_key()
        .confirm_token(newsletter_id, subscriber.id, expires);
    let confirm_url = format!("{}/s/confirm/{token}", runner.public_url());
    let data = json!({ "newsletter": newsletter.name, "confirm_url": confirm_url });
    let message = NewMessage {
        newsletter_id,
        subscriber_id: subscriber.id,
        email: subscriber.email,
        content: MessageContent {
            letter_id: None,
            template: Some(DEFAULT_TEMPLATE_NAME.into()),
            subject: Some(SUBJECT.into()),
            text: Some(TEXT.into()),
            html: None,
            data: data.as_object().cloned().unwrap_or_default(),
        },
        transport: None,
        message_id: one_off_message_id(&newsletter.from),
        confirmation: true,
    };
    runner.queue_message(message, None).await?;
    Ok(())
}

/// Follows a confirmation link: the newsletter's name and what it did.
pub async fn confirm(store: &Store, runner: &Runner, token: &str) -> Result<(String, Confirmed), OptinError> {
    let (newsletter_id, subscriber_id, expires) = runner
        .unsubscribe_key()
        .verify_confirm(token)
        .ok_or(OptinError::UnknownLink)?;
    if now() > expires {
        return Err(OptinError::Expired);
    }
    let subscriber = match store.subscriber(newsletter_id, subscriber_id).await {
        Ok(s) => s,
        Err(StoreError::NotFound { .. }) => return Err(OptinError::UnknownLink),
        Err(e) => return Err(e.into()),
    };
    let newsletter = store.newsletter(newsletter_id).await?.name;
    match subscriber.status {
        SubscriberStatus::Active => Ok((newsletter, Confirmed::Already)),
        SubscriberStatus::Unconfirmed | SubscriberStatus::Unsubscribed => {
            let patch = SubscriberPatch {
                status: Some(SubscriberStatus::Active),
                confirming: true,
                ..Default::default()
            };
            store.update_subscriber(subscriber_id, patch).await?;
            tracing::info!(newsletter_id, subscriber_id, "subscription confirmed");
            Ok((newsletter, Confirmed::Now))
        }
        SubscriberStatus::Bounced | SubscriberStatus::Complained => Err(OptinError::Refused),
    }
}
