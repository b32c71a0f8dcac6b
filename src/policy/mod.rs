//! Policy host: the only module that knows wasmtime.
//!
//! Policies are WebAssembly components built against `wit/policy.wit`. A component is
//! compiled once (at upload, or on first use after a restart) and kept as an
//! `InstancePre`, so a call only instantiates. Every call gets a fresh `Store` and
//! instance: nothing a policy does for one recipient can leak into the next, and a trap
//! leaves nothing behind to clean up. Each store has a memory limit and an epoch
//! deadline, and a WASI context that grants nothing (no files, network, environment,
//! arguments; stdio discarded).
//!
//! Calls are synchronous and CPU-bound: callers run them on the blocking pool.

pub mod builtin;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Config, Engine, Store, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::domain::{Letter, Newsletter, PluginKind, Subscriber};

mod bindings {
    pub mod filter {
        wasmtime::component::bindgen!({ path: "wit", world: "filter" });
    }
    pub mod template {
        wasmtime::component::bindgen!({
            path: "wit",
            world: "template",
            with: { "letterbox:policy/types": super::filter::letterbox::policy::types },
        });
    }
    pub use filter::letterbox::policy::types;
}

use bindings::filter::FilterPre;
use bindings::template::TemplatePre;
use bindings::types;

/// How often the epoch advances; deadlines are counted in these ticks.
const EPOCH_TICK: Duration = Duration::from_millis(5);

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The bytes are not a component wasmtime can compile.
    #[error("not a valid WebAssembly component: {0}")]
    InvalidComponent(String),
    /// A valid component that does not fit the world its kind requires.
    #[error("component does not implement the letterbox:policy/{kind} world: {detail}")]
    WrongWorld { kind: PluginKind, detail: String },
    /// The policy trapped, ran out of time or memory, or broke the interface.
    #[error("policy {policy} crashed: {detail}")]
    Trap { policy: String, detail: String },
    /// The policy returned `err(reason)`.
    #[error("policy {policy} returned an error: {reason}")]
    Rejected { policy: String, reason: String },
}

/// Limits applied to every policy call.
#[derive(Debug, Clone)]
pub struct PolicyLimits {
    pub memory_bytes: usize,
    pub timeout: Duration,
}

impl Default for PolicyLimits {
    fn default() -> Self {
        PolicyLimits {
            memory_bytes: 64 << 20,
            timeout: Duration::from_millis(100),
        }
    }
}

/// Per-store data: the (empty) WASI context and the limiter.
struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// A compiled, linked policy ready to be instantiated.
pub struct Policy {
    /// `name@sha256-prefix`, used in failure reasons.
    label: String,
    pre: Prepared,
}

enum Prepared {
    Filter(FilterPre<HostState>),
    Template(TemplatePre<HostState>),
}

impl Policy {
    pub fn kind(&self) -> PluginKind {
        match self.pre {
            Prepared::Filter(_) => PluginKind::Filter,
            Prepared::Template(_) => PluginKind::Template,
        }
    }
}

/// The policy engine. Cheap to clone.
#[derive(Clone)]
pub struct PolicyHost {
    engine: Engine,
    linker: Arc<Linker<HostState>>,
    limits: PolicyLimits,
    /// Compiled policies by plugin id. Compiling takes hundreds of milliseconds, a call
    /// tens of microseconds, so compilation happens once per process per plugin.
    /// A std mutex: it is held only for a map lookup or insert, never across compilation.
    compiled: Arc<Mutex<HashMap<String, Arc<Policy>>>>,
}

/// What the filter and template decided for one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Skip(String),
    Send(Rendered),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub subject: String,
    pub text: String,
    pub html: Option<String>,
    pub headers: Vec<(String, String)>,
}

/// A letter in the form policies receive it; built once per job.
pub struct LetterInput(types::Letter);

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
}

fn recipient_input(subscriber: &Subscriber, unsubscribe_url: String) -> types::Recipient {
    types::Recipient {
        id: subscriber.id,
        email: subscriber.email.clone(),
        name: subscriber.name.clone().unwrap_or_default(),
        attributes: serde_json::Value::Object(subscriber.attributes.clone()).to_string(),
        subscribed_at: subscriber.created_at,
        unsubscribe_url,
    }
}

impl PolicyHost {
    pub fn new(limits: PolicyLimits) -> Result<Self, PolicyError> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        let engine = Engine::new(&config).map_err(|e| PolicyError::InvalidComponent(format!("{e:#}")))?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
            .map_err(|e| PolicyError::InvalidComponent(format!("{e:#}")))?;

        // The epoch ticker: ends by itself when the engine is dropped.
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("letterbox-epoch".into())
            .spawn(move || {
                while let Some(engine) = weak.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })
            .map_err(|e| PolicyError::InvalidComponent(format!("cannot start epoch thread: {e}")))?;

