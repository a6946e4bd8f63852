//! The control-socket server: binding the socket (mode 0600, stale-socket replacement, never
//! stealing a live one), one event-manager subscriber owning the listener, the VM-end eventfd
//! and every connection, and the loop that serves on the VMM's main thread until the VM ends.
//!
//! Robustness: every connection has a bounded input buffer ([`MAX_LINE`]: a longer line gets
//! `line_too_long` and the connection is closed) and a bounded output buffer
//! ([`MAX_OUTPUT`]: a client that does not read its replies is dropped, as is one whose pending
//! output makes no progress for [`STALL_TIMEOUT`]); at most [`MAX_REQUESTS_PER_TURN`] requests
//! of one client are handled before the others get a turn; garbage gets an error reply; a
//! client that disconnects mid-line is forgotten. None of this reaches the vCPU threads: they
//! never wait for the server (`pause` waits for them, bounded).

use std::collections::{HashMap, HashSet};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use serde::Serialize;
use serde_json::Value;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use super::protocol::{
    decode_request, to_line, ConfigReply, ErrorCode, Event, Greeting, GreetingLine, Reply, Request,
    StateReply, StatsReply, VmEndEvent, VmState, MAX_LINE, PROTOCOL_VERSION,
};
use crate::config::VmConfig;
use crate::vcpu::{ExitCounts, VmEnd, VmShared};

/// Most clients served at once; more are told `too_many_clients` and closed.
pub const MAX_CLIENTS: usize = 64;
/// Most bytes of replies queued for one client; beyond, the client is dropped.
pub const MAX_OUTPUT: usize = 1 << 20;
/// How long queued output may make no progress before the client is dropped.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests of one client handled per loop turn (fairness between clients).
pub const MAX_REQUESTS_PER_TURN: usize = 32;
/// How long `pause` waits for vCPUs inside an exit (e.g. a conversion batch) to park.
pub const PAUSE_SETTLE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the vm_end event may take to reach the clients at the end.
const FAREWELL_TIMEOUT: Duration = Duration::from_millis(250);

const TOKEN_LISTENER: u32 = 0;
const TOKEN_END: u32 = 1;
const TOKEN_WAKE: u32 = 2;
const TOKEN_TICK: u32 = 3;
const TOKEN_CONN: u32 = 4;
/// Longest a `stats` snapshot is reused (see `Snapshot::reuse_for`).
pub const SNAPSHOT_MAX_REUSE: Duration = Duration::from_millis(250);
/// Period of the housekeeping timer (stalled clients) and of the loop's end check.
const TICK: Duration = Duration::from_millis(500);

/// Errors setting up or running the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A VMM is serving on this socket.
    #[error("--api-socket {0}: a running VMM is serving on this socket; choose another path or stop that VMM")]
    InUse(PathBuf),
    /// The path exists and is not a socket: never removed.
    #[error("--api-socket {0}: the path exists and is not a socket (not removed)")]
    NotASocket(PathBuf),
    /// Checking an existing socket failed.
    #[error("--api-socket {path}: cannot check the existing socket: {source}")]
    Probe {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Binding failed.
    #[error("--api-socket {path}: cannot create the socket: {source}")]
    Bind {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The event loop could not be set up.
    #[error("control socket event loop: {0}")]
    EventLoop(String),
}

/// The bound control socket. Dropping it removes the socket file (if it is still ours).
pub struct ApiSocket {
    listener: UnixListener,
    path: PathBuf,
    /// (st_dev, st_ino) of the socket file we created.
    identity: Option<(u64, u64)>,
}

impl ApiSocket {
    /// Binds a Unix stream socket at `path`, mode 0600. A socket file nobody serves (a dead
    /// VMM's) is replaced; one a live process accepts on is left alone ([`ServerError::InUse`]);
    /// anything that is not a socket is never touched.
    pub fn bind(path: &Path) -> Result<Self, ServerError> {
        match std::fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(ServerError::NotASocket(path.to_path_buf()))
            }
            Ok(_) => match UnixStream::connect(path) {
                Ok(_) => return Err(ServerError::InUse(path.to_path_buf())),
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                    tracing::info!("replacing stale control socket {}", path.display());
                    if let Err(e) = std::fs::remove_file(path) {
                        if e.kind() != ErrorKind::NotFound {
                            return Err(ServerError::Probe {
                                path: path.to_path_buf(),
                                source: e,
                            });
                        }
                    }
                }
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(ServerError::Probe {
                        path: path.to_path_buf(),
                        source: e,
                    })
                }
            },
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => {
                return Err(ServerError::Probe {
                    path: path.to_path_buf(),
                    source: e,
                })
            }
        }
        let bind_err = |source| ServerError::Bind {
            path: path.to_path_buf(),
            source,
        };
        // The socket is created 0600 (umask), so no other user can connect even briefly. The
        // mask is process-wide: `vmm run` binds before the VM's threads start.
        // SAFETY: umask only swaps the process's file-creation mask.
        let old = unsafe { libc::umask(0o177) };
        let bound = UnixListener::bind(path);
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let listener = bound.map_err(bind_err)?;
        let mut socket = ApiSocket {
            listener,
            path: path.to_path_buf(),
            identity: None,
        };
        let meta = std::fs::symlink_metadata(path).map_err(bind_err)?;
        socket.identity = Some((meta.dev(), meta.ino()));
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
        socket.listener.set_nonblocking(true).map_err(bind_err)?;
        Ok(socket)
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ApiSocket {
    fn drop(&mut self) {
        // Only remove the file if it is still the socket we created.
        let ours = std::fs::symlink_metadata(&self.path)
            .map(|m| Some((m.dev(), m.ino())) == self.identity)
            .unwrap_or(false);
        if ours {
            if let Err(e) = std::fs::remove_file(&self.path) {
                tracing::warn!("cannot remove {}: {e}", self.path.display());
            }
        }
    }
}

