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
    /// `letterbox:policy@0.2.0` (wit): the letter once per instance, recipients in batches.
    pub mod v2 {
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
}

use bindings::{v1, v2};
use v2::types;

/// How often the epoch advances; deadlines are counted in these ticks.
const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Recipients one instance serves before it is replaced by a fresh one. Bounds how long
/// any state a policy accumulates (fragmentation, caches, counters) can live.
const RECYCLE_AFTER: u32 = 1000;

/// Most recipients in one call of a 0.2 policy. Its time budget is the per-recipient
/// budget times the batch's size, so this also bounds how long one hostile recipient
/// can hold an evaluation slot before its batch is re-run one by one.
const BATCH: usize = 64;

/// The wall-clock budget of an instance's setup (instantiation and `prepare` together,
/// or instantiation and `validate`), unless the per-recipient timeout is longer.
const SETUP_BUDGET: Duration = Duration::from_secs(1);

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
    /// The component asks for more memory per instance than this server allows.
    #[error(
        "the component asks for {asked} MiB of memory per instance; this server allows at most \
         {allowed} (policy.memory_max_mib)"
    )]
    TooMuchMemory { asked: u32, allowed: u32 },
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
    /// Linear memory per instance, unless the component asks for another amount (its
    /// `letterbox:limits` section).
    pub memory_bytes: usize,
    /// The most a component may ask for per instance; the pooling allocator's slots
    /// are this big (address space, not memory: pages are committed as they are used).
    pub max_memory_bytes: usize,
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
            max_memory_bytes: 512 << 20,
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
    limits: Limiter,
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

/// The store's limits, and the linear memory its instance holds (what the author's guide
/// and the language bench report per instance).
struct Limiter {
    limits: StoreLimits,
    memory: usize,
}

impl wasmtime::ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allowed = self.limits.memory_growing(current, desired, maximum)?;
        if allowed {
            self.memory += desired - current;
        }
        Ok(allowed)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.limits.table_growing(current, desired, maximum)
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.limits.memory_grow_failed(error)
    }

    fn table_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.limits.table_grow_failed(error)
    }

    fn instances(&self) -> usize {
        self.limits.instances()
    }

    fn tables(&self) -> usize {
        self.limits.tables()
    }

    fn memories(&self) -> usize {
        self.limits.memories()
    }
}

/// A compiled, checked and linked policy, ready to be instantiated.
pub struct Policy {
    /// `name@sha256-prefix`, used in failure reasons and logs.
    label: String,
    pre: Prepared,
    /// Linear memory each instance may hold: the component's ask, else the default.
    memory_bytes: usize,
}

enum Prepared {
    Filter1(v1::filter::FilterPre<HostState>),
    Template1(v1::template::TemplatePre<HostState>),
    Filter2(v2::filter::FilterPre<HostState>),
    Template2(v2::template::TemplatePre<HostState>),
}

impl Policy {
    pub fn kind(&self) -> PluginKind {
        match self.pre {
            Prepared::Filter1(_) | Prepared::Filter2(_) => PluginKind::Filter,
            Prepared::Template1(_) | Prepared::Template2(_) => PluginKind::Template,
        }
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    /// The linear memory each instance may hold.
    pub fn memory_bytes(&self) -> usize {
        self.memory_bytes
    }

    /// The WIT version the component was built against: "0.1" or "0.2".
    pub fn wit_version(&self) -> &'static str {
        match self.pre {
            Prepared::Filter1(_) | Prepared::Template1(_) => "0.1",
            Prepared::Filter2(_) | Prepared::Template2(_) => "0.2",
        }
    }

    /// Recipients per call: 0.1 components take one.
    fn batch_limit(&self) -> usize {
        match self.pre {
            Prepared::Filter1(_) | Prepared::Template1(_) => 1,
            Prepared::Filter2(_) | Prepared::Template2(_) => BATCH,
        }
    }
}

