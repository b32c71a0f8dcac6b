//! Policy host: the only module that knows wasmtime.
//!
//! Policies are WebAssembly components built against `wit/policy.wit`. A component is
//! checked and compiled once per upload: it must be a component (not a core module),
//! import nothing outside `inspect::LINKED_IMPORTS` (checked before compiling), and
//! export the function of its kind's world with the right types. The compiled code is cached on disk (keyed by the component's
//! sha256 and the engine's compatibility hash) and in memory as an `InstancePre`.
//!
//! Instances are reused: an `Evaluator` (one per job) keeps warm filter and template
//! instances and runs up to `RECYCLE_AFTER` recipients through each before replacing it,
//! because instantiation costs ~8x a call. An instance that traps is dropped at once and
//! never called again. So a policy's memory lives across recipients of one job, never
//! across jobs or policies; the policy's author owns the list it reads, so this is not a
//! confidentiality boundary. The sandbox protects the server: every call gets an epoch
//! deadline, the store a memory limit and instance/table limits, and WASI grants nothing
//! (no files, network, environment or arguments; stdout/stderr are captured, capped and
//! logged). Sockets are linked, because CPython imports them, and every use is denied.
//!
//! Calls are synchronous and CPU-bound; `Evaluator::evaluate_async` runs them on the
//! blocking pool under a process-wide limit of concurrent evaluations.

pub mod builtin;
pub mod inspect;
mod output;
mod template_check;

pub use template_check::{TemplateProblem, check_default_template};

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, StoreLimits,
    StoreLimitsBuilder,
};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::domain::{Letter, Newsletter, PluginKind, Subscriber};
use output::CappedOutput;

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

use bindings::filter::{Filter, FilterPre};
use bindings::template::{Template, TemplatePre};
use bindings::types;

/// How often the epoch advances; deadlines are counted in these ticks.
const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Calls one instance serves before it is replaced by a fresh one. Bounds how long any
/// state a policy accumulates (fragmentation, caches, counters) can live.
const RECYCLE_AFTER: u32 = 1000;

/// Bytes of guest stdout and of stderr kept per call for the log.
const OUTPUT_LOG_CAP: usize = 4096;

/// Longest reason (from `skip` or `err`) kept in a recipient's state.
const MAX_REASON: usize = 1000;

#[derive(Debug, Clone, thiserror::Error)]
pub enum PolicyError {
    /// The bytes are not a component wasmtime can compile.
    #[error("not a valid WebAssembly component: {0}")]
    InvalidComponent(String),
    /// The component imports an interface the host refuses to provide.
    #[error(
        "the component imports {name}, which letterbox does not provide to policies \
         (provided: wasi:cli, wasi:io, wasi:clocks, wasi:random, wasi:filesystem and \
         wasi:sockets, granting no files, environment or network)"
    )]
    RefusedImport { name: String },
    /// A valid component that does not fit the world its kind requires.
    #[error("the component does not implement the letterbox:policy/{kind} world: {detail}")]
    WrongWorld { kind: PluginKind, detail: String },
    /// The policy trapped, ran out of time or memory, or broke the interface.
    #[error("policy {policy} crashed: {detail}")]
    Trap { policy: String, detail: String },
    /// The policy returned `err(reason)`.
    #[error("policy {policy} returned an error: {reason}")]
    Rejected { policy: String, reason: String },
    /// The policy returned more data than a call may.
    #[error("policy {policy} returned {size} bytes, more than the limit of {limit}")]
    OutputTooLarge {
        policy: String,
        size: usize,
        limit: usize,
    },
    #[error("policy engine: {0}")]
    Engine(String),
}

impl PolicyError {
    /// The policy (`name@id-prefix`) whose run failed, for failures of a run.
    pub fn failed_policy(&self) -> Option<&str> {
        match self {
            PolicyError::Trap { policy, .. }
            | PolicyError::Rejected { policy, .. }
            | PolicyError::OutputTooLarge { policy, .. } => Some(policy),
            _ => None,
        }
    }
}

/// Limits applied to policies.
#[derive(Debug, Clone)]
pub struct PolicyLimits {
    /// Linear memory per instance.
    pub memory_bytes: usize,
    /// Wall-clock budget per call (enforced by epoch interruption).
    pub timeout: Duration,
    /// Largest component accepted at upload.
    pub max_upload_bytes: usize,
    /// Most bytes a template may return (subject + text + html + headers).
    pub max_output_bytes: usize,
}