/// What the server answers from.
pub struct VmContext {
    /// The running VM's shared state (memconv, exit counts, vCPU control, end).
    pub shared: Arc<VmShared>,
    /// How it was started.
    pub config: VmConfig,
    /// `pvm` or `hardware`.
    pub host: &'static str,
    /// Whether guest code runs natively.
    pub native: bool,
    /// When the VM was created.
    pub created: Instant,
}

/// One client connection.
struct Conn {
    stream: UnixStream,
    inbuf: Vec<u8>,
    outbuf: Vec<u8>,
    /// Bytes of `outbuf` already written.
    written: usize,
    /// When output last made progress (or was first queued).
    last_progress: Instant,
    /// No more requests are read; close once the output is flushed.
    closing: bool,
    /// Drop now (protocol violation or write error).
    dead: bool,
    /// The interest currently registered.
    interest: EventSet,
}

impl Conn {
    fn new(stream: UnixStream) -> Self {
        Conn {
            stream,
            inbuf: Vec::new(),
            outbuf: Vec::new(),
            written: 0,
            last_progress: Instant::now(),
            closing: false,
            dead: false,
            interest: EventSet::IN,
        }
    }

    fn pending(&self) -> usize {
        self.outbuf.len() - self.written
    }

    /// Queue a line; drops the client if its backlog exceeds [`MAX_OUTPUT`].
    fn queue(&mut self, line: &[u8]) {
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
    fn flush(&mut self) {
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
    fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        loop {
            let room = (MAX_LINE + 1).saturating_sub(self.inbuf.len());
            if room == 0 {
                return false;
            }
            let want = room.min(chunk.len());
            match self.stream.read(&mut chunk[..want]) {
                Ok(0) => return true,
                Ok(n) => self.inbuf.extend_from_slice(&chunk[..n]),
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
    fn next_line(&mut self) -> Option<Vec<u8>> {
        let pos = self.inbuf.iter().position(|b| *b == b'\n')?;
        let mut line: Vec<u8> = self.inbuf.drain(..=pos).collect();
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        Some(line)
    }

    fn has_line(&self) -> bool {
        self.inbuf.contains(&b'\n')
    }

    fn wanted_interest(&self) -> EventSet {
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

/// What a `stats` reply is made of, taken at one instant.
struct Snapshot {
    taken: Instant,
    /// How long taking it took (memconv's lock wait and kernel queries, mostly).
    cost: Duration,
    uptime_ms: u64,
    exits: Vec<ExitCounts>,
    vcpu_pauses: u64,
    memconv: memconv::StatsSnapshot,
}

impl Snapshot {
    /// How long this snapshot answers `stats`: 100 times what it cost, at most
    /// [`SNAPSHOT_MAX_REUSE`]. memconv's snapshot holds its lock (a converting vCPU waits) while
    /// it asks the kernel about the stores: this bounds the time spent in it at ~1%, however
    /// many clients poll however often, and keeps replies as fresh as that allows.
    fn reuse_for(&self) -> Duration {
        (self.cost * 100).min(SNAPSHOT_MAX_REUSE)
    }
}

/// The event-manager subscriber: listener, VM-end eventfd, wake eventfd, connections.
struct Server {
    listener: UnixListener,
    end_event: EventFd,
    /// Written to when some client still has complete requests queued (fairness).
    wake: EventFd,
    /// Housekeeping every [`TICK`].
    timer: TimerFd,
    conns: HashMap<RawFd, Conn>,
    backlog: HashSet<RawFd>,
    ctx: VmContext,
    /// Whether the control socket holds the vCPUs paused.
    paused: bool,
    /// Shutdown was asked.
    shutting_down: bool,
    greeting: Vec<u8>,
    /// Set when the VM-end eventfd fired.
    ended: bool,
    /// The latest `stats` snapshot (dropped by pause/resume/shutdown).
    snapshot: Option<Snapshot>,
}

fn serialize_line<T: Serialize>(message: &T) -> Vec<u8> {
    match to_line(message) {
        Ok(line) => line,
        Err(e) => {
            tracing::error!("control socket: cannot serialize a reply: {e}");
            // A constant, valid line.
            b"{\"ok\":false,\"error\":{\"code\":\"internal\",\"message\":\"reply serialization failed\"}}\n"
                .to_vec()
        }
    }
}

fn error_line(id: Option<Value>, code: ErrorCode, message: impl Into<String>) -> Vec<u8> {
    serialize_line(&Reply::error(id, code, message))
}

impl Server {
    fn state(&self) -> VmState {
        if self.shutting_down
            || self.ended
            || self.ctx.shared.wait_end(Some(Duration::ZERO)).is_some()
        {
            VmState::Ending
        } else if self.paused {
            VmState::Paused
        } else {
            VmState::Running
        }
    }

    /// The `stats` reply: from a fresh snapshot, or from the previous one while it is younger
    /// than [`Snapshot::reuse_for`] (so that pollers cost the VM at most ~1%).
    fn stats(&mut self) -> StatsReply {
        let now = Instant::now();
        let snapshot = match self.snapshot.take() {
            Some(s) if now.duration_since(s.taken) < s.reuse_for() => s,
            _ => self.take_snapshot(),
        };
        let reply = StatsReply {
            protocol: PROTOCOL_VERSION,
            state: self.state(),
            uptime_ms: snapshot.uptime_ms,
            age_ms: now.saturating_duration_since(snapshot.taken).as_millis() as u64,
            snapshot_us: snapshot.cost.as_micros() as u64,
            cpus: self.ctx.config.cpus,
            exits_total: snapshot.exits.iter().map(|e| e.total).sum(),
            exits: snapshot.exits.clone(),
            vcpu_pauses: snapshot.vcpu_pauses,
            memconv: snapshot.memconv.clone(),
        };
        self.snapshot = Some(snapshot);
        reply
    }

    fn take_snapshot(&self) -> Snapshot {
        let shared = &self.ctx.shared;
        let taken = Instant::now();
        // Exit counts first: the memconv snapshot may wait for a conversion batch to finish.
        let exits = shared.exit_counts();
        let memconv = shared.memconv.stats();
        Snapshot {
            taken,
            cost: taken.elapsed(),
            uptime_ms: taken.duration_since(self.ctx.created).as_millis() as u64,
            exits,
            vcpu_pauses: shared.control.pause_count(),
            memconv,
        }
    }

    fn pause(&mut self) -> StateReply {
        if self.paused {
            return StateReply {
                state: VmState::Paused,
                changed: false,
            };
        }
        let control = &self.ctx.shared.control;
        // Returns once no vCPU runs guest code; a vCPU inside an exit (holding memconv's lock,
        // maybe pausing the others itself: pauses nest) finishes it and then parks.
        control.pause();
        self.paused = true;
        self.snapshot = None;
        let deadline = Instant::now() + PAUSE_SETTLE_TIMEOUT;
        while !control.is_quiescent() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(50));
        }
        if !control.is_quiescent() {
            tracing::warn!(
                "pause: a vCPU is still inside an exit after {PAUSE_SETTLE_TIMEOUT:?}; it parks when done"
            );
        }
        StateReply {
            state: VmState::Paused,
            changed: true,
        }
    }

    fn resume(&mut self) -> StateReply {
        if !self.paused {
            return StateReply {
                state: VmState::Running,
                changed: false,
            };
        }
        self.ctx.shared.control.resume();
        self.paused = false;
        self.snapshot = None;
        StateReply {
            state: VmState::Running,
            changed: true,
        }
    }

    fn shutdown(&mut self) -> StateReply {
        let changed = !self.shutting_down;
        if changed {
            self.shutting_down = true;
            self.snapshot = None;
            tracing::info!("shutdown asked on the control socket");
            self.ctx.shared.end(VmEnd::Stopped);
        }
        StateReply {
            state: VmState::Ending,
            changed,
        }
    }

    /// Executes one request line and returns the reply line.
    fn handle_line(&mut self, line: &[u8]) -> Vec<u8> {
        let env = match decode_request(line) {
            Ok(env) => env,
            Err((id, e)) => return error_line(id, e.code(), e.to_string()),
        };
        let id = env.id;
        let ending = self.state() == VmState::Ending;
        match env.request {
            Request::Stats => serialize_line(&Reply::ok(id, self.stats())),
            Request::Config => serialize_line(&Reply::ok(
                id,
                ConfigReply {
                    config: self.ctx.config.clone(),
                    host: self.ctx.host,
                    native: self.ctx.native,
                },
            )),
            Request::Pause | Request::Resume if ending => error_line(
                id,
                ErrorCode::VmEnding,
                format!("{}: the VM is ending", env.request.name()),
            ),
            Request::Pause => serialize_line(&Reply::ok(id, self.pause())),
            Request::Resume => serialize_line(&Reply::ok(id, self.resume())),
            Request::Shutdown => serialize_line(&Reply::ok(id, self.shutdown())),
        }
    }

    fn accept(&mut self, ops: &mut EventOps) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and the like: leave the rest in the backlog for later.
                    tracing::warn!("control socket: accept failed: {e}");
                    return;
                }
            };
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let mut conn = Conn::new(stream);
            if self.conns.len() >= MAX_CLIENTS {
                conn.queue(&error_line(
                    None,
                    ErrorCode::TooManyClients,
                    format!("the VMM serves at most {MAX_CLIENTS} clients at once"),
                ));
                conn.flush();
                continue;
            }
            conn.queue(&self.greeting);
            conn.flush();
            if conn.dead {
                continue;
            }
            conn.interest = conn.wanted_interest();
            let fd = conn.stream.as_raw_fd();
            if let Err(e) = ops.add(Events::with_data(&conn.stream, TOKEN_CONN, conn.interest)) {
                tracing::warn!("control socket: cannot watch a new client: {e}");
                continue;
            }
            self.conns.insert(fd, conn);
        }
    }

