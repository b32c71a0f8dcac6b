//! The sandbox every policy call runs in: the limits (memory, tables, instances, the
//! epoch deadline), the WASI context that grants nothing, and the capture of what a
//! guest prints.

use std::time::Duration;

use wasmtime::component::ResourceTable;
use wasmtime::{Engine, Store, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::output::CappedOutput;

/// How often the epoch advances; deadlines are counted in these ticks.
pub(super) const EPOCH_TICK: Duration = Duration::from_millis(5);

/// The wall-clock budget of an instance's setup (instantiation and `prepare` together,
/// or instantiation and `validate`), unless the per-recipient timeout is longer.
const SETUP_BUDGET: Duration = Duration::from_secs(1);

/// Bytes of guest stdout and of stderr kept per call for the log.
const OUTPUT_LOG_CAP: usize = 4096;

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
    /// The address space a compile's child process may use (see `compiler`).
    pub compile_memory_bytes: usize,
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
            // A 41.5 MB Python component compiled at 508 MiB resident.
            compile_memory_bytes: 1024 << 20,
        }
    }
}

/// Per-store data: the WASI context (which grants nothing) and the limiter.
pub(super) struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(super) limits: Limiter,
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
pub(super) struct Limiter {
    limits: StoreLimits,
    pub(super) memory: usize,
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

impl PolicyLimits {
    /// The budget of an instance's setup: instantiation with `prepare`, or `validate`.
    /// It is paid once per instance (about 1,000 recipients), and an interpreter's start
    /// on a busy machine needs more than one recipient's 100 ms: measured, a Python
    /// policy's instantiation and `validate` took over 100 ms with both cores busy.
    pub(super) fn setup_ticks(&self) -> u64 {
        let setup = self.timeout.max(SETUP_BUDGET);
        (setup.as_millis() / EPOCH_TICK.as_millis()).max(1) as u64
    }

    /// The budget of one call for one recipient.
    pub(super) fn deadline_ticks(&self) -> u64 {
        (self.timeout.as_millis() / EPOCH_TICK.as_millis()).max(1) as u64
    }
}

/// A store for one instance of a policy whose instances may hold `memory_bytes`.
pub(super) fn new_store(engine: &Engine, limits: &PolicyLimits, memory_bytes: usize) -> Store<HostState> {
    let store_limits = StoreLimitsBuilder::new()
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
        engine,
        HostState {
            wasi,
            table: ResourceTable::new(),
            limits: Limiter {
                limits: store_limits,
                memory: 0,
            },
            stdout,
            stderr,
        },
    );
    store.limiter(|state| &mut state.limits);
    // A new store's deadline is epoch 0, already past: instantiation (which runs the
    // component's start code) needs a budget too: the setup budget, which `prepare`
    // and `validate` then share.
    store.set_epoch_deadline(limits.setup_ticks());
    store
}

/// Sends what a call printed to the log, noting how much was cut.
pub(super) fn log_output(label: &str, store: &Store<HostState>) {
    for (stream, output) in [("stdout", &store.data().stdout), ("stderr", &store.data().stderr)] {
        let (text, dropped) = output.take();
        if !text.is_empty() || dropped > 0 {
            tracing::info!(policy = %label, stream, dropped, "{}", text.trim_end());
        }
    }
}
