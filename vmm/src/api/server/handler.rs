//! Request handling: one request line in, one reply line out, from what the VM publishes
//! (`stats`, `config`) or by driving the vCPU control and the VM's end (`pause`, `resume`,
//! `shutdown`). Knows nothing of connections or the event loop.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::snapshot::{Snapshot, SnapshotCache};
use crate::api::protocol::{
    decode_request, to_line, ConfigReply, ErrorCode, RawId, Reply, Request, StateReply, StatsReply,
    VmState, PROTOCOL_VERSION,
};
use crate::config::VmConfig;
use crate::vcpu::{VmEnd, VmShared};

/// How long `pause` waits for vCPUs inside an exit (e.g. a conversion batch) to park.
pub const PAUSE_SETTLE_TIMEOUT: Duration = Duration::from_secs(2);

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

/// A message as one protocol line; a constant `internal` error line if it cannot be
/// serialized.
pub(super) fn serialize_line<T: Serialize>(message: &T) -> Vec<u8> {
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

/// An error reply line.
pub(super) fn error_line(
    id: Option<RawId>,
    code: ErrorCode,
    message: impl Into<String>,
) -> Vec<u8> {
    serialize_line(&Reply::error(id, code, message))
}

/// The request handler: the VM it answers for and what the control socket changed in it.
pub(super) struct Handler {
    ctx: VmContext,
    /// Whether the control socket holds the vCPUs paused.
    paused: bool,
    /// Shutdown was asked.
    shutting_down: bool,
    /// Set when the VM-end eventfd fired.
    ended: bool,
    /// The latest `stats` snapshot (dropped by pause/resume/shutdown).
    snapshot: SnapshotCache,
}

impl Handler {
    pub(super) fn new(ctx: VmContext) -> Self {
        Handler {
            ctx,
            paused: false,
            shutting_down: false,
            ended: false,
            snapshot: SnapshotCache::default(),
        }
    }

    /// The VM-end eventfd fired: the VM is ending.
    pub(super) fn mark_ended(&mut self) {
        self.ended = true;
    }

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
        let snapshot: &Snapshot = self
            .snapshot
            .current(now, &self.ctx.shared, self.ctx.created);
        let mut reply = StatsReply {
            protocol: PROTOCOL_VERSION,
            // Set below, once the snapshot is taken (as fresh as the reply).
            state: VmState::Running,
            uptime_ms: snapshot.uptime_ms,
            age_ms: now.saturating_duration_since(snapshot.taken).as_millis() as u64,
            snapshot_us: snapshot.cost.as_micros() as u64,
            cpus: self.ctx.config.cpus,
            exits_total: snapshot.exits.iter().map(|e| e.total).sum(),
            exits: snapshot.exits.clone(),
            vcpu_pauses: snapshot.vcpu_pauses,
            memconv: snapshot.memconv.clone(),
            disk: snapshot.disk.clone(),
        };
        reply.state = self.state();
        reply
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
        self.snapshot.clear();
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
        self.snapshot.clear();
        StateReply {
            state: VmState::Running,
            changed: true,
        }
    }

    fn shutdown(&mut self) -> StateReply {
        let changed = !self.shutting_down;
        if changed {
            self.shutting_down = true;
            self.snapshot.clear();
            tracing::info!("shutdown asked on the control socket");
            self.ctx.shared.end(VmEnd::Stopped);
        }
        StateReply {
            state: VmState::Ending,
            changed,
        }
    }

    /// Executes one request line and returns the reply line.
    pub(super) fn handle_line(&mut self, line: &[u8]) -> Vec<u8> {
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
}