    /// Handles up to [`MAX_REQUESTS_PER_TURN`] complete lines of `fd`.
    fn serve_lines(&mut self, fd: RawFd) {
        let mut handled = 0;
        loop {
            let Some(conn) = self.conns.get_mut(&fd) else {
                return;
            };
            if conn.dead {
                return;
            }
            if handled >= MAX_REQUESTS_PER_TURN {
                if conn.has_line() {
                    self.defer(fd);
                }
                return;
            }
            let Some(line) = conn.next_line() else {
                if conn.inbuf.len() > MAX_LINE {
                    conn.inbuf.clear();
                    conn.queue(&error_line(
                        None,
                        ErrorCode::LineTooLong,
                        format!("request line longer than {MAX_LINE} bytes; closing"),
                    ));
                    conn.closing = true;
                }
                return;
            };
            if line.len() > MAX_LINE {
                conn.queue(&error_line(
                    None,
                    ErrorCode::LineTooLong,
                    format!("request line longer than {MAX_LINE} bytes; closing"),
                ));
                conn.inbuf.clear();
                conn.closing = true;
                return;
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let reply = self.handle_line(&line);
            handled += 1;
            if let Some(conn) = self.conns.get_mut(&fd) {
                conn.queue(&reply);
            }
        }
    }

    /// Flushes, updates the registered interest, or closes the connection.
    fn settle(&mut self, fd: RawFd, ops: &mut EventOps) {
        let Some(conn) = self.conns.get_mut(&fd) else {
            return;
        };
        conn.flush();
        let done = conn.dead || (conn.closing && conn.pending() == 0);
        if done {
            self.close(fd, ops);
            return;
        }
        let want = conn.wanted_interest();
        if want != conn.interest {
            match ops.modify(Events::with_data(&conn.stream, TOKEN_CONN, want)) {
                Ok(()) => conn.interest = want,
                Err(e) => {
                    tracing::warn!("control socket: cannot update a client's events: {e}");
                    self.close(fd, ops);
                }
            }
        }
    }

    fn close(&mut self, fd: RawFd, ops: &mut EventOps) {
        self.backlog.remove(&fd);
        if let Some(conn) = self.conns.remove(&fd) {
            // Unregister before the fd is closed (the number may be reused at once).
            if let Err(e) = ops.remove(Events::empty(&conn.stream)) {
                tracing::debug!("control socket: unregistering a client: {e}");
            }
        }
    }

    fn on_conn(&mut self, fd: RawFd, set: EventSet, ops: &mut EventOps) {
        let Some(conn) = self.conns.get_mut(&fd) else {
            return;
        };
        if set.contains(EventSet::OUT) {
            conn.flush();
        }
        if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) && !conn.closing {
            let eof = conn.fill();
            self.serve_lines(fd);
            if eof {
                if let Some(conn) = self.conns.get_mut(&fd) {
                    // A half line at EOF is forgotten; complete ones still get replies.
                    conn.closing = true;
                    if conn.has_line() {
                        self.defer(fd);
                    } else {
                        conn.inbuf.clear();
                    }
                }
            }
        } else if set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            if let Some(conn) = self.conns.get_mut(&fd) {
                conn.dead = true;
            }
        }
        self.settle(fd, ops);
    }

    /// Serves `fd`'s remaining requests on a later turn.
    fn defer(&mut self, fd: RawFd) {
        if self.backlog.insert(fd) {
            if let Err(e) = self.wake.write(1) {
                tracing::warn!("control socket: wake eventfd: {e}");
            }
        }
    }

    /// Serves clients that had more requests queued than one turn allows.
    fn on_wake(&mut self, ops: &mut EventOps) {
        let _ = self.wake.read();
        let fds: Vec<RawFd> = self.backlog.drain().collect();
        for fd in fds {
            self.serve_lines(fd);
            if let Some(conn) = self.conns.get_mut(&fd) {
                if conn.closing && !conn.has_line() {
                    conn.inbuf.clear();
                }
            }
            self.settle(fd, ops);
        }
    }

    /// Every [`TICK`]: drops clients whose output has been stuck for [`STALL_TIMEOUT`].
    fn tick(&mut self, ops: &mut EventOps) {
        let _ = self.timer.wait();
        let stalled: Vec<RawFd> = self
            .conns
            .iter()
            .filter(|(_, c)| c.pending() > 0 && c.last_progress.elapsed() > STALL_TIMEOUT)
            .map(|(fd, _)| *fd)
            .collect();
        for fd in stalled {
            tracing::debug!("control client fd {fd} stalled: dropped");
            self.close(fd, ops);
        }
    }

    /// Sends the vm_end event to every client (best effort, bounded) and closes them all. The
    /// subscriber has left the event manager: the fds are no longer watched.
    fn farewell(&mut self, end: &VmEnd) {
        let line = serialize_line(&Event {
            event: "vm_end",
            data: VmEndEvent {
                end: end.clone(),
                exit_status: crate::exit_codes::exit_status(end),
            },
        });
        for conn in self.conns.values_mut() {
            conn.queue(&line);
        }
        let deadline = Instant::now() + FAREWELL_TIMEOUT;
        loop {
            let mut pending = false;
            for conn in self.conns.values_mut() {
                conn.flush();
                pending |= !conn.dead && conn.pending() > 0;
            }
            if !pending || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        self.conns.clear();
    }
}

