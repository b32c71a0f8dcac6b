//! Automations: user policies (WIT 0.3's `automation` world) called for events of the
//! log and for their own durable timers, whose reactions are carried out once.
//!
//! This room owns what an automation is (`model`), and the worker that runs each
//! active automation's turns (`worker`): read the events after its cursor and its due
//! timers, call the policy for each (`policy::Automaton`), and commit every reaction's
//! effects with the new cursor in one transaction (`store::Automations::commit_turn`),
//! before anything is sent. Letters sent become deliveries of ordinary jobs
//! (`dispatch_sends`), and messages one-off messages (`crate::messages`, queued in the
//! turn's transaction), so both get the normal path: durable per-recipient state, a
//! stable Message-ID, retries, suppression, rates and domain caps.
//!
//! It knows no database (the store does), no wasmtime (the policy host does) and no
//! HTTP (`http/automations.rs` does).

pub mod model;
pub mod worker;

pub use model::*;
