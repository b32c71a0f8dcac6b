//! Integration tests. Everything here is real: the server runs via `letterbox::run` on
//! port 0 (or as the built binary), mail goes over TCP to a real SMTP server in the test,
//! policies are the Wasm components built by build.rs, state lives in a redb file or, in
//! the PostgreSQL pass (`.ci/test`), a PostgreSQL database.

mod api_errors;
mod auth;
mod automations;
mod bounces;
mod cli;
mod console;
mod console_pages;
mod contained;
mod crash;
mod delivery;
mod e2e;
mod events;
mod fleet;
mod hardening;
mod inbound;
mod languages;
mod lists;
mod messages;
mod migrate;
mod optin;
mod outage;
mod pg_tls;
mod policies;
mod providers;
mod subscribers;
mod support;
mod tls;
mod webhooks;
