//! Signed webhooks out, a room of its own: the user's HTTP endpoints subscribed to event
//! types of the log, each event POSTed to each endpoint that wants it, signed as the
//! Standard Webhooks spec says, at least once, retried on a documented schedule, and an
//! endpoint that fails throughout disabled with the reason.
//!
//! - `model.rs`: what an endpoint, a send (one event to one endpoint: the outbox row)
//!   and an attempt are, and how an attempt's result changes them (the schedule, the
//!   disabling rule).
//! - `sign.rs`: the `whsec_` secrets and the `webhook-signature` header.
//! - `deliver.rs`: the one HTTP client, guarded against SSRF: the address connected to
//!   is checked (after DNS, so a rebinding name gains nothing), redirects are not
//!   followed, time and response size are capped.
//! - `worker.rs`: one task per node that moves each endpoint's cursor over the event log
//!   (queuing sends in the same transaction) and sends what is due under a lease.
//!
//! It knows no database (`store::Webhooks`) and no HTTP server (`http/webhooks.rs` is
//! the edge); reqwest is its client.

mod deliver;
mod model;
mod sign;
mod worker;

pub use deliver::{Deliverer, check_url};
pub use model::*;
pub use sign::{Secret, SecretError};
pub use worker::Worker;
