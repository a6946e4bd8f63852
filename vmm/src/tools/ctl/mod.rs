//! `vmm ctl SOCKET COMMAND`: the control-socket client. Connects, checks the greeting's
//! protocol version, sends one typed request per command and prints the reply: a readable
//! table for `stats` (refreshed with `--watch`, with rates), the Prometheus text format for
//! `metrics`, the raw reply line with `--json`. Exit status: 0 done, 1 the VMM refused the
//! command or broke the protocol, 2 no VMM to talk to (missing socket, connection refused,
//! permission denied).
//!
//! [`client`] owns the connection, `table` the readable `stats` table; the Prometheus text is
//! [`crate::tools::metrics`].

pub mod client;
mod table;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

pub use client::{Client, ClientError, RawReply};
pub use table::render_table;

use crate::api::protocol::{ErrorCode, ProtocolError, Request, StateReply, StatsView};
use crate::tools::metrics::{self, Labels};

/// What `vmm ctl` does.
#[derive(Clone, Debug)]
pub enum CtlCommand {
    /// Statistics table, once or every `watch` seconds.
    Stats {
        /// Refresh interval.
        watch: Option<f64>,
    },
    /// Prometheus text format.
    Metrics {
        /// Extra `NAME=VALUE` labels.
        labels: Vec<String>,
    },
    /// How the VM was started.
    Config,
    /// Pause the vCPUs.
    Pause,
    /// Resume the vCPUs.
    Resume,
    /// End the VM.
    Shutdown,
}

/// Options of `vmm ctl`.
#[derive(Clone, Debug)]
pub struct CtlOptions {
    /// The socket.
    pub socket: PathBuf,
    /// The command.
    pub command: CtlCommand,
    /// Print raw reply lines.
    pub json: bool,
    /// Reply timeout.
    pub timeout: Duration,
}

/// Runs `vmm ctl`, printing to `out`.
pub fn ctl(opts: &CtlOptions, out: &mut dyn Write) -> Result<(), ClientError> {
    let labels = match &opts.command {
        CtlCommand::Metrics { labels } => Labels::parse(labels)?,
        _ => Labels::default(),
    };
    if let CtlCommand::Stats { watch: Some(s) } = opts.command {
        if !(s.is_finite() && s > 0.0) {
            return Err(ClientError::BadInterval(s));
        }
    }
    let mut client = Client::connect(&opts.socket, opts.timeout)?;
    match &opts.command {
        CtlCommand::Stats { watch: None } => {
            let (raw, view) = client.stats()?;
            if opts.json {
                writeln!(out, "{}", raw.line)?;
            } else {
                out.write_all(render_table(&view, None).as_bytes())?;
            }
        }
        CtlCommand::Stats { watch: Some(secs) } => watch(&mut client, opts, *secs, out)?,
        CtlCommand::Metrics { .. } => {
            let (raw, view) = client.stats()?;
            if opts.json {
                writeln!(out, "{}", raw.line)?;
            } else {
                out.write_all(metrics::render(&view, &labels).as_bytes())?;
            }
        }
        CtlCommand::Config => {
            let raw = client.request(Request::Config)?;
            if opts.json {
                writeln!(out, "{}", raw.line)?;
            } else {
                let pretty = serde_json::to_string_pretty(&raw.ret)
                    .map_err(|e| ProtocolError::BadMessage(e.to_string()))?;
                writeln!(out, "{pretty}")?;
            }
        }
        CtlCommand::Pause | CtlCommand::Resume => {
            let request = if matches!(opts.command, CtlCommand::Pause) {
                Request::Pause
            } else {
                Request::Resume
            };
            let raw = client.request(request)?;
            if opts.json {
                writeln!(out, "{}", raw.line)?;
            } else {
                let state: StateReply = serde_json::from_value(raw.ret)
                    .map_err(|e| ProtocolError::BadMessage(e.to_string()))?;
                let already = if state.changed { "" } else { "already " };
                writeln!(out, "{already}{}", state.state.as_str())?;
            }
        }
        CtlCommand::Shutdown => {
            let raw = client.request(Request::Shutdown)?;
            if opts.json {
                writeln!(out, "{}", raw.line)?;
            }
            let end = client.wait_vm_end(opts.timeout)?;
            if !opts.json {
                match end.as_ref().and_then(|d| d.get("end")) {
                    Some(e) => writeln!(
                        out,
                        "VM ended: {} (vmm exit status {})",
                        e.get("kind").and_then(Value::as_str).unwrap_or("?"),
                        end.as_ref()
                            .and_then(|d| d.get("exit_status"))
                            .and_then(Value::as_u64)
                            .unwrap_or(0)
                    )?,
                    None => writeln!(out, "VM ended")?,
                }
            }
        }
    }
    out.flush()?;
    Ok(())
}

/// Whether `e` means the VMM dropped this connection (it closed it, or told us it was idle),
/// so a new connection may go on.
fn dropped(e: &ClientError) -> bool {
    match e {
        ClientError::Closed(_) => true,
        ClientError::Remote { code, .. } => *code == ErrorCode::IdleTimeout,
        ClientError::Io(io) => matches!(
            io.kind(),
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
        ),
        _ => false,
    }
}

/// Consecutive reconnects without one reply in between before `--watch` gives up.
const MAX_RECONNECTS: u32 = 3;

/// `stats --watch`: one table (or JSON line) every `secs` seconds until the VM ends. A
/// connection the VMM drops (e.g. idle for longer than its idle timeout, when `secs` is long)
/// is opened again; the VM has ended when its socket is gone.
fn watch(
    client: &mut Client,
    opts: &CtlOptions,
    secs: f64,
    out: &mut dyn Write,
) -> Result<(), ClientError> {
    let interval = Duration::from_secs_f64(secs);
    let clear = !opts.json && std::io::stdout().is_terminal();
    // The previous distinct snapshot (replies may reuse one: see `age_ms`).
    let mut prev: Option<StatsView> = None;
    let mut reconnects = 0;
    loop {
        let (raw, view) = match client.stats() {
            Ok(r) => {
                reconnects = 0;
                r
            }
            Err(e) if dropped(&e) && reconnects < MAX_RECONNECTS => {
                reconnects += 1;
                match Client::connect(&opts.socket, opts.timeout) {
                    Ok(c) => {
                        *client = c;
                        continue;
                    }
                    Err(ClientError::NoSocket(_) | ClientError::Refused(_)) => {
                        writeln!(out, "the VM has ended")?;
                        return Ok(());
                    }
                    Err(e) => return Err(e),
                }
            }
            Err(ClientError::Closed(_)) => {
                writeln!(out, "the VM has ended")?;
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        if opts.json {
            writeln!(out, "{}", raw.line)?;
        } else {
            if clear {
                out.write_all(b"\x1b[H\x1b[2J")?;
            }
            out.write_all(render_table(&view, prev.as_ref()).as_bytes())?;
            if !clear {
                writeln!(out)?;
            }
        }
        out.flush()?;
        if prev.as_ref().is_none_or(|p| p.uptime_ms < view.uptime_ms) {
            prev = Some(view);
        }
        std::thread::sleep(interval);
    }
}
