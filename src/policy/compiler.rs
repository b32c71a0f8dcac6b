//! Compiling a component in a child process, so the server never holds what a compile
//! takes: Cranelift needs 10–40x a component's size (a 40 MB Python component peaked
//! the server at 508 MiB when it compiled in process), and a server that must stay
//! small for a million-recipient send should not grow for an upload.
//!
//! The child is the same binary (`letterbox compile-policy`, hidden), run with the
//! component on stdin. It sets its own address-space limit (`RLIMIT_AS`,
//! `policy.compile_memory_mib`) before anything else, builds an engine with the
//! server's compilation settings (`engine::compile_config`) and writes the serialized
//! code where the server's cache expects it; the server then maps that file, as it does
//! after a restart. A component that needs more memory fails that compile, with that
//! reason, and only the child dies. The server loads nothing a child wrote unless
//! wasmtime's header check on the file passes.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use wasmtime::Engine;

use super::PolicyError;
use super::engine::compile_config;

/// The child's exit code for a component that does not compile; its stderr holds why.
const INVALID: i32 = 2;
/// Longer than any compile seen here (a 41.5 MB component: 5.6 s), short enough that a
/// stuck child does not hold the node's one compile slot for good.
const TIMEOUT: Duration = Duration::from_secs(600);
/// What the server keeps of each of a child's pipes (its report on stdout, its reason on
/// stderr).
const MAX_PIPE: u64 = 16 << 10;

/// How this process compiles components: in a child, or (without a binary to run, as in
/// the library's own tests) in process.
#[derive(Debug, Clone)]
pub struct Compiler {
    /// The letterbox binary to run as `compile-policy`.
    pub exe: PathBuf,
    /// The child's address-space limit.
    pub memory_bytes: u64,
}

/// What a child reports on stdout when it succeeds.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct ChildReport {
    /// The child's peak resident memory, in KiB.
    pub peak_rss_kib: u64,
}

impl Compiler {
    /// Compiles `bytes` into `out` (a serialized component) in a child process.
    pub(super) fn compile(&self, bytes: &[u8], out: &Path) -> Result<ChildReport, PolicyError> {
        let engine = |what: String| PolicyError::Engine(format!("compiling in a child process: {what}"));
        let mut child = Command::new(&self.exe)
            .arg("compile-policy")
            .arg("--out")
            .arg(out)
            .arg("--memory-bytes")
            .arg(self.memory_bytes.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // An address-space limit counts what the allocator reserves, not what it
            // uses: mimalloc (the binary's allocator, main.rs) reserves 1 GiB per arena
            // up front, which the limit would refuse at the first thread. Without
            // arenas it maps segments as it needs them.
            .env("MIMALLOC_ARENA_RESERVE", "0")
            .spawn()
            .map_err(|e| engine(format!("cannot start {}: {e}", self.exe.display())))?;
        // Readers first, so a chatty child never blocks on a full pipe while we write.
        let stdout = child.stdout.take().map(read_capped);
        let stderr = child.stderr.take().map(read_capped);
        let written = child.stdin.take().map(|mut stdin| stdin.write_all(bytes));
        let status = wait(&mut child)?;
        let stdout = stdout.and_then(|h| h.join().ok()).unwrap_or_default();
        let stderr = stderr.and_then(|h| h.join().ok()).unwrap_or_default();
        let stderr = stderr.trim();
        if status.success() {
            return serde_json::from_str(stdout.trim())
                .map_err(|e| engine(format!("unreadable report {stdout:?}: {e}")));
        }
        if out_of_memory(status, stderr) {
            return Err(PolicyError::CompileMemory {
                limit_mib: self.memory_bytes >> 20,
            });
        }
        if status.code() == Some(INVALID) {
            return Err(PolicyError::InvalidComponent(stderr.to_string()));
        }
        // The child died before reading everything: why is in its stderr, if anywhere.
        if let Some(Err(e)) = written {
            tracing::debug!(error = %e, "the compiling child stopped reading");
        }
        Err(engine(format!("{status}: {stderr}")))
    }
}

/// Reads a child's pipe to its end, keeping the first `MAX_PIPE` bytes.
fn read_capped(pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        let mut pipe = pipe;
        let _ = pipe.by_ref().take(MAX_PIPE).read_to_end(&mut kept);
        let _ = std::io::copy(&mut pipe, &mut std::io::sink());
        String::from_utf8_lossy(&kept).into_owned()
    })
}

