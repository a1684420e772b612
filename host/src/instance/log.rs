//! A guest's stdout and stderr, as log lines of the host.
//!
//! Invariants:
//! - each complete line becomes one log event carrying the instance's name
//!   and the stream; a line is complete at `\n`, however many writes it
//!   took (one line buffer per instance and stream, shared by every handle
//!   the guest opens), or at [`MAX_LOG_LINE`] bytes;
//! - an instance logs at most `limits.log_rate` lines a second (bursts of
//!   ten seconds' worth); lines beyond are dropped and counted, and the
//!   next line logged is preceded by `N lines dropped`;
//! - control characters (CR, NUL, escapes, …) are shown escaped, so a guest
//!   cannot forge or hide log lines; a partial line is logged when the
//!   instance goes;
//! - writes never fail and never block: the host's own stdout being closed
//!   or slow is the logger's business, not the guest's.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

use crate::throttle::Throttle;

/// Longest line kept before it is logged in pieces.
pub const MAX_LOG_LINE: usize = 16 << 10;

/// The two streams a guest logs through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// `wasi:cli/stdout`.
    Stdout,
    /// `wasi:cli/stderr`.
    Stderr,
}

impl Stream {
    fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// The log of one instance: its line buffers and its throttle.
struct Lines {
    instance: Arc<str>,
    partial: [Vec<u8>; 2],
    throttle: Throttle,
}

impl Lines {
    fn buffer(&mut self, stream: Stream) -> &mut Vec<u8> {
        match stream {
            Stream::Stdout => &mut self.partial[0],
            Stream::Stderr => &mut self.partial[1],
        }
    }

    fn emit(&mut self, stream: Stream, line: &[u8]) {
        let Some(dropped) = self.throttle.allow() else {
            return;
        };
        if dropped > 0 {
            Self::report_dropped(&self.instance, dropped);
        }
        let line = escaped(&String::from_utf8_lossy(line));
        tracing::info!(
            target: "guest",
            instance = %self.instance,
            stream = stream.name(),
            "{line}"
        );
    }

    fn report_dropped(instance: &str, dropped: u64) {
        tracing::warn!(
            target: "guest",
            instance = %instance,
            "{dropped} lines dropped: the instance logs faster than its `limits.log_rate`"
        );
    }

    fn push(&mut self, stream: Stream, mut bytes: &[u8]) {
        // Taken out while lines are emitted; put back with its capacity.
        let mut partial = std::mem::take(self.buffer(stream));
        while let Some(i) = bytes.iter().position(|b| *b == b'\n') {
            if partial.is_empty() {
                self.emit(stream, &bytes[..i]);
            } else {
                partial.extend_from_slice(&bytes[..i]);
                self.emit(stream, &partial);
                partial.clear();
            }
            bytes = &bytes[i + 1..];
        }
        partial.extend_from_slice(bytes);
        if partial.len() >= MAX_LOG_LINE {
            self.emit(stream, &partial);
            partial.clear();
        }
        *self.buffer(stream) = partial;
    }
}

impl Drop for Lines {
    fn drop(&mut self) {
        for stream in [Stream::Stdout, Stream::Stderr] {
            let line = std::mem::take(self.buffer(stream));
            if !line.is_empty() {
                self.emit(stream, &line);
            }
        }
        let dropped = self.throttle.take_refused();
        if dropped > 0 {
            Self::report_dropped(&self.instance, dropped);
        }
    }
}

/// `line` without its line ending, with every control character but tab
/// escaped (`\r` → `\u{d}`).
fn escaped(line: &str) -> String {
    let line = line.trim_end_matches(['\r', '\n']);
    if !line.chars().any(|c| c.is_control() && c != '\t') {
        return line.to_string();
    }
    line.chars()
        .map(|c| {
            if c.is_control() && c != '\t' {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// One of an instance's two log streams, as wasi sees it.
#[derive(Clone)]
pub struct GuestLog {
    lines: Arc<Mutex<Lines>>,
    stream: Stream,
}

impl GuestLog {
    /// The stdout and stderr of `instance`, logging at most `rate` lines a
    /// second together.
    pub fn pair(instance: &Arc<str>, rate: u32) -> (GuestLog, GuestLog) {
        let lines = Arc::new(Mutex::new(Lines {
            instance: instance.clone(),
            partial: [Vec::new(), Vec::new()],
            throttle: Throttle::per_second(rate),
        }));
        let stdout = GuestLog {
            lines: lines.clone(),
            stream: Stream::Stdout,
        };
        let stderr = GuestLog {
            lines,
            stream: Stream::Stderr,
        };
        (stdout, stderr)
    }

    fn push(&self, bytes: &[u8]) {
        // A poisoned lock only means a panic while logging; the buffers are
        // still whole lines or less.
        self.lines
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(self.stream, bytes);
    }
}

impl IsTerminal for GuestLog {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestLog {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for GuestLog {
    async fn ready(&mut self) {}
}

impl OutputStream for GuestLog {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 << 10)
    }
}

impl AsyncWrite for GuestLog {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_plain_lines_kept() {
        assert_eq!(escaped("plain\ttext\r\n"), "plain\ttext");
        assert_eq!(escaped("fake\rINFO forged"), "fake\\u{d}INFO forged");
        assert_eq!(escaped("nul\0bell\x07"), "nul\\u{0}bell\\u{7}");
        assert_eq!(escaped("ünïcödé"), "ünïcödé");
    }
}
