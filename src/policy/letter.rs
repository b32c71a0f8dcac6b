//! The filter and template worlds (`letterbox:policy@0.1.0` in `wit/0.1`, `@0.2.0` in
//! `wit/0.2`, the same again in `@0.3.0` in `wit`): their bindings, and the conversions between their types and letterbox's.

use super::Rendered;
use crate::domain::{Letter, Newsletter, Subscriber};

pub(super) mod bindings {
    /// `letterbox:policy@0.1.0` (wit/0.1): one recipient and the whole letter per call.
    pub mod v1 {
        pub mod filter {
            wasmtime::component::bindgen!({ path: "wit/0.1", world: "filter" });
        }
        pub mod template {
            wasmtime::component::bindgen!({
                path: "wit/0.1",
                world: "template",
                with: { "letterbox:policy/types": super::filter::letterbox::policy::types },
            });
        }
        pub use filter::letterbox::policy::types;
    }
    /// `letterbox:policy@0.2.0` (wit/0.2): the letter once per instance, recipients in
    /// batches. 0.3's filter and template worlds are these (the same exports, the same
    /// types), so these bindings serve components built against either.
    pub mod v2 {
        pub mod filter {
            wasmtime::component::bindgen!({ path: "wit/0.2", world: "filter" });
        }
        pub mod template {
            wasmtime::component::bindgen!({
                path: "wit/0.2",
                world: "template",
                with: { "letterbox:policy/types": super::filter::letterbox::policy::types },
            });
        }
        pub use filter::letterbox::policy::types;
    }
}

pub(super) use bindings::{v1, v2};
pub(super) use v2::types;

/// A letter in the form policies receive it; built once per job.
pub struct LetterInput(pub(super) types::Letter);

impl LetterInput {
    pub fn new(letter: &Letter, newsletter: &Newsletter) -> Self {
        LetterInput(types::Letter {
            id: letter.id,
            newsletter: newsletter.name.clone(),
            subject: letter.subject.clone(),
            text: letter.text.clone(),
            html: letter.html.clone(),
            params: serde_json::Value::Object(letter.params.clone()).to_string(),
        })
    }

    pub(super) fn v1(&self) -> v1::types::Letter {
        let l = &self.0;
        v1::types::Letter {
            id: l.id,
            newsletter: l.newsletter.clone(),
            subject: l.subject.clone(),
            text: l.text.clone(),
            html: l.html.clone(),
            params: l.params.clone(),
        }
    }
}

pub(super) fn recipient_input(subscriber: &Subscriber, unsubscribe_url: String) -> types::Recipient {
    types::Recipient {
        id: subscriber.id,
        email: subscriber.email.clone(),
        name: subscriber.name.clone().unwrap_or_default(),
        // Written from the map as it is, not from a copy of it.
        attributes: serde_json::to_string(&subscriber.attributes).unwrap_or_else(|_| "{}".into()),
        subscribed_at: subscriber.created_at,
        unsubscribe_url,
    }
}

pub(super) fn recipient_v1(r: &types::Recipient) -> v1::types::Recipient {
    v1::types::Recipient {
        id: r.id,
        email: r.email.clone(),
        name: r.name.clone(),
        attributes: r.attributes.clone(),
        subscribed_at: r.subscribed_at,
        unsubscribe_url: r.unsubscribe_url.clone(),
    }
}

/// A filter's answer for one recipient, whichever WIT version gave it.
pub(super) enum Decision {
    Send,
    Skip(String),
}

pub(super) fn decision_v1(d: v1::types::Decision) -> Decision {
    match d {
        v1::types::Decision::Send => Decision::Send,
        v1::types::Decision::Skip(reason) => Decision::Skip(reason),
    }
}

pub(super) fn decision_v2(d: types::Decision) -> Decision {
    match d {
        types::Decision::Send => Decision::Send,
        types::Decision::Skip(reason) => Decision::Skip(reason),
    }
}

pub(super) fn rendered_v1(r: v1::types::Rendered) -> Rendered {
    Rendered {
        subject: r.subject,
        text: r.text,
        html: r.html,
        headers: r.headers.into_iter().map(|h| (h.name, h.value)).collect(),
    }
}

pub(super) fn rendered_v2(r: types::Rendered) -> Rendered {
    Rendered {
        subject: r.subject,
        text: r.text,
        html: r.html,
        headers: r.headers.into_iter().map(|h| (h.name, h.value)).collect(),
    }
}
