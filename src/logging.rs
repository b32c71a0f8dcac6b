//! The process's log output: where lines go, and what happens when they cannot go there.
//!
//! A log is never allowed to fail the program or slow a delivery. Lines are formatted by
//! `tracing-subscriber` on the thread that logs and handed to one writer thread
//! (`tracing-appender`'s non-blocking writer) through a bounded queue; the logging thread
//! never waits for the output. A line is dropped, and counted, when:
//! - the queue is full (the output is slower than the program: a stalled pipe reader, a
//!   slow disk);
//! - the write fails (EPIPE when the reader of a pipe has exited, ENOSPC on a full disk,
//!   EBADF on a closed descriptor).
//!
//! Nothing is printed about a dropped line where it happens (tracing-subscriber's own
//! complaint is an `eprintln!`, which panics when stderr fails as well: that is how a
//! closed pipe used to take the server down). The count is `dropped_lines()`, shown in
//! `/metrics` as `letterbox_log_lines_dropped_total`; when writes work again, the first
//! line written is a note of how many were lost.
//!
//! This module owns the process-wide subscriber and the panic hook; it knows nothing of
//! HTTP or the store.

use std::io::{self, IsTerminal, Write};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};

/// Lines the queue holds before new ones are dropped. A burst of this many lines is
/// absorbed while the output is slow; at ~200 bytes a line it is ~1.6 MB at most.
const QUEUE_LINES: usize = 8192;

/// Lines whose write failed (counted by `Output`).
static WRITE_FAILURES: AtomicU64 = AtomicU64::new(0);
/// Lines dropped because the queue was full (counted by tracing-appender).
static QUEUE_DROPS: OnceLock<ErrorCounter> = OnceLock::new();

/// How log lines look.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// For people.
    Human,
    /// One JSON object per line, with the spans as fields, for a log collector.
    Json,
}

/// Keeps the writer thread alive; dropping it writes what is queued (waiting a second
/// at most for a stalled output) and stops the thread. Hold it until the program ends.
pub struct Guard(#[allow(dead_code)] WorkerGuard);

/// Log lines dropped since the process started: they could not be written, or the
/// output could not keep up.
pub fn dropped_lines() -> u64 {
    let queue = QUEUE_DROPS.get().map_or(0, |c| c.dropped_lines() as u64);
    WRITE_FAILURES.load(Ordering::Relaxed) + queue
}

/// Installs the process-wide subscriber: lines matching `filter` (an `EnvFilter`
/// directive such as `info` or `warn,letterbox=debug`), in `format`, to stdout.
pub fn init(format: Format, filter: tracing_subscriber::EnvFilter) -> Guard {
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUE_LINES)
        .thread_name("letterbox-log")
        .finish(Output::new(io::stdout()));
    let _ = QUEUE_DROPS.set(writer.error_counter());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        // Colour only for a person at a terminal: escape codes in a file, a pipe or a
        // log collector are noise. This replaces tracing-subscriber's own default, so
        // it keeps that default's NO_COLOR rule (no-color.org: set and not empty).
        .with_ansi(io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()))
        // Its complaint about a failed write is an `eprintln!`: never.
        .log_internal_errors(false);
    let installed = match format {
        Format::Human => logs.try_init(),
        // Spans as fields of each line, so a job's or request's context travels with it.
        Format::Json => logs
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .try_init(),
    };
    if let Err(e) = installed {
        // Only when a subscriber is already set (a test calling this twice): keep it.
        let _ = writeln!(io::stderr(), "letterbox: logging already set up: {e}");
    }
    Guard(guard)
}

/// Panics are logged, with where they happened and on which thread, instead of printed
/// to stderr (which may be the very pipe that has closed). Whoever catches the panic
/// (the request layer, a delivery's task, the store's writer) decides what happens
/// next; this only makes it visible.
pub fn log_panics() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let message = panic_message(info.payload());
        let location = info
            .location()
            .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
            .unwrap_or_default();
        tracing::error!(
            thread = thread.name().unwrap_or("unnamed"),
            %location,
            "panic: {message}"
        );
    }));
}

/// The text a panic was raised with. Borrowed, not copied: a policy compile's child
/// reports its panics with this while out of memory (`policy::compiler`).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("no message")
}

/// Writes to the real output, and never fails: a line that cannot be written is
/// counted and dropped. After failures, the next line that goes through is preceded by
/// a note of how many were lost.
struct Output<W: Write> {
    inner: W,
    /// Failures since the last line that was written, and the last one's error.
    failing: Option<(u64, io::Error)>,
}

impl<W: Write> Output<W> {
    fn new(inner: W) -> Output<W> {
        Output { inner, failing: None }
    }

    fn failed(&mut self, e: io::Error) {
        WRITE_FAILURES.fetch_add(1, Ordering::Relaxed);
        let count = self.failing.as_ref().map_or(0, |(n, _)| *n);
        self.failing = Some((count + 1, e));
    }
}

impl<W: Write> Write for Output<W> {
    /// One call per line (the worker writes each line with `write_all`, and this takes
    /// the whole buffer or drops it).
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        if let Some((lost, e)) = &self.failing {
            let note = format!("letterbox: {lost} log line(s) could not be written ({e}) and were dropped\n");
            if let Err(e) = self.inner.write_all(note.as_bytes()) {
                self.failed(e);
                return Ok(line.len());
            }
            self.failing = None;
        }
        if let Err(e) = self.inner.write_all(line) {
            self.failed(e);
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        // A flush that fails loses nothing more than the writes did.
        let _ = self.inner.flush();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that fails while `broken` is set.
    struct Flaky {
        broken: bool,
        written: Vec<u8>,
    }

    impl Write for Flaky {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.broken {
                return Err(io::Error::from(io::ErrorKind::BrokenPipe));
            }
            self.written.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            if self.broken {
                return Err(io::Error::from(io::ErrorKind::BrokenPipe));
            }
            Ok(())
        }
    }

    #[test]
    fn a_failed_line_is_dropped_counted_and_noted_once_writes_work_again() {
        let mut out = Output::new(Flaky {
            broken: false,
            written: Vec::new(),
        });
        let before = WRITE_FAILURES.load(Ordering::Relaxed);
        out.write_all(b"one\n").unwrap();
        out.inner.broken = true;
        out.write_all(b"two\n").unwrap();
        out.write_all(b"three\n").unwrap();
        out.flush().unwrap();
        assert!(WRITE_FAILURES.load(Ordering::Relaxed) - before >= 2);
        out.inner.broken = false;
        out.write_all(b"four\n").unwrap();
        let text = String::from_utf8(out.inner.written).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "one");
        assert!(
            lines[1].starts_with("letterbox: 2 log line(s) could not be written"),
            "{text}"
        );
        assert_eq!(lines[2], "four");
        assert_eq!(lines.len(), 3, "{text}");
    }
}