        Ok(PolicyHost {
            engine,
            linker: Arc::new(linker),
            limits,
            compiled: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    /// Compiles `bytes` and checks they implement `kind`'s world. On success the compiled
    /// policy is cached under `id`. Blocking (compilation takes up to a second).
    pub fn prepare(
        &self,
        id: &str,
        name: &str,
        kind: PluginKind,
        bytes: &[u8],
    ) -> Result<Arc<Policy>, PolicyError> {
        if let Some(policy) = self.cached(id)
            && policy.kind() == kind
        {
            return Ok(policy);
        }
        let component = Component::new(&self.engine, bytes)
            .map_err(|e| PolicyError::InvalidComponent(format!("{e:#}")))?;
        let wrong_world = |e: wasmtime::Error| PolicyError::WrongWorld {
            kind,
            detail: format!("{e:#}"),
        };
        let instance_pre = self.linker.instantiate_pre(&component).map_err(wrong_world)?;
        let pre = match kind {
            PluginKind::Filter => Prepared::Filter(FilterPre::new(instance_pre).map_err(wrong_world)?),
            PluginKind::Template => Prepared::Template(TemplatePre::new(instance_pre).map_err(wrong_world)?),
        };
        let policy = Arc::new(Policy {
            label: format!("{name}@{}", &id[..id.len().min(12)]),
            pre,
        });
        self.compiled
            .lock()
            .expect("policy cache lock")
            .insert(id.to_string(), policy.clone());
        Ok(policy)
    }

    /// The compiled policy for `id`, if this process has compiled it.
    pub fn cached(&self, id: &str) -> Option<Arc<Policy>> {
        self.compiled.lock().expect("policy cache lock").get(id).cloned()
    }

    fn store(&self) -> Store<HostState> {
        let limits = StoreLimitsBuilder::new()
            .memory_size(self.limits.memory_bytes)
            .instances(16)
            .tables(16)
            .memories(4)
            .build();
        let mut store = Store::new(
            &self.engine,
            HostState {
                wasi: WasiCtx::builder().build(),
                table: ResourceTable::new(),
                limits,
            },
        );
        store.limiter(|state| &mut state.limits);
        let ticks = (self.limits.timeout.as_millis() / EPOCH_TICK.as_millis()).max(1) as u64;
        store.set_epoch_deadline(ticks);
        store
    }

    /// Runs `filter` then, if it says send, `template` for one recipient. Blocking.
    pub fn evaluate(
        &self,
        filter: &Policy,
        template: &Policy,
        subscriber: &Subscriber,
        unsubscribe_url: String,
        letter: &LetterInput,
    ) -> Result<Verdict, PolicyError> {
        let recipient = recipient_input(subscriber, unsubscribe_url);
        let (Prepared::Filter(filter_pre), Prepared::Template(template_pre)) = (&filter.pre, &template.pre)
        else {
            return Err(PolicyError::Trap {
                policy: format!("{} / {}", filter.label, template.label),
                detail: "filter and template given in the wrong roles".into(),
            });
        };

        let trap = |policy: &Policy| {
            let policy = policy.label.clone();
            move |e: wasmtime::Error| PolicyError::Trap {
                policy,
                detail: describe_trap(&e),
            }
        };
        let rejected = |policy: &Policy| {
            let policy = policy.label.clone();
            move |reason: String| PolicyError::Rejected { policy, reason }
        };

        let mut store = self.store();
        let instance = filter_pre.instantiate(&mut store).map_err(trap(filter))?;
        let decision = instance
            .call_filter(&mut store, &recipient, &letter.0)
            .map_err(trap(filter))?
            .map_err(rejected(filter))?;
        if let types::Decision::Skip(reason) = decision {
            return Ok(Verdict::Skip(reason));
        }

        let mut store = self.store();
        let instance = template_pre.instantiate(&mut store).map_err(trap(template))?;
        let rendered = instance
            .call_render(&mut store, &recipient, &letter.0)
            .map_err(trap(template))?
            .map_err(rejected(template))?;
        Ok(Verdict::Send(Rendered {
            subject: rendered.subject,
            text: rendered.text,
            html: rendered.html,
            headers: rendered.headers.into_iter().map(|h| (h.name, h.value)).collect(),
        }))
    }
}

/// A one-line reason for a failed call: the trap code when there is one (out of fuel,
/// unreachable, ...), else the error chain.
fn describe_trap(e: &wasmtime::Error) -> String {
    match e.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::Interrupt) => "timed out (epoch deadline reached)".to_string(),
        Some(trap) => format!("trapped: {trap}"),
        None => format!("{e:#}").lines().next().unwrap_or_default().to_string(),
    }
}
