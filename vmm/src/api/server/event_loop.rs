//! The event loop: one event-manager subscriber owning the listener, the VM-end eventfd, the
//! wake eventfd, the housekeeping timer and every connection, served on the VMM's main thread
//! until the VM ends; then the `vm_end` farewell to every client.

use std::collections::{HashMap, HashSet};
use std::io::ErrorKind;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use super::conn::{idle_timeout, Conn, STALL_TIMEOUT};
use super::handler::{error_line, serialize_line, Handler, VmContext};
use super::socket::{ApiSocket, ServerError};
use crate::api::protocol::{
    to_line, ErrorCode, Event, Greeting, GreetingLine, VmEndEvent, MAX_LINE,
};
use crate::exit_codes::exit_status;
use crate::vcpu::VmEnd;

/// Most clients served at once; more are told `too_many_clients` and closed.
pub const MAX_CLIENTS: usize = 64;
/// Requests of one client handled per loop turn (fairness between clients).
pub const MAX_REQUESTS_PER_TURN: usize = 32;
/// How long the vm_end event may take to reach the clients at the end.
const FAREWELL_TIMEOUT: Duration = Duration::from_millis(250);

const TOKEN_LISTENER: u32 = 0;
const TOKEN_END: u32 = 1;
const TOKEN_WAKE: u32 = 2;
const TOKEN_TICK: u32 = 3;
const TOKEN_CONN: u32 = 4;
/// Period of the housekeeping timer (stalled clients) and of the loop's end check.
const TICK: Duration = Duration::from_millis(500);

/// The event-manager subscriber: listener, VM-end eventfd, wake eventfd, connections.
struct Server {
    listener: UnixListener,
    end_event: EventFd,
    /// Written to when some client still has complete requests queued (fairness).
    wake: EventFd,
    /// Housekeeping every [`TICK`] (or half the idle timeout, if shorter).
    timer: TimerFd,
    /// Clients that send nothing for this long are dropped.
    idle_timeout: Duration,
    conns: HashMap<RawFd, Conn>,
    backlog: HashSet<RawFd>,
    handler: Handler,
    greeting: Vec<u8>,
}

impl Server {
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
            let reply = self.handler.handle_line(&line);
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

    /// Every [`TICK`]: drops clients whose output has been stuck for [`STALL_TIMEOUT`], and
    /// tells clients that sent nothing for the idle timeout (`idle_timeout`) and closes them.
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
        let idle = self.idle_timeout;
        let idlers: Vec<RawFd> = self
            .conns
            .iter()
            .filter(|(_, c)| !c.closing && c.pending() == 0 && c.last_input.elapsed() >= idle)
            .map(|(fd, _)| *fd)
            .collect();
        for fd in idlers {
            tracing::debug!("control client fd {fd} idle for {idle:?}: dropped");
            if let Some(conn) = self.conns.get_mut(&fd) {
                conn.queue(&error_line(
                    None,
                    ErrorCode::IdleTimeout,
                    format!(
                        "no request for {} ms; closing (reconnect to go on)",
                        idle.as_millis()
                    ),
                ));
                conn.closing = true;
                conn.inbuf.clear();
            }
            self.settle(fd, ops);
        }
    }

    /// Sends the vm_end event to every client (best effort, bounded) and closes them all. The
    /// subscriber has left the event manager: the fds are no longer watched.
    fn farewell(&mut self, end: &VmEnd) {
        let line = serialize_line(&Event {
            event: "vm_end",
            data: VmEndEvent {
                end: end.clone(),
                exit_status: exit_status(end),
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
                self.handler.mark_ended();
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
    let idle_timeout = idle_timeout();
    let tick = TICK.min(idle_timeout / 2).max(Duration::from_millis(10));
    let mut timer = TimerFd::new().map_err(|e| loop_err("timerfd", e))?;
    timer
        .reset(tick, Some(tick))
        .map_err(|e| loop_err("timerfd", e))?;
    let listener = socket
        .listener()
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
        idle_timeout,
        conns: HashMap::new(),
        backlog: HashSet::new(),
        handler: Handler::new(ctx),
        greeting,
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
