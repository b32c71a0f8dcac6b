//! The engine: compiling, checking and caching components (on disk and in memory), the
//! linker, and the epoch ticker every deadline counts on.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;
use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store};

use super::compiler::Compiler;
use super::letter::{v1, v2};
use super::sandbox::{self, EPOCH_TICK, HostState, PolicyLimits};
use super::{PolicyError, automation, inspect};
use crate::domain::PluginKind;

/// A compiled, checked and linked policy, ready to be instantiated.
pub struct Policy {
    /// `name@sha256-prefix`, used in failure reasons and logs.
    pub(super) label: String,
    pub(super) pre: Prepared,
    /// Linear memory each instance may hold: the component's ask, else the default.
    pub(super) memory_bytes: usize,
    /// "0.1", "0.2" or "0.3".
    wit_version: &'static str,
}

/// A component linked against one of the worlds.
pub(super) enum Prepared {
    Filter1(v1::filter::FilterPre<HostState>),
    Template1(v1::template::TemplatePre<HostState>),
    Filter2(v2::filter::FilterPre<HostState>),
    /// 0.3's filter and template worlds are 0.2's: those bindings serve both.
    Template2(v2::template::TemplatePre<HostState>),
    Automation(automation::bindings::AutomationPre<HostState>),
}

impl Policy {
    pub fn kind(&self) -> PluginKind {
        match self.pre {
            Prepared::Filter1(_) | Prepared::Filter2(_) => PluginKind::Filter,
            Prepared::Template1(_) | Prepared::Template2(_) => PluginKind::Template,
            Prepared::Automation(_) => PluginKind::Automation,
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
        self.wit_version
    }
}

/// The policy engine. Cheap to clone.
#[derive(Clone)]
pub struct PolicyHost {
    engine: Engine,
    linker: Arc<Linker<HostState>>,
    pub(super) limits: Arc<PolicyLimits>,
    /// Compiled policies by plugin id. A std mutex: held only for a lookup or an insert,
    /// never across compilation.
    compiled: Arc<Mutex<HashMap<String, Arc<Policy>>>>,
    /// Where serialized compiled components are kept across restarts.
    cache_dir: Option<PathBuf>,
    /// Compiles in a child process (into `cache_dir`) when set; in process otherwise.
    compiler: Option<Compiler>,
    /// The engine's compatibility hash: part of cache file names, so a new wasmtime or
    /// different settings never load stale code.
    compat: String,
    /// Concurrent evaluations in the process: policy calls are CPU-bound, so more than
    /// a few per core only adds live instances and latency.
    pub(super) evaluations: Arc<Semaphore>,
    /// 2 per core: the size of `evaluations`, and the warm instance pairs an
    /// evaluator keeps idle.
    pub(super) parallel_evaluations: usize,
}

impl PolicyHost {
    /// Creates the engine (pooling allocator where the address space can be reserved),
    /// the linker and the epoch ticker. `cache_dir` keeps compiled code across restarts.
    pub fn new(limits: PolicyLimits, cache_dir: Option<PathBuf>) -> Result<Self, PolicyError> {
        let engine_error = |e: wasmtime::Error| PolicyError::Engine(format!("{e:#}"));
        let mut config = compile_config();
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
            compiler: None,
            compat,
            evaluations: Arc::new(Semaphore::new(parallel_evaluations)),
            parallel_evaluations,
        })
    }

    /// Compiles components in child processes run by `compiler` (see `compiler`),
    /// where the host has a cache directory to receive their work.
    pub fn compile_with(mut self, compiler: Compiler) -> Self {
        if self.cache_dir.is_some() {
            self.compiler = Some(compiler);
        }
        self
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
        // The types interface a component imports names its version; one that uses no
        // type of ours is told apart by `prepare` (0.2 on) alone.
        let wit_version = inspect::wit_version(&surface).unwrap_or(if v2 { "0.2" } else { "0.1" });
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
        // Whether `component` came from its file (mapped from it) or still has to be
        // written there.
        let (mut component, from_file) = match (cached, &self.compiler, &cache_file) {
            (Some(component), _, _) => (component, true),
            (None, Some(compiler), Some(file)) => {
                let started = std::time::Instant::now();
                let report = compiler.compile(bytes, file)?;
                tracing::info!(
                    plugin = name,
                    bytes = bytes.len(),
                    seconds = started.elapsed().as_secs_f64(),
                    child_peak_rss_mib = report.peak_rss_kib >> 10,
                    "compiled in a child process"
                );
                // SAFETY: written by our own binary's compile-policy with this engine's
                // compilation settings, into our data directory; wasmtime checks the
                // header (version, target, settings) and refuses a mismatch.
                let component = unsafe { Component::deserialize_file(&self.engine, file) }.map_err(|e| {
                    PolicyError::Engine(format!("cannot load what the compiling child wrote: {e:#}"))
                })?;
                (component, true)
            }
            (None, _, _) => {
                let component = Component::new(&self.engine, bytes)
                    .map_err(|e| PolicyError::InvalidComponent(format!("{e:#}")))?;
                (component, false)
            }
        };
        if !from_file && let Some(file) = &cache_file {
            match write_cache(file, &component) {
                // Used from the file, as after a restart: its code and its memories'
                // initial images are then mapped from the file (shared, evictable),
                // where a fresh compilation's live in anonymous memory, the images
                // copied into sealed memfds (a step the kernel can refuse, transiently,
                // with EBUSY: "cannot add seals to the memfd").
                // SAFETY: as for the cached file above; it was just written by us.
                Ok(()) => match unsafe { Component::deserialize_file(&self.engine, file) } {
                    Ok(mapped) => component = mapped,
                    Err(e) => {
                        tracing::warn!(file = %file.display(), error = %e, "using the compiled policy from memory")
                    }
                },
                Err(e) => tracing::warn!(file = %file.display(), error = %e, "cannot cache compiled policy"),
            }
        }
        let pre = self.check(&component, kind, v2)?;
        let policy = Arc::new(Policy {
            label: format!("{name}@{}", &id[..id.len().min(12)]),
            pre,
            memory_bytes,
            wit_version,
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
            (PluginKind::Automation, _) => Prepared::Automation(
                automation::bindings::AutomationPre::new(instance_pre).map_err(wrong_world)?,
            ),
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
    pub(super) fn new_store(&self, memory_bytes: usize) -> Store<HostState> {
        sandbox::new_store(&self.engine, &self.limits, memory_bytes)
    }
}

/// The engine settings that decide compiled code: the server's engine and a compiling
/// child's both start from these, so what a child writes is what the server would have
/// compiled (wasmtime checks this when it loads the file).
pub(super) fn compile_config() -> Config {
    let mut config = Config::new();
    config.epoch_interruption(true);
    if std::env::var_os("LETTERBOX_PERFMAP").is_some() {
        config.profiler(wasmtime::ProfilingStrategy::PerfMap);
    }
    config
}

fn write_cache(file: &std::path::Path, component: &Component) -> std::io::Result<()> {
    let bytes = component
        .serialize()
        .map_err(|e| std::io::Error::other(format!("{e:#}")))?;
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::builtin;

    /// A compiling child's engine has no pooling allocator (it would reserve gigabytes
    /// of address space under the child's limit): what it compiles must still load in
    /// the server's pooling engine, and run there.
    #[test]
    fn what_a_compiling_child_writes_loads_in_the_server_engine() {
        let dir = tempfile::tempdir().unwrap();
        let host = PolicyHost::new(PolicyLimits::default(), Some(dir.path().to_path_buf())).unwrap();
        let id = "f".repeat(64);
        let compiled = Engine::new(&compile_config())
            .unwrap()
            .precompile_component(builtin::DEFAULT_FILTER)
            .unwrap();
        let file = dir.path().join(format!("{id}-{}.cwasm", host.compat));
        std::fs::write(&file, compiled).unwrap();
        // SAFETY: written just above by wasmtime's own serializer.
        unsafe { Component::deserialize_file(&host.engine, &file) }.expect("the server's engine loads it");
        let before = std::fs::metadata(&file).unwrap().modified().unwrap();
        // `prepare` finds the file in its cache and links it, compiling nothing.
        let policy = host
            .prepare(&id, "default-filter", PluginKind::Filter, builtin::DEFAULT_FILTER)
            .unwrap();
        assert_eq!(policy.kind(), PluginKind::Filter);
        assert_eq!(
            std::fs::metadata(&file).unwrap().modified().unwrap(),
            before,
            "not rewritten"
        );
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "nothing else was written"
        );
    }
}