impl Default for PolicyLimits {
    fn default() -> Self {
        PolicyLimits {
            memory_bytes: 64 << 20,
            timeout: Duration::from_millis(100),
            // JavaScript (componentize-js) and Python (componentize-py) components are
            // 12 and 18 MB before the policy's own code.
            max_upload_bytes: 64 << 20,
            max_output_bytes: 1 << 20,
        }
    }
}

/// Per-store data: the WASI context (which grants nothing) and the limiter.
struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
    stdout: CappedOutput,
    stderr: CappedOutput,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// A compiled, checked and linked policy, ready to be instantiated.
pub struct Policy {
    /// `name@sha256-prefix`, used in failure reasons and logs.
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

    pub fn label(&self) -> &str {
        &self.label
    }
}

/// The policy engine. Cheap to clone.
#[derive(Clone)]
pub struct PolicyHost {
    engine: Engine,
    linker: Arc<Linker<HostState>>,
    limits: Arc<PolicyLimits>,
    /// Compiled policies by plugin id. A std mutex: held only for a lookup or an insert,
    /// never across compilation.
    compiled: Arc<Mutex<HashMap<String, Arc<Policy>>>>,
    /// Where serialized compiled components are kept across restarts.
    cache_dir: Option<PathBuf>,
    /// The engine's compatibility hash: part of cache file names, so a new wasmtime or
    /// different settings never load stale code.
    compat: String,
    /// Concurrent evaluations in the process: policy calls are CPU-bound, so more than
    /// a few per core only adds live instances and latency.
    evaluations: Arc<Semaphore>,
    /// 2 per core: the size of `evaluations`, and the warm instance pairs an
    /// evaluator keeps idle.
    parallel_evaluations: usize,
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
    /// Creates the engine (pooling allocator where the address space can be reserved),
    /// the linker and the epoch ticker. `cache_dir` keeps compiled code across restarts.
    pub fn new(limits: PolicyLimits, cache_dir: Option<PathBuf>) -> Result<Self, PolicyError> {
        let engine_error = |e: wasmtime::Error| PolicyError::Engine(format!("{e:#}"));
        let mut config = Config::new();
        config.epoch_interruption(true);
        let mut pool = PoolingAllocationConfig::default();
        pool.max_memory_size(limits.memory_bytes);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = match Engine::new(&config) {
            Ok(engine) => engine,
            Err(e) => {
                tracing::warn!(
                    error = %format!("{e:#}"),
                    "cannot reserve address space for the pooling allocator; \
                     falling back to on-demand instance allocation (slower instantiation)"
                );
                config.allocation_strategy(InstanceAllocationStrategy::OnDemand);
                Engine::new(&config).map_err(engine_error)?
            }
        };
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(engine_error)?;

        let mut hasher = std::hash::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let compat = format!("{:016x}", hasher.finish());
        if let Some(dir) = &cache_dir {
            std::fs::create_dir_all(dir)
                .map_err(|e| PolicyError::Engine(format!("{}: {e}", dir.display())))?;
        }

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
            .map_err(|e| PolicyError::Engine(format!("cannot start the epoch thread: {e}")))?;

        let parallel_evaluations = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2) * 2;
        Ok(PolicyHost {
            engine,
            linker: Arc::new(linker),
            limits: Arc::new(limits),
            compiled: Arc::new(Mutex::new(HashMap::new())),
            cache_dir,
            compat,
            evaluations: Arc::new(Semaphore::new(parallel_evaluations)),
            parallel_evaluations,
        })
    }

    pub fn limits(&self) -> &PolicyLimits {
        &self.limits
    }

    /// Checks `bytes` are a component implementing `kind`'s world with acceptable
    /// imports, compiles them (or loads the cached compilation) and caches the result
    /// under `id` (the bytes' sha256). Blocking: compiling can take a second.
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
        // Before anything costly: a component that can never run is refused in
        // milliseconds, not after seconds of compilation.
        inspect::check(bytes, kind)?;
        let cache_file = self
            .cache_dir
            .as_ref()
            .map(|dir| dir.join(format!("{id}-{}.cwasm", self.compat)));
        let cached = cache_file.as_ref().filter(|f| f.exists()).and_then(|file| {
            // SAFETY: the file was written below by `Component::serialize` with this
            // engine configuration (its compatibility hash is in the name) into
            // letterbox's own data directory, and wasmtime checks its header. Whoever
            // can write that directory can already rewrite the database; the file is
            // trusted exactly as much.
            match unsafe { Component::deserialize_file(&self.engine, file) } {
                Ok(component) => Some(component),
                Err(e) => {
                    tracing::warn!(file = %file.display(), error = %e, "ignoring unusable compiled policy");
                    None
                }
            }
        });
        let fresh = cached.is_none();
        let component = match cached {
            Some(component) => component,
            None => Component::new(&self.engine, bytes)
                .map_err(|e| PolicyError::InvalidComponent(format!("{e:#}")))?,
        };
        let pre = self.check(&component, kind)?;
        if fresh
            && let Some(file) = &cache_file
            && let Err(e) = write_cache(file, &component)
        {
            tracing::warn!(file = %file.display(), error = %e, "cannot cache compiled policy");
        }
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

    /// Links the compiled component, checking its exports' types against the world
    /// (`inspect::check` has already checked the names).
    fn check(&self, component: &Component, kind: PluginKind) -> Result<Prepared, PolicyError> {
        let wrong_world = |e: wasmtime::Error| PolicyError::WrongWorld {
            kind,
            detail: format!("{e:#}"),
        };
        let instance_pre = self.linker.instantiate_pre(component).map_err(wrong_world)?;
        Ok(match kind {
            PluginKind::Filter => Prepared::Filter(FilterPre::new(instance_pre).map_err(wrong_world)?),
            PluginKind::Template => Prepared::Template(TemplatePre::new(instance_pre).map_err(wrong_world)?),
        })
    }

    /// The compiled policy for `id`, if this process has prepared it.
    pub fn cached(&self, id: &str) -> Option<Arc<Policy>> {
        self.compiled.lock().expect("policy cache lock").get(id).cloned()
    }

    fn new_store(&self) -> Store<HostState> {
        let limits = StoreLimitsBuilder::new()
            .memory_size(self.limits.memory_bytes)
            .instances(16)
            .tables(16)
            .memories(4)
            .table_elements(100_000)
            .build();
        let stdout = CappedOutput::new(OUTPUT_LOG_CAP);
        let stderr = CappedOutput::new(OUTPUT_LOG_CAP);
        // Nothing is granted. These are wasmtime's defaults too; said here so that a
        // change of defaults cannot open the network to policies.
        let wasi = WasiCtx::builder()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .socket_addr_check(|_, _| Box::pin(async { false }))
            .build();
        let mut store = Store::new(
            &self.engine,
            HostState {
                wasi,
                table: ResourceTable::new(),
                limits,
                stdout,
                stderr,
            },
        );
        store.limiter(|state| &mut state.limits);
        // A new store's deadline is epoch 0, already past: instantiation (which runs the
        // component's start code) needs a budget too.
        store.set_epoch_deadline(self.deadline_ticks());
        store
    }

    fn deadline_ticks(&self) -> u64 {
        (self.limits.timeout.as_millis() / EPOCH_TICK.as_millis()).max(1) as u64
    }

    /// An evaluator for one job's filter and template.
    pub fn evaluator(
        &self,
        filter: Arc<Policy>,
        template: Arc<Policy>,
        letter: LetterInput,
    ) -> Result<Evaluator, PolicyError> {
        if filter.kind() != PluginKind::Filter || template.kind() != PluginKind::Template {
            return Err(PolicyError::Engine(format!(
                "{} / {} given in the wrong roles",
                filter.label, template.label
            )));
        }
        Ok(Evaluator {
            host: self.clone(),
            filter,
            template,
            letter,
            idle: Mutex::new(Vec::new()),
            max_idle: self.parallel_evaluations,
        })
    }
}

