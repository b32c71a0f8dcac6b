//! Every redb table letterbox uses, in one place. Values are JSON-encoded domain types
//! unless said otherwise; keys are chosen so the scans the runner needs are range scans.

use redb::TableDefinition;

/// Id sequences: name → last id handed out.
pub const SEQUENCES: TableDefinition<&str, u64> = TableDefinition::new("sequences");

/// Newsletter id → `Newsletter`.
pub const NEWSLETTERS: TableDefinition<u64, &[u8]> = TableDefinition::new("newsletters");

/// (newsletter id, subscriber id) → `Subscriber`. Keyed by newsletter first so a job can
/// walk one newsletter's list in id order, in batches.
pub const SUBSCRIBERS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("subscribers");

/// (newsletter id, normalised email) → subscriber id: the upsert-by-email index.
pub const SUBSCRIBER_EMAILS: TableDefinition<(u64, &str), u64> = TableDefinition::new("subscriber_emails");

/// Subscriber id → its newsletter id: finds a subscriber by id alone (ids come from one
/// sequence across newsletters).
pub const SUBSCRIBER_HOMES: TableDefinition<u64, u64> = TableDefinition::new("subscriber_homes");

/// Letter id → `Letter`.
pub const LETTERS: TableDefinition<u64, &[u8]> = TableDefinition::new("letters");

/// Plugin id (sha256 hex) → `Plugin` metadata.
pub const PLUGINS: TableDefinition<&str, &[u8]> = TableDefinition::new("plugins");

/// Plugin id (sha256 hex) → the raw component bytes (not JSON).
pub const PLUGIN_BLOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("plugin_blobs");

/// Plugin name → id of its latest version.
pub const PLUGIN_NAMES: TableDefinition<&str, &str> = TableDefinition::new("plugin_names");

/// (plugin name, version number from 1) → `PluginVersion`: each name's upload history.
pub const PLUGIN_VERSIONS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("plugin_versions");

/// Job id → `Job` (including its per-state counts).
pub const JOBS: TableDefinition<u64, &[u8]> = TableDefinition::new("jobs");

/// (job id, subscriber id) → `Delivery`: the durable per-recipient state of a send.
pub const DELIVERIES: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("deliveries");

/// (job id, state code, subscriber id) for every delivery: the index by state, so that
/// claiming the next pending recipients, requeueing the in-flight ones after a crash or
/// listing the failed ones is a range scan, never a walk over the whole job. State codes
/// are `StateKind::code`.
pub const DELIVERY_STATES: TableDefinition<(u64, u8, u64), ()> = TableDefinition::new("delivery_states");

/// (job id, next attempt time in unix ms, subscriber id) for every delivery in state
/// `retrying`: the retries that are due are a prefix of the job's range.
pub const RETRY_SCHEDULE: TableDefinition<(u64, u64, u64), ()> = TableDefinition::new("retry_schedule");

/// Idempotency key → `IdempotentSend` (the request's hash and the job it created).
pub const IDEMPOTENCY_KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("idempotency_keys");

/// Secret name → its bytes (see `Backend::secret`).
pub const SECRETS: TableDefinition<&str, &[u8]> = TableDefinition::new("secrets");

/// Event id → `events::Event`: the event log, in commit order (ids come from the
/// `event` sequence inside the writer's transaction, and there is one writer).
pub const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");

/// (subscriber id, event id) for every event that names a subscriber: one subscriber's
/// history, and what an erasure must scrub, without a walk over the log.
pub const EVENTS_BY_SUBSCRIBER: TableDefinition<(u64, u64), ()> =
    TableDefinition::new("events_by_subscriber");

/// Bounce id → `bounces::Bounce`: every bounce and complaint report, as recorded.
pub const BOUNCES: TableDefinition<u64, &[u8]> = TableDefinition::new("bounces");

/// (subscriber id, bounce id): one subscriber's reports (their listing, the soft-bounce
/// count, what a reinstatement or an erasure touches).
pub const BOUNCES_BY_SUBSCRIBER: TableDefinition<(u64, u64), ()> =
    TableDefinition::new("bounces_by_subscriber");

/// Bounce id of every report about nobody in the store (unattributed).
pub const UNATTRIBUTED_BOUNCES: TableDefinition<u64, ()> = TableDefinition::new("unattributed_bounces");