fn wait(child: &mut std::process::Child) -> Result<ExitStatus, PolicyError> {
    let started = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(status),
            Ok(None) if started.elapsed() < TIMEOUT => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(PolicyError::Engine(format!(
                    "compiling took longer than {} s; stopped",
                    TIMEOUT.as_secs()
                )));
            }
            Err(e) => {
                return Err(PolicyError::Engine(format!(
                    "waiting for the compiling child: {e}"
                )));
            }
        }
    }
}

/// Whether a child died for want of memory, the one limit it runs under: Rust's
/// allocation failure aborts (SIGABRT) after saying so; a failed `mmap` is ENOMEM, and a
/// thread whose stack cannot be mapped EAGAIN; the kernel's OOM killer sends SIGKILL.
fn out_of_memory(status: ExitStatus, stderr: &str) -> bool {
    use std::os::unix::process::ExitStatusExt;
    matches!(status.signal(), Some(libc::SIGABRT | libc::SIGKILL))
        || [
            "memory allocation of",
            "Cannot allocate memory",
            "out of memory",
            "Resource temporarily unavailable",
        ]
        .iter()
        .any(|sign| stderr.contains(sign))
}

/// The child: `letterbox compile-policy --out FILE --memory-bytes N`. Returns the exit code.
pub fn child_main(out: &Path, memory_bytes: u64) -> i32 {
    // A panic says what it was and nothing more. The default hook may print a
    // backtrace, whose symbols it reads into memory under a lock; out of memory there,
    // the allocation-failure handler waits for that same lock, and the child would hang
    // instead of dying (seen: rayon's thread pool failing under the limit). Nothing
    // here allocates.
    std::panic::set_hook(Box::new(|info| {
        let message = crate::logging::panic_message(info.payload());
        let mut stderr = std::io::stderr().lock();
        let _ = stderr.write_all(b"the compile panicked: ");
        let _ = stderr.write_all(message.as_bytes());
        let _ = stderr.write_all(b"\n");
    }));
    if let Err(e) = limit_address_space(memory_bytes) {
        eprintln!("cannot limit the compile's memory: {e}");
        return 1;
    }
    let mut bytes = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut bytes) {
        eprintln!("cannot read the component: {e}");
        return 1;
    }
    let compiled = match Engine::new(&compile_config()).and_then(|engine| engine.precompile_component(&bytes))
    {
        Ok(compiled) => compiled,
        Err(e) => {
            eprintln!("{e:#}");
            return INVALID;
        }
    };
    drop(bytes);
    // Written whole, then renamed: the server never maps a half-written file.
    let tmp = out.with_extension("tmp");
    if let Err(e) = std::fs::write(&tmp, &compiled).and_then(|()| std::fs::rename(&tmp, out)) {
        eprintln!("cannot write {}: {e}", out.display());
        return 1;
    }
    let report = ChildReport {
        peak_rss_kib: peak_rss_kib(),
    };
    println!("{}", serde_json::to_string(&report).unwrap_or_default());
    0
}

fn limit_address_space(bytes: u64) -> std::io::Result<()> {
    let limit = libc::rlimit {
        rlim_cur: bytes,
        rlim_max: bytes,
    };
    // SAFETY: setrlimit reads the struct we pass and changes only this process's limit.
    if unsafe { libc::setrlimit(libc::RLIMIT_AS, &limit) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn peak_rss_kib() -> u64 {
    // SAFETY: getrusage writes into the zeroed struct we own.
    unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut usage) == 0 {
            usage.ru_maxrss as u64
        } else {
            0
        }
    }
}