fn write_cache(file: &std::path::Path, component: &Component) -> std::io::Result<()> {
    let bytes = component
        .serialize()
        .map_err(|e| std::io::Error::other(format!("{e:#}")))?;
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, file)
}

/// A job's filter and template with warm instances to reuse across recipients.
pub struct Evaluator {
    host: PolicyHost,
    filter: Arc<Policy>,
    template: Arc<Policy>,
    letter: LetterInput,
    /// Warm instance pairs not in use. A std mutex: held for a push or a pop only.
    idle: Mutex<Vec<Warm>>,
    max_idle: usize,
}

#[derive(Default)]
struct Warm {
    filter: Option<Live<Filter>>,
    template: Option<Live<Template>>,
}

struct Live<T> {
    store: Store<HostState>,
    bindings: T,
    calls: u32,
}

impl Evaluator {
    /// Runs `filter` then, if it says send, `template` for one recipient. Blocking.
    pub fn evaluate(&self, subscriber: &Subscriber, unsubscribe_url: String) -> Result<Verdict, PolicyError> {
        let mut warm = self.idle.lock().expect("idle lock").pop().unwrap_or_default();
        let started = std::time::Instant::now();
        let result = self.evaluate_with(&mut warm, subscriber, unsubscribe_url);
        metrics::histogram!("letterbox_policy_evaluation_seconds").record(started.elapsed().as_secs_f64());
        let mut idle = self.idle.lock().expect("idle lock");
        if idle.len() < self.max_idle {
            idle.push(warm);
        }
        result
    }

