//! One client connection's buffers: a bounded input buffer cut into request lines, a bounded
//! output buffer written as the socket takes it, the epoll interest that follows from both, and
//! the times the stall and idle timeouts are measured from.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use event_manager::EventSet;

use crate::api::protocol::MAX_LINE;

/// Most bytes of replies queued for one client; beyond, the client is dropped.
pub const MAX_OUTPUT: usize = 1 << 20;
/// How long queued output may make no progress before the client is dropped.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client may send nothing before it is dropped (so idle connections cannot hold
/// every client slot); `VMM_API_IDLE_TIMEOUT_MS` overrides it.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// The environment variable that overrides [`IDLE_TIMEOUT`] (milliseconds, for tests).
pub const IDLE_TIMEOUT_ENV: &str = "VMM_API_IDLE_TIMEOUT_MS";

/// The idle timeout in force: [`IDLE_TIMEOUT_ENV`] if set to a positive number of
/// milliseconds, else [`IDLE_TIMEOUT`].
pub fn idle_timeout() -> Duration {
    std::env::var(IDLE_TIMEOUT_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|ms| *ms > 0)
        .map_or(IDLE_TIMEOUT, Duration::from_millis)
}

/// One client connection.
pub(super) struct Conn {
    pub(super) stream: UnixStream,
    pub(super) inbuf: Vec<u8>,
    pub(super) outbuf: Vec<u8>,
    /// Bytes of `outbuf` already written.
    pub(super) written: usize,
    /// When output last made progress (or was first queued).
    pub(super) last_progress: Instant,
    /// When the client last sent bytes (or connected).
    pub(super) last_input: Instant,
    /// No more requests are read; close once the output is flushed.
    pub(super) closing: bool,
    /// Drop now (protocol violation or write error).
    pub(super) dead: bool,
    /// The interest currently registered.
    pub(super) interest: EventSet,
}

impl Conn {
    pub(super) fn new(stream: UnixStream) -> Self {
        Conn {
            stream,
            inbuf: Vec::new(),
            outbuf: Vec::new(),
            written: 0,
            last_progress: Instant::now(),
            last_input: Instant::now(),
            closing: false,
            dead: false,
            interest: EventSet::IN,
        }
    }

    pub(super) fn pending(&self) -> usize {
        self.outbuf.len() - self.written
    }

    /// Queue a line; drops the client if its backlog exceeds [`MAX_OUTPUT`].
    pub(super) fn queue(&mut self, line: &[u8]) {
        if self.pending() == 0 {
            self.outbuf.clear();
            self.written = 0;
            self.last_progress = Instant::now();
        }
        if self.pending() + line.len() > MAX_OUTPUT {
            tracing::debug!(
                "control client fd {} does not read its replies: dropped",
                self.stream.as_raw_fd()
            );
            self.dead = true;
            return;
        }
        self.outbuf.extend_from_slice(line);
    }

    /// Writes what the socket takes now.
    pub(super) fn flush(&mut self) {
        while self.pending() > 0 && !self.dead {
            match self.stream.write(&self.outbuf[self.written..]) {
                Ok(0) => self.dead = true,
                Ok(n) => {
                    self.written += n;
                    self.last_progress = Instant::now();
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => self.dead = true,
            }
        }
        if self.pending() == 0 {
            self.outbuf.clear();
            self.written = 0;
        }
    }

    /// Reads what is available, keeping at most `MAX_LINE + 1` bytes buffered (enough to
    /// tell an over-long line; complete lines are served before more is read); returns
    /// whether the peer closed its side.
    pub(super) fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        loop {
            let room = (MAX_LINE + 1).saturating_sub(self.inbuf.len());
            if room == 0 {
                return false;
            }
            let want = room.min(chunk.len());
            match self.stream.read(&mut chunk[..want]) {
                Ok(0) => return true,
                Ok(n) => {
                    self.inbuf.extend_from_slice(&chunk[..n]);
                    self.last_input = Instant::now();
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    self.dead = true;
                    return false;
                }
            }
        }
    }

    /// The next complete line (without its newline), if any.
    pub(super) fn next_line(&mut self) -> Option<Vec<u8>> {
        let pos = self.inbuf.iter().position(|b| *b == b'\n')?;
        let mut line: Vec<u8> = self.inbuf.drain(..=pos).collect();
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        Some(line)
    }

    pub(super) fn has_line(&self) -> bool {
        self.inbuf.contains(&b'\n')
    }

    pub(super) fn wanted_interest(&self) -> EventSet {
        let mut set = EventSet::empty();
        // No reading while a full buffer of requests waits (they are served first).
        if !self.closing && self.inbuf.len() <= MAX_LINE {
            set |= EventSet::IN;
        }
        if self.pending() > 0 {
            set |= EventSet::OUT;
        }
        set
    }
}
