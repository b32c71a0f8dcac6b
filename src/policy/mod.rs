//! Policy host: the only module that knows wasmtime.
//!
//! Policies are WebAssembly components built against `wit/policy.wit`. A component is
//! checked and compiled once per upload: it must be a component (not a core module),
//! import nothing outside `inspect::LINKED_IMPORTS` (checked before compiling), and
//! export the function of its kind's world with the right types. The compiled code is
//! cached on disk (keyed by the component's sha256 and the engine's compatibility hash)
//! and in memory as an `InstancePre`.
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
//!
//! The files: `engine` (the engine, compiling, checking and caching components),
//! `compiler` (compiling in a child process under a memory limit),
//! `sandbox` (the limits and the store every call runs in), `letter` (the filter and
//! template worlds' bindings, 0.1 to 0.3, with their conversions), `evaluator` (warm
//! instances and batches for one job), `automation` (the automation world's bindings,
//! conversions and reaction checks, and `Automaton`, one automation's instances), `inspect` (reading a component before compiling
//! it) and `template_check` (the default template's syntax).

pub mod automation;
pub mod builtin;
pub mod compiler;
mod engine;
mod evaluator;
pub mod inspect;
mod letter;
mod output;
mod sandbox;
mod template_check;

use crate::domain::PluginKind;
pub use automation::{Action, Automaton, Reaction, Trigger, When};
pub use compiler::Compiler;
pub use engine::{Policy, PolicyHost};
pub use evaluator::Evaluator;
pub use letter::LetterInput;
pub use sandbox::PolicyLimits;
pub use template_check::{TemplateProblem, check_default_template};

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
    /// An automation's reaction breaks a rule of the host's (too big, not JSON, a bad name).
    #[error("policy {policy} answered with a reaction letterbox cannot act on: {reason}")]
    BadReaction { policy: String, reason: String },
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
    /// Compiling the component took more memory than a compile may.
    #[error(
        "compiling the component needs more than {limit_mib} MiB of memory, the limit of a \
         compile on this server (policy.compile_memory_mib, --compile-memory-mib)"
    )]
    CompileMemory { limit_mib: u64 },
    #[error("policy engine: {0}")]
    Engine(String),
}

impl PolicyError {
    /// The policy (`name@id-prefix`) whose run failed, for failures of a run.
    pub fn failed_policy(&self) -> Option<&str> {
        match self {
            PolicyError::Trap { policy, .. }
            | PolicyError::Rejected { policy, .. }
            | PolicyError::BadReaction { policy, .. }
            | PolicyError::OutputTooLarge { policy, .. } => Some(policy),
            _ => None,
        }
    }
}

/// What is wrong with one field of a letter, as a 0.2 policy's `validate` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub field: String,
    pub message: String,
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