    /// `evaluate` on the blocking pool, within the process-wide evaluation limit.
    pub async fn evaluate_async(
        self: &Arc<Self>,
        subscriber: Subscriber,
        unsubscribe_url: String,
    ) -> Result<(Subscriber, Verdict), PolicyError> {
        let mut results = self
            .evaluate_batch(vec![(subscriber, unsubscribe_url)], |_| true)
            .await?;
        match results.pop() {
            Some((subscriber, Some(result))) => Ok((subscriber, result?)),
            _ => Err(PolicyError::Engine("the evaluation returned no result".into())),
        }
    }

    /// `evaluate` for many recipients in one trip to the blocking pool, within the
    /// process-wide evaluation limit. A hop to the blocking pool costs more than a
    /// typical evaluation (measured: ~45 µs against ~20 µs), so a job evaluates the
    /// recipients that are waiting together. `keep_going` sees each result as it comes;
    /// once it says stop, the remaining recipients are not evaluated (`None`).
    pub async fn evaluate_batch<F>(
        self: &Arc<Self>,
        items: Vec<(Subscriber, String)>,
        mut keep_going: F,
    ) -> Result<Vec<(Subscriber, Option<Result<Verdict, PolicyError>>)>, PolicyError>
    where
        F: FnMut(&Result<Verdict, PolicyError>) -> bool + Send + 'static,
    {
        self.on_blocking_pool(move |this| {
            let mut going = true;
            items
                .into_iter()
                .map(|(subscriber, url)| {
                    if !going {
                        return (subscriber, None);
                    }
                    let result = this.evaluate(&subscriber, url);
                    going = keep_going(&result);
                    (subscriber, Some(result))
                })
                .collect()
        })
        .await
    }