impl MutEventSubscriber for Server {
    fn init(&mut self, ops: &mut EventOps) {
        for (fd, token) in [
            (self.listener.as_raw_fd(), TOKEN_LISTENER),
            (self.end_event.as_raw_fd(), TOKEN_END),
            (self.wake.as_raw_fd(), TOKEN_WAKE),
            (self.timer.as_raw_fd(), TOKEN_TICK),
        ] {
            if let Err(e) = ops.add(Events::with_data_raw(fd, token, EventSet::IN)) {
                tracing::error!("control socket: cannot watch fd {fd}: {e}");
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_LISTENER => self.accept(ops),
            TOKEN_END => {
                let _ = self.end_event.read();
                self.ended = true;
            }
            TOKEN_WAKE => self.on_wake(ops),
            TOKEN_TICK => self.tick(ops),
            _ => self.on_conn(events.fd(), events.event_set(), ops),
        }
    }
}

/// Serves the control socket on the calling thread until the VM ends, then tells the clients
/// (`vm_end` event), closes them, removes the socket file and returns why the VM ended. If the
/// event loop cannot work, it logs why and just waits for the end: the VM is never affected.
pub fn serve(socket: ApiSocket, ctx: VmContext) -> VmEnd {
    let shared = Arc::clone(&ctx.shared);
    match serve_loop(&socket, ctx) {
        Ok(end) => end,
        Err(e) => {
            tracing::error!("{e}; the VM runs on without a control socket");
            shared.wait_end(None).unwrap_or(VmEnd::Stopped)
        }
    }
}

fn loop_err(what: &str, e: impl std::fmt::Display) -> ServerError {
    ServerError::EventLoop(format!("{what}: {e}"))
}

fn serve_loop(socket: &ApiSocket, ctx: VmContext) -> Result<VmEnd, ServerError> {
    let end_event = EventFd::new(EFD_NONBLOCK).map_err(|e| loop_err("eventfd", e))?;
    let notifier = end_event.try_clone().map_err(|e| loop_err("eventfd", e))?;
    let wake = EventFd::new(EFD_NONBLOCK).map_err(|e| loop_err("eventfd", e))?;
    let mut timer = TimerFd::new().map_err(|e| loop_err("timerfd", e))?;
    timer
        .reset(TICK, Some(TICK))
        .map_err(|e| loop_err("timerfd", e))?;
    let listener = socket
        .listener
        .try_clone()
        .map_err(|e| loop_err("listener", e))?;
    let greeting = to_line(&GreetingLine {
        greeting: Greeting::current(),
    })
    .map_err(|e| loop_err("greeting", e))?;
    let mut manager: EventManager<Server> =
        EventManager::new().map_err(|e| loop_err("epoll", e))?;
    let shared = Arc::clone(&ctx.shared);
    let id = manager.add_subscriber(Server {
        listener,
        end_event,
        wake,
        timer,
        conns: HashMap::new(),
        backlog: HashSet::new(),
        ctx,
        paused: false,
        shutting_down: false,
        greeting,
        ended: false,
        snapshot: None,
    });
    // From here on the VM's end wakes the loop at once.
    shared.set_end_notifier(notifier);
    tracing::info!("control socket serving on {}", socket.path().display());
    let end = loop {
        // The end may have come before the notifier was installed: check every turn.
        if let Some(end) = shared.wait_end(Some(Duration::ZERO)) {
            break end;
        }
        if let Err(e) = manager.run_with_timeout(TICK.as_millis() as i32) {
            tracing::error!("control socket event loop failed: {e}; serving stops");
            break shared.wait_end(None).unwrap_or(VmEnd::Stopped);
        }
    };
    match manager.remove_subscriber(id) {
        Ok(mut server) => server.farewell(&end),
        Err(e) => tracing::warn!("control socket: {e}"),
    }
    Ok(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vmm-api-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn bind_is_private_and_removed_on_drop() {
        let d = dir("bind");
        let path = d.join("s");
        let socket = ApiSocket::bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // A live socket is not stolen.
        assert!(matches!(ApiSocket::bind(&path), Err(ServerError::InUse(_))));
        drop(socket);
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn stale_sockets_are_replaced_other_files_never() {
        let d = dir("stale");
        let path = d.join("s");
        drop(UnixListener::bind(&path).unwrap());
        let socket = ApiSocket::bind(&path).expect("a stale socket is replaced");
        drop(socket);
        let file = d.join("f");
        std::fs::write(&file, "x").unwrap();
        assert!(matches!(
            ApiSocket::bind(&file),
            Err(ServerError::NotASocket(_))
        ));
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "x");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn drop_leaves_a_successor_socket_alone() {
        let d = dir("successor");
        let path = d.join("s");
        let socket = ApiSocket::bind(&path).unwrap();
        // Someone replaced the file (e.g. removed it and bound their own).
        std::fs::remove_file(&path).unwrap();
        let other = UnixListener::bind(&path).unwrap();
        drop(socket);
        assert!(path.exists(), "not ours: kept");
        drop(other);
        let _ = std::fs::remove_dir_all(&d);
    }
}