/// Normalised email (`store::normalise_email`) → `bounces::Suppression`: the addresses
/// no newsletter sends to.
pub const SUPPRESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("suppressions");

/// Automation id → `automations::Automation`.
pub const AUTOMATIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("automations");

/// Automation name → its id.
pub const AUTOMATION_NAMES: TableDefinition<&str, u64> = TableDefinition::new("automation_names");

/// (automation id, version) → `automations::AutomationVersion`.
pub const AUTOMATION_VERSIONS: TableDefinition<(u64, u64), &[u8]> =
    TableDefinition::new("automation_versions");

/// (automation id, subscriber id or 0) → the state its last reaction left (JSON).
pub const AUTOMATION_STATES: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("automation_states");

/// (automation id, subscriber id or 0, name) → `automations::Timer`.
pub const TIMERS: TableDefinition<(u64, u64, &str), &[u8]> = TableDefinition::new("timers");

/// (automation id, due time in unix ms, timer id) → (subscriber id, name) as JSON: an
/// automation's due timers are a prefix of its range, and its next one the first.
pub const TIMERS_DUE: TableDefinition<(u64, u64, u64), &[u8]> = TableDefinition::new("timers_due");

/// (automation id, failure id) → `automations::Failure`.
pub const AUTOMATION_FAILURES: TableDefinition<(u64, u64), &[u8]> =
    TableDefinition::new("automation_failures");

/// Queued send id → `automations::QueuedSend`, oldest first.
pub const QUEUED_SENDS: TableDefinition<u64, &[u8]> = TableDefinition::new("queued_sends");

/// (created at, subscriber id) → (): subscribers of the public form waiting for their
/// confirmation, oldest first, so their expiry reads only them. An entry whose subscriber
/// has been confirmed since is dropped when the expiry passes it.
pub const UNCONFIRMED: TableDefinition<(u64, u64), ()> = TableDefinition::new("unconfirmed");

/// Message id → `messages::Message`.
pub const MESSAGES: TableDefinition<u64, &[u8]> = TableDefinition::new("messages");

/// (due time in unix ms, message id) → (): the queued messages, earliest due first.
pub const MESSAGES_DUE: TableDefinition<(u64, u64), ()> = TableDefinition::new("messages_due");

/// A message's `Idempotency-Key` → (request hash, message id) as JSON; kept as long as
/// its message.
pub const MESSAGE_KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("message_keys");

/// (subscriber id, message id) → (): what an erasure removes.
pub const MESSAGES_BY_SUBSCRIBER: TableDefinition<(u64, u64), ()> =
    TableDefinition::new("messages_by_subscriber");

/// Webhook id → `webhooks::Webhook`.
pub const WEBHOOKS: TableDefinition<u64, &[u8]> = TableDefinition::new("webhooks");

/// Send id → `webhooks::WebhookSend`: one event for one endpoint (the outbox).
pub const WEBHOOK_SENDS: TableDefinition<u64, &[u8]> = TableDefinition::new("webhook_sends");

/// (due time in unix ms, send id) → (): pending sends, earliest due first; those of a
/// disabled endpoint wait at `webhooks::HELD`.
pub const WEBHOOK_SENDS_DUE: TableDefinition<(u64, u64), ()> = TableDefinition::new("webhook_sends_due");

/// (webhook id, send id) → (): what disabling, enabling and deleting an endpoint touch.
pub const WEBHOOK_SENDS_BY_HOOK: TableDefinition<(u64, u64), ()> =
    TableDefinition::new("webhook_sends_by_hook");

/// (webhook id, attempt id) → `webhooks::WebhookAttempt`: each endpoint's log.
pub const WEBHOOK_ATTEMPTS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("webhook_attempts");

/// Attempt id → webhook id: the log's oldest first, for pruning.
/// The web console's sessions: hex SHA-256 of the secret → expiry (unix seconds).
pub const CONSOLE_SESSIONS: TableDefinition<&str, u64> = TableDefinition::new("console_sessions");

pub const WEBHOOK_ATTEMPT_IDS: TableDefinition<u64, u64> = TableDefinition::new("webhook_attempt_ids");