    /// Runs `work` on the blocking pool, within the process-wide evaluation limit.
    async fn on_blocking_pool<R: Send + 'static>(
        self: &Arc<Self>,
        work: impl FnOnce(&Evaluator) -> R + Send + 'static,
    ) -> Result<R, PolicyError> {
        let _permit = self
            .host
            .evaluations
            .acquire()
            .await
            .map_err(|_| PolicyError::Engine("the policy engine is shut down".into()))?;
        let this = self.clone();
        tokio::task::spawn_blocking(move || work(&this))
            .await
            .map_err(|e| PolicyError::Engine(format!("policy evaluation panicked: {e}")))
    }

    fn evaluate_with(
        &self,
        warm: &mut Warm,
        subscriber: &Subscriber,
        unsubscribe_url: String,
    ) -> Result<Verdict, PolicyError> {
        let recipient = recipient_input(subscriber, unsubscribe_url);
        let letter = &self.letter.0;
        let Prepared::Filter(filter_pre) = &self.filter.pre else {
            unreachable!("checked in PolicyHost::evaluator")
        };

        let decision = self.call(
            &self.filter,
            &mut warm.filter,
            |store| filter_pre.instantiate(store),
            |bindings, store| bindings.call_filter(store, &recipient, letter),
        )?;
        if let types::Decision::Skip(reason) = decision {
            return Ok(Verdict::Skip(truncate(reason)));
        }

        self.render_with(warm, &recipient).map(Verdict::Send)
    }

    /// The template alone for one recipient, filter or not: a letter's check when it
    /// is written (the letter must render for someone). On the blocking pool, within
    /// the process-wide evaluation limit.
    pub async fn render_async(
        self: &Arc<Self>,
        subscriber: Subscriber,
        unsubscribe_url: String,
    ) -> Result<Rendered, PolicyError> {
        self.on_blocking_pool(move |this| {
            let recipient = recipient_input(&subscriber, unsubscribe_url);
            this.render_with(&mut Warm::default(), &recipient)
        })
        .await?
    }

    fn render_with(&self, warm: &mut Warm, recipient: &types::Recipient) -> Result<Rendered, PolicyError> {
        let letter = &self.letter.0;
        let Prepared::Template(template_pre) = &self.template.pre else {
            unreachable!("checked in PolicyHost::evaluator")
        };
        let rendered = self.call(
            &self.template,
            &mut warm.template,
            |store| template_pre.instantiate(store),
            |bindings, store| bindings.call_render(store, recipient, letter),
        )?;
        let size = rendered.subject.len()
            + rendered.text.len()
            + rendered.html.as_ref().map_or(0, String::len)
            + rendered
                .headers
                .iter()
                .map(|h| h.name.len() + h.value.len())
                .sum::<usize>();
        let limit = self.host.limits.max_output_bytes;
        if size > limit {
            return Err(PolicyError::OutputTooLarge {
                policy: self.template.label.clone(),
                size,
                limit,
            });
        }
        Ok(Rendered {
            subject: rendered.subject,
            text: rendered.text,
            html: rendered.html,
            headers: rendered.headers.into_iter().map(|h| (h.name, h.value)).collect(),
        })
    }

    /// One call on a warm (or new) instance in `slot`. The instance goes back into the
    /// slot only if the call returned normally.
    fn call<T, R>(
        &self,
        policy: &Policy,
        slot: &mut Option<Live<T>>,
        instantiate: impl FnOnce(&mut Store<HostState>) -> wasmtime::Result<T>,
        call: impl FnOnce(&T, &mut Store<HostState>) -> wasmtime::Result<Result<R, String>>,
    ) -> Result<R, PolicyError> {
        let trap = |e: wasmtime::Error| PolicyError::Trap {
            policy: policy.label.clone(),
            detail: describe_trap(&e),
        };
        let mut live = match slot.take() {
            Some(live) if live.calls < RECYCLE_AFTER => live,
            _ => {
                let mut store = self.host.new_store();
                let bindings = instantiate(&mut store).map_err(trap)?;
                Live {
                    store,
                    bindings,
                    calls: 0,
                }
            }
        };
        live.store.set_epoch_deadline(self.host.deadline_ticks());
        let result = call(&live.bindings, &mut live.store);
        log_output(policy, &live.store);
        let returned = result.map_err(trap)?;
        live.calls += 1;
        *slot = Some(live);
        returned.map_err(|reason| PolicyError::Rejected {
            policy: policy.label.clone(),
            reason: truncate(reason),
        })
    }
}

/// Sends what a call printed to the log, noting how much was cut.
fn log_output(policy: &Policy, store: &Store<HostState>) {
    for (stream, output) in [("stdout", &store.data().stdout), ("stderr", &store.data().stderr)] {
        let (text, dropped) = output.take();
        if !text.is_empty() || dropped > 0 {
            tracing::info!(policy = %policy.label, stream, dropped, "{}", text.trim_end());
        }
    }
}

fn truncate(mut reason: String) -> String {
    if reason.len() > MAX_REASON {
        let mut cut = MAX_REASON;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason.truncate(cut);
        reason.push('…');
    }
    reason
}

/// A one-line reason for a failed call: the trap code when there is one, else the
/// first line of the error chain.
fn describe_trap(e: &wasmtime::Error) -> String {
    match e.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::Interrupt) => "timed out (epoch deadline reached)".to_string(),
        Some(trap) => format!("trapped: {trap}"),
        None => format!("{e:#}").lines().next().unwrap_or_default().to_string(),
    }
}
