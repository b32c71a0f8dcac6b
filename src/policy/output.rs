//! Guest stdout and stderr. Policies may print (it is how authors debug them); the host
//! keeps the first bytes of each call's output for the log and counts the rest. Writing
//! never blocks, fails or traps the guest, however much it writes.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// What a guest may write per `write` call before it must check again; the host accepts
/// any amount (excess is dropped), this only sizes the guest's chunks.
const WRITE_PERMIT: usize = 64 * 1024;

#[derive(Clone)]
pub struct CappedOutput {
    inner: Arc<Mutex<Captured>>,
}

struct Captured {
    kept: Vec<u8>,
    dropped: usize,
    cap: usize,
}

impl CappedOutput {
    pub fn new(cap: usize) -> Self {
        CappedOutput {
            inner: Arc::new(Mutex::new(Captured {
                kept: Vec::new(),
                dropped: 0,
                cap,
            })),
        }
    }

    fn append(&self, bytes: &[u8]) {
        let mut captured = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let room = captured.cap.saturating_sub(captured.kept.len());
        let keep = room.min(bytes.len());
        captured.kept.extend_from_slice(&bytes[..keep]);
        captured.dropped += bytes.len() - keep;
    }

    /// Takes what was written since the last call: the kept text and how many bytes were
    /// dropped beyond the cap.
    pub fn take(&self) -> (String, usize) {
        let mut captured = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let text = String::from_utf8_lossy(&captured.kept).into_owned();
        captured.kept.clear();
        (text, std::mem::take(&mut captured.dropped))
    }
}

impl IsTerminal for CappedOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CappedOutput {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }

    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for CappedOutput {
    async fn ready(&mut self) {}
}

impl OutputStream for CappedOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.append(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(WRITE_PERMIT)
    }
}

impl AsyncWrite for CappedOutput {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.append(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_first_bytes_and_counts_the_rest() {
        let out = CappedOutput::new(5);
        out.append(b"hello world");
        out.append(b"!");
        assert_eq!(out.take(), ("hello".to_string(), 7));
        assert_eq!(out.take(), (String::new(), 0));
    }
}
