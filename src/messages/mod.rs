//! One-off (transactional) messages: one message to one subscriber, through a stored
//! letter or a template policy with the message's own subject and body, with data of
//! its own merged into the params.
//!
//! This room owns what a message is (`model`) and the worker that sends the queued ones
//! (`worker`): it claims those that are due (a lease per message, so one node of a
//! fleet sends each), has the runner send each one (`Runner::send_message`: the same
//! suppression, statuses, rates, fencing, retry delays and bounce rules as a job's
//! deliveries), and records the outcome. A message is recorded (`store::Messages`)
//! before it is sent, with its Message-ID; a crash between the send and its record
//! sends it once more (the bound README states for deliveries).
//!
//! It knows no database (the store does), no SMTP (the runner and `mail/` do) and no
//! HTTP (`http/messages.rs` does).

pub mod model;
pub mod worker;

pub use model::*;