/// What is wrong with one field of a letter, as a 0.2 policy's `validate` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub field: String,
    pub message: String,
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

    fn v1(&self) -> v1::types::Letter {
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

fn recipient_input(subscriber: &Subscriber, unsubscribe_url: String) -> types::Recipient {
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

fn recipient_v1(r: &types::Recipient) -> v1::types::Recipient {
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
enum Decision {
    Send,
    Skip(String),
}

fn decision_v1(d: v1::types::Decision) -> Decision {
    match d {
        v1::types::Decision::Send => Decision::Send,
        v1::types::Decision::Skip(reason) => Decision::Skip(reason),
    }
}

fn decision_v2(d: types::Decision) -> Decision {
    match d {
        types::Decision::Send => Decision::Send,
        types::Decision::Skip(reason) => Decision::Skip(reason),
    }
}

fn rendered_v1(r: v1::types::Rendered) -> Rendered {
    Rendered {
        subject: r.subject,
        text: r.text,
        html: r.html,
        headers: r.headers.into_iter().map(|h| (h.name, h.value)).collect(),
    }
}

fn rendered_v2(r: types::Rendered) -> Rendered {
    Rendered {
        subject: r.subject,
        text: r.text,
        html: r.html,
        headers: r.headers.into_iter().map(|h| (h.name, h.value)).collect(),
    }
}

impl PolicyHost {
    /// Creates the engine (pooling allocator where the address space can be reserved),
    /// the linker and the epoch ticker. `cache_dir` keeps compiled code across restarts.
    pub fn new(limits: PolicyLimits, cache_dir: Option<PathBuf>) -> Result<Self, PolicyError> {
        let engine_error = |e: wasmtime::Error| PolicyError::Engine(format!("{e:#}"));
        let mut config = Config::new();
        config.epoch_interruption(true);
        if std::env::var_os("LETTERBOX_PERFMAP").is_some() {
            config.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        let mut pool = PoolingAllocationConfig::default();
        pool.max_memory_size(limits.max_memory_bytes.max(limits.memory_bytes));
        // An instance is replaced every 1,000 recipients: keeping its first pages
        // resident for the next one saves faulting them in again (what a policy's heap
        // typically touches).
        pool.linear_memory_keep_resident(1 << 20);
        pool.table_keep_resident(64 << 10);
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

    /// The most memory per instance a component may ask for here, in MiB.
    pub fn max_memory_mib(&self) -> u32 {
        (self.limits.max_memory_bytes.max(self.limits.memory_bytes) >> 20) as u32
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
        let surface = inspect::check(bytes, kind, self.max_memory_mib())?;
        let v2 = surface.exports.iter().any(|e| e == "prepare");
        let memory_bytes = surface
            .memory_mib
            .map_or(self.limits.memory_bytes, |mib| (mib as usize) << 20);
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
        let pre = self.check(&component, kind, v2)?;
        if fresh
            && let Some(file) = &cache_file
            && let Err(e) = write_cache(file, &component)
        {
            tracing::warn!(file = %file.display(), error = %e, "cannot cache compiled policy");
        }
        let policy = Arc::new(Policy {
            label: format!("{name}@{}", &id[..id.len().min(12)]),
            pre,
            memory_bytes,
        });
        self.compiled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_string(), policy.clone());
        Ok(policy)
    }

    /// Links the compiled component, checking its exports' types against the world
    /// (`inspect::check` has already checked the names).
    fn check(&self, component: &Component, kind: PluginKind, v2: bool) -> Result<Prepared, PolicyError> {
        let wrong_world = |e: wasmtime::Error| PolicyError::WrongWorld {
            kind,
            detail: format!("{e:#}"),
        };
        let instance_pre = self.linker.instantiate_pre(component).map_err(wrong_world)?;
        // 0.2 worlds export `prepare`; 0.1 worlds do not.
        Ok(match (kind, v2) {
            (PluginKind::Filter, false) => {
                Prepared::Filter1(v1::filter::FilterPre::new(instance_pre).map_err(wrong_world)?)
            }
            (PluginKind::Template, false) => {
                Prepared::Template1(v1::template::TemplatePre::new(instance_pre).map_err(wrong_world)?)
            }
            (PluginKind::Filter, true) => {
                Prepared::Filter2(v2::filter::FilterPre::new(instance_pre).map_err(wrong_world)?)
            }
            (PluginKind::Template, true) => {
                Prepared::Template2(v2::template::TemplatePre::new(instance_pre).map_err(wrong_world)?)
            }
        })
    }

    /// The compiled policy for `id`, if this process has prepared it.
    pub fn cached(&self, id: &str) -> Option<Arc<Policy>> {
        self.compiled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    /// A store for one instance of a policy whose instances may hold `memory_bytes`.
    fn new_store(&self, memory_bytes: usize) -> Store<HostState> {
        let limits = StoreLimitsBuilder::new()
            .memory_size(memory_bytes)
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
                limits: Limiter { limits, memory: 0 },
                stdout,
                stderr,
            },
        );
        store.limiter(|state| &mut state.limits);
        // A new store's deadline is epoch 0, already past: instantiation (which runs the
        // component's start code) needs a budget too: the setup budget, which `prepare`
        // and `validate` then share.
        store.set_epoch_deadline(self.setup_ticks());
        store
    }

    /// The budget of an instance's setup: instantiation with `prepare`, or `validate`.
    /// It is paid once per instance (about 1,000 recipients), and an interpreter's start
    /// on a busy machine needs more than one recipient's 100 ms: measured, a Python
    /// policy's instantiation and `validate` took over 100 ms with both cores busy.
    fn setup_ticks(&self) -> u64 {
        let setup = self.limits.timeout.max(SETUP_BUDGET);
        (setup.as_millis() / EPOCH_TICK.as_millis()).max(1) as u64
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
            letter_v1: letter.v1(),
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
    /// The letter as 0.1 components take it, made once.
    letter_v1: v1::types::Letter,
    /// Warm instance pairs not in use. A std mutex: held for a push or a pop only.
    idle: Mutex<Vec<Warm>>,
    max_idle: usize,
}

#[derive(Default)]
struct Warm {
    filter: Option<Live>,
    template: Option<Live>,
}

/// An instance of one of the four worlds.
enum Bindings {
    Filter1(v1::filter::Filter),
    Template1(v1::template::Template),
    Filter2(v2::filter::Filter),
    Template2(v2::template::Template),
}

struct Live {
    store: Store<HostState>,
    bindings: Bindings,
    /// Recipients served.
    calls: u32,
    /// What the 0.2 `prepare` answered: an `err` fails every recipient sent here.
    prepared: Result<(), String>,
}

/// What one call answers for each recipient it was given.
type Answers<R> = Vec<Result<R, String>>;

impl Evaluator {
    /// Runs `filter` then, if it says send, `template` for one recipient. Blocking.
    pub fn evaluate(&self, subscriber: &Subscriber, unsubscribe_url: String) -> Result<Verdict, PolicyError> {
        let recipients = vec![recipient_input(subscriber, unsubscribe_url)];
        self.with_warm(|this, warm| this.evaluate_many(warm, recipients))
            .pop()
            .unwrap_or_else(|| Err(PolicyError::Engine("the evaluation returned no result".into())))
    }

    /// `evaluate` for many recipients, in calls of up to `BATCH` (what a job does, without
    /// the trip to the blocking pool). Blocking.
    pub fn evaluate_all(&self, items: &[(Subscriber, String)]) -> Vec<Result<Verdict, PolicyError>> {
        self.with_warm(|this, warm| {
            items
                .chunks(BATCH)
                .flat_map(|chunk| {
                    let recipients = chunk
                        .iter()
                        .map(|(s, url)| recipient_input(s, url.clone()))
                        .collect();
                    this.evaluate_many(warm, recipients)
                })
                .collect()
        })
    }

    /// The most linear memory a warm filter and a warm template instance hold now (0
    /// before the first evaluation): what one instance of each costs.
    pub fn memory_per_instance(&self) -> (usize, usize) {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let most = |live: fn(&Warm) -> &Option<Live>| {
            idle.iter()
                .filter_map(|w| live(w).as_ref())
                .map(|l| l.store.data().limits.memory)
                .max()
                .unwrap_or(0)
        };
        (most(|w| &w.filter), most(|w| &w.template))
    }

    /// Runs `work` with a warm instance pair, given back afterwards.
    fn with_warm<R>(&self, work: impl FnOnce(&Self, &mut Warm) -> R) -> R {
        let mut warm = self
            .idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .unwrap_or_default();
        let result = work(self, &mut warm);
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
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

    /// Filter and template for many recipients in one trip to the blocking pool, within
    /// the process-wide evaluation limit, in calls of up to `BATCH` recipients (one for
    /// 0.1 policies). A hop to the blocking pool costs more than a typical evaluation
    /// (measured: ~45 µs against ~20 µs), so a job evaluates the recipients that are
    /// waiting together. `keep_going` sees each result in order; once it says stop, the
    /// recipients after it get no result (`None`).
    pub async fn evaluate_batch<F>(
        self: &Arc<Self>,
        items: Vec<(Subscriber, String)>,
        mut keep_going: F,
    ) -> Result<Vec<(Subscriber, Option<Result<Verdict, PolicyError>>)>, PolicyError>
    where
        F: FnMut(&Result<Verdict, PolicyError>) -> bool + Send + 'static,
    {
        self.on_blocking_pool(move |this| {
            this.with_warm(|this, warm| {
                let mut out = Vec::with_capacity(items.len());
                let mut going = true;
                let mut items = items.into_iter().peekable();
                while items.peek().is_some() {
                    let chunk: Vec<(Subscriber, String)> = items.by_ref().take(BATCH).collect();
                    if !going {
                        out.extend(chunk.into_iter().map(|(s, _)| (s, None)));
                        continue;
                    }
                    let (subscribers, recipients): (Vec<Subscriber>, Vec<types::Recipient>) = chunk
                        .into_iter()
                        .map(|(s, url)| {
                            let r = recipient_input(&s, url);
                            (s, r)
                        })
                        .unzip();
                    let results = this.evaluate_many(warm, recipients);
                    for (subscriber, result) in subscribers.into_iter().zip(results) {
                        if going {
                            going = keep_going(&result);
                            out.push((subscriber, Some(result)));
                        } else {
                            out.push((subscriber, None));
                        }
                    }
                }
                out
            })
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

    /// Filter, then template for those the filter sends, for up to `BATCH` recipients.
    fn evaluate_many(
        &self,
        warm: &mut Warm,
        recipients: Vec<types::Recipient>,
    ) -> Vec<Result<Verdict, PolicyError>> {
        let started = std::time::Instant::now();
        let n = recipients.len();
        let decisions = self.run(
            &self.filter,
            &mut warm.filter,
            &recipients,
            |b, store, batch| match b {
                Bindings::Filter1(f) => {
                    let r = recipient_v1(&batch[0]);
                    let answer = f.call_filter(store, &r, &self.letter_v1)?;
                    Ok(vec![answer.map(decision_v1)])
                }
                Bindings::Filter2(f) => Ok(f
                    .call_filter(store, batch)?
                    .into_iter()
                    .map(|a| a.map(decision_v2))
                    .collect()),
                _ => unreachable!("checked in PolicyHost::evaluator"),
            },
        );
        let mut results: Vec<Option<Result<Verdict, PolicyError>>> = Vec::with_capacity(n);
        let mut to_render = Vec::new();
        for (recipient, decision) in recipients.into_iter().zip(decisions) {
            results.push(match decision {
                Ok(Decision::Send) => {
                    to_render.push((results.len(), recipient));
                    None
                }
                Ok(Decision::Skip(reason)) => Some(Ok(Verdict::Skip(truncate(reason)))),
                Err(e) => Some(Err(e)),
            });
        }
        if !to_render.is_empty() {
            let (slots, recipients): (Vec<usize>, Vec<types::Recipient>) = to_render.into_iter().unzip();
            for (slot, rendered) in slots.into_iter().zip(self.render_many(warm, &recipients)) {
                results[slot] = Some(rendered.map(Verdict::Send));
            }
        }
        if n > 0 {
            metrics::histogram!("letterbox_policy_evaluation_seconds")
                .record(started.elapsed().as_secs_f64() / n as f64);
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(PolicyError::Engine("a recipient got no result".into()))))
            .collect()
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
            this.render_many(&mut Warm::default(), &[recipient])
                .pop()
                .unwrap_or_else(|| Err(PolicyError::Engine("the template returned no result".into())))
        })
        .await?
    }

    fn render_many(
        &self,
        warm: &mut Warm,
        recipients: &[types::Recipient],
    ) -> Vec<Result<Rendered, PolicyError>> {
        let rendered = self.run(
            &self.template,
            &mut warm.template,
            recipients,
            |b, store, batch| match b {
                Bindings::Template1(t) => {
                    let r = recipient_v1(&batch[0]);
                    let answer = t.call_render(store, &r, &self.letter_v1)?;
                    Ok(vec![answer.map(rendered_v1)])
                }
                Bindings::Template2(t) => Ok(t
                    .call_render(store, batch)?
                    .into_iter()
                    .map(|a| a.map(rendered_v2))
                    .collect()),
                _ => unreachable!("checked in PolicyHost::evaluator"),
            },
        );
        let limit = self.host.limits.max_output_bytes;
        rendered
            .into_iter()
            .map(|r| {
                let r = r?;
                let size = r.subject.len()
                    + r.text.len()
                    + r.html.as_ref().map_or(0, String::len)
                    + r.headers.iter().map(|(n, v)| n.len() + v.len()).sum::<usize>();
                if size > limit {
                    return Err(PolicyError::OutputTooLarge {
                        policy: self.template.label.clone(),
                        size,
                        limit,
                    });
                }
                Ok(r)
            })
            .collect()
    }

    /// The letter checks of 0.2 policies (`validate`), each on an instance of its own:
    /// the problems they find, none for 0.1 policies; the template's only if
    /// `with_template`. On the blocking pool.
    pub async fn validate_async(self: &Arc<Self>, with_template: bool) -> Result<Vec<Problem>, PolicyError> {
        self.on_blocking_pool(move |this| {
            let mut problems = Vec::new();
            let policies = if with_template {
                vec![&this.filter, &this.template]
            } else {
                vec![&this.filter]
            };
            for policy in policies {
                let trap = |e: wasmtime::Error| PolicyError::Trap {
                    policy: policy.label.clone(),
                    detail: describe_trap(&e),
                };
                let mut store = this.host.new_store(policy.memory_bytes);
                let letter = &this.letter.0;
                let found = match &policy.pre {
                    Prepared::Filter2(pre) => pre
                        .instantiate(&mut store)
                        .and_then(|f| f.call_validate(&mut store, letter)),
                    Prepared::Template2(pre) => pre
                        .instantiate(&mut store)
                        .and_then(|t| t.call_validate(&mut store, letter)),
                    Prepared::Filter1(_) | Prepared::Template1(_) => continue,
                };
                log_output(policy, &store);
                if let Err(found) = found.map_err(trap)? {
                    problems.extend(found.into_iter().map(|p| Problem {
                        field: truncate(p.field),
                        message: truncate(p.message),
                    }));
                }
            }
            Ok(problems)
        })
        .await?
    }

    /// A fresh instance of `policy`; a 0.2 one is prepared with the letter.
    fn instantiate(&self, policy: &Policy) -> Result<Live, PolicyError> {
        let trap = |e: wasmtime::Error| PolicyError::Trap {
            policy: policy.label.clone(),
            detail: describe_trap(&e),
        };
        let mut store = self.host.new_store(policy.memory_bytes);
        let letter = &self.letter.0;
        let (bindings, prepared) = match &policy.pre {
            Prepared::Filter1(pre) => (
                Bindings::Filter1(pre.instantiate(&mut store).map_err(trap)?),
                Ok(()),
            ),
            Prepared::Template1(pre) => (
                Bindings::Template1(pre.instantiate(&mut store).map_err(trap)?),
                Ok(()),
            ),
            Prepared::Filter2(pre) => {
                let f = pre.instantiate(&mut store).map_err(trap)?;
                let prepared = f.call_prepare(&mut store, letter);
                log_output(policy, &store);
                (Bindings::Filter2(f), prepared.map_err(trap)?)
            }
            Prepared::Template2(pre) => {
                let t = pre.instantiate(&mut store).map_err(trap)?;
                let prepared = t.call_prepare(&mut store, letter);
                log_output(policy, &store);
                (Bindings::Template2(t), prepared.map_err(trap)?)
            }
        };
        Ok(Live {
            store,
            bindings,
            calls: 0,
            prepared: prepared.map_err(truncate),
        })
    }

    /// Answers for `recipients` from `policy`, on the warm instance in `slot` (or a
    /// new one), in calls of at most the policy's batch size. A call that traps loses
    /// its instance; its recipients are then run one at a time on fresh instances, so
    /// only those that trap on their own fail.
    fn run<R>(
        &self,
        policy: &Policy,
        slot: &mut Option<Live>,
        recipients: &[types::Recipient],
        call: impl Fn(&Bindings, &mut Store<HostState>, &[types::Recipient]) -> wasmtime::Result<Answers<R>>,
    ) -> Vec<Result<R, PolicyError>> {
        let mut out = Vec::with_capacity(recipients.len());
        for batch in recipients.chunks(policy.batch_limit()) {
            match self.call_once(policy, slot, batch, &call) {
                Ok(answers) => out.extend(answers),
                Err(e) if batch.len() == 1 => out.push(Err(e)),
                Err(_) => {
                    for one in batch.chunks(1) {
                        match self.call_once(policy, slot, one, &call) {
                            Ok(answers) => out.extend(answers),
                            Err(e) => out.push(Err(e)),
                        }
                    }
                }
            }
        }
        out
    }

    /// One call for `batch`: its answers, or the trap that lost them all.
    fn call_once<R>(
        &self,
        policy: &Policy,
        slot: &mut Option<Live>,
        batch: &[types::Recipient],
        call: &impl Fn(&Bindings, &mut Store<HostState>, &[types::Recipient]) -> wasmtime::Result<Answers<R>>,
    ) -> Result<Vec<Result<R, PolicyError>>, PolicyError> {
        let trap = |detail: String| PolicyError::Trap {
            policy: policy.label.clone(),
            detail,
        };
        let rejected = |reason: String| PolicyError::Rejected {
            policy: policy.label.clone(),
            reason: truncate(reason),
        };
        let mut live = match slot.take() {
            Some(live) if live.calls < RECYCLE_AFTER => live,
            _ => self.instantiate(policy)?,
        };
        if let Err(reason) = &live.prepared {
            let failed = batch
                .iter()
                .map(|_| Err(rejected(format!("prepare failed: {reason}"))))
                .collect();
            *slot = Some(live);
            return Ok(failed);
        }
        live.store
            .set_epoch_deadline(self.host.deadline_ticks() * batch.len() as u64);
        let result = call(&live.bindings, &mut live.store, batch);
        log_output(policy, &live.store);
        let answers = result.map_err(|e| trap(describe_trap(&e)))?;
        if answers.len() != batch.len() {
            // The instance broke the interface's promise: do not trust it again.
            return Err(trap(format!(
                "returned {} answers for {} recipients",
                answers.len(),
                batch.len()
            )));
        }
        live.calls += batch.len() as u32;
        *slot = Some(live);
        Ok(answers.into_iter().map(|a| a.map_err(rejected)).collect())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::SubscriberStatus;

    const TRAP_TEMPLATE: &[u8] =
        include_bytes!(concat!(env!("LETTERBOX_WASM_DIR"), "/test_trap_template.wasm"));
    const HOSTILE_TEMPLATE_V1: &[u8] =
        include_bytes!(concat!(env!("LETTERBOX_WASM_DIR"), "/test_hostile_template.wasm"));

    fn subscriber(id: u64, email: &str) -> Subscriber {
        Subscriber {
            id,
            newsletter_id: 1,
            email: email.into(),
            name: None,
            attributes: Default::default(),
            status: SubscriberStatus::Active,
            created_at: 0,
        }
    }

    fn evaluator(host: &PolicyHost, template: Arc<Policy>) -> Evaluator {
        let filter = host
            .prepare("f", "default-filter", PluginKind::Filter, builtin::DEFAULT_FILTER)
            .unwrap();
        let letter = Letter {
            id: 1,
            newsletter_id: 1,
            subject: "Hi".into(),
            text: "T".into(),
            html: None,
            filter: "default-filter".into(),
            template: "t".into(),
            params: Default::default(),
            created_at: 0,
        };
        let newsletter = Newsletter {
            id: 1,
            name: "N".into(),
            from: "a@example.org".into(),
            created_at: 0,
        };
        host.evaluator(filter, template, LetterInput::new(&letter, &newsletter))
            .unwrap()
    }

    /// A trap inside a batch fails only the recipient that traps: the batch is run
    /// again one by one on fresh instances.
    #[test]
    fn a_trap_fails_only_its_recipient_not_its_batch() {
        let host = PolicyHost::new(PolicyLimits::default(), None).unwrap();
        let template = host
            .prepare("t", "trap", PluginKind::Template, TRAP_TEMPLATE)
            .unwrap();
        assert_eq!(template.wit_version(), "0.2");
        let evaluator = evaluator(&host, template);
        let items: Vec<(Subscriber, String)> = (0..130)
            .map(|i| {
                let email = if i == 70 {
                    "trap@example.org".to_string()
                } else {
                    format!("ok{i}@example.org")
                };
                (subscriber(i, &email), "https://u".to_string())
            })
            .collect();
        let results = evaluator.evaluate_all(&items);
        assert_eq!(results.len(), 130);
        for (i, result) in results.iter().enumerate() {
            match result {
                Err(PolicyError::Trap { detail, .. }) if i == 70 => {
                    assert!(detail.contains("trapped"), "{detail}")
                }
                Ok(Verdict::Send(r)) if i != 70 => assert_eq!(r.text, format!("hello ok{i}@example.org")),
                other => panic!("recipient {i}: {other:?}"),
            }
        }
    }

    /// A 0.1 component (one recipient per call, the whole letter each time) still runs.
    #[test]
    fn components_built_against_wit_0_1_still_run() {
        let host = PolicyHost::new(PolicyLimits::default(), None).unwrap();
        let template = host
            .prepare("h", "hostile", PluginKind::Template, HOSTILE_TEMPLATE_V1)
            .unwrap();
        assert_eq!(template.wit_version(), "0.1");
        let evaluator = evaluator(&host, template);
        let items = vec![
            (subscriber(1, "a@example.org"), "https://u".to_string()),
            (subscriber(2, "b@example.org"), "https://u".to_string()),
        ];
        for result in evaluator.evaluate_all(&items) {
            assert!(matches!(result, Ok(Verdict::Send(_))), "{result:?}");
        }
    }

    /// A component's memory ask (its letterbox:limits section) is its instances' limit,
    /// below or above the server's default, up to the server's ceiling.
    #[test]
    fn a_component_gets_the_memory_it_asks_for() {
        let limits = PolicyLimits {
            memory_bytes: 64 << 20,
            max_memory_bytes: 128 << 20,
            ..PolicyLimits::default()
        };
        let host = PolicyHost::new(limits, None).unwrap();
        let template = |id: &str, ask: Option<u32>| {
            let bytes = builtin::DEFAULT_TEMPLATE.to_vec();
            let bytes = match ask {
                Some(mib) => inspect::with_memory_ask(bytes, mib),
                None => bytes,
            };
            host.prepare(id, "default-template", PluginKind::Template, &bytes)
        };
        let items = vec![(subscriber(1, "a@example.org"), "https://u".to_string())];
        let default = template("t64", None).unwrap();
        assert_eq!(default.memory_bytes(), 64 << 20);
        assert!(matches!(
            evaluator(&host, default).evaluate_all(&items)[0],
            Ok(Verdict::Send(_))
        ));
        let roomy = template("t128", Some(128)).unwrap();
        assert_eq!(roomy.memory_bytes(), 128 << 20);
        assert!(matches!(
            evaluator(&host, roomy).evaluate_all(&items)[0],
            Ok(Verdict::Send(_))
        ));
        // minijinja's instance holds more than 1 MiB: with that little it cannot start.
        let starved = template("t1", Some(1)).unwrap();
        let result = &evaluator(&host, starved).evaluate_all(&items)[0];
        assert!(matches!(result, Err(PolicyError::Trap { .. })), "{result:?}");
        let greedy = template("t256", Some(256));
        assert!(matches!(
            greedy,
            Err(PolicyError::TooMuchMemory {
                asked: 256,
                allowed: 128
            })
        ));
    }
}
