//! `vmm ctl SOCKET COMMAND`: the control-socket client. Connects, checks the greeting's
//! protocol version, sends one typed request per command and prints the reply: a readable
//! table for `stats` (refreshed with `--watch`, with rates), the Prometheus text format for
//! `metrics`, the raw reply line with `--json`. Exit status: 0 done, 1 the VMM refused the
//! command or broke the protocol, 2 no VMM to talk to (missing socket, connection refused,
//! permission denied).

use std::io::{BufRead, BufReader, ErrorKind, IsTerminal, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::exit_codes::{EXIT_FAILURE, EXIT_USAGE};

use super::metrics::{self, Labels, MetricsError};
use super::protocol::{
    to_line, ErrorCode, Greeting, Incoming, OutgoingRequest, ProtocolError, Request, StateReply,
    StatsView, MAX_LINE, PROTOCOL_VERSION,
};

/// Errors of `vmm ctl`.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No socket at the path.
    #[error("no control socket at {0}: is a VMM running with --api-socket {0}?")]
    NoSocket(PathBuf),
    /// A socket file nobody serves.
    #[error("connection to {0} refused: the VMM that created this socket is gone")]
    Refused(PathBuf),
    /// Not allowed to connect.
    #[error("permission denied connecting to {0}: the socket is mode 0600, run as the VMM's user")]
    Permission(PathBuf),
    /// Any other connect failure.
    #[error("cannot connect to {path}: {source}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The VMM did not answer in time.
    #[error("the VMM did not answer within {0:?}")]
    Timeout(Duration),
    /// The VMM closed the connection.
    #[error("the VMM closed the connection{0}")]
    Closed(String),
    /// Reading or writing the socket failed.
    #[error("control socket I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The VMM sent something this client does not understand.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The VMM speaks another protocol version.
    #[error("the VMM speaks control protocol {got}, this client {PROTOCOL_VERSION}")]
    Version {
        /// The VMM's version.
        got: u32,
    },
    /// The VMM refused the command.
    #[error("{command}: {code}: {message}", code = code.as_str())]
    Remote {
        /// The command.
        command: &'static str,
        /// The error code.
        code: ErrorCode,
        /// The VMM's message.
        message: String,
    },
    /// Bad metrics options.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// `--watch` with a bad interval.
    #[error("--watch {0}: expected a number of seconds above 0")]
    BadInterval(f64),
}

impl ClientError {
    /// The exit status `vmm ctl` uses: 2 when there is no VMM to talk to, else 1.
    pub fn exit_status(&self) -> u8 {
        match self {
            ClientError::NoSocket(_)
            | ClientError::Refused(_)
            | ClientError::Permission(_)
            | ClientError::Connect { .. }
            | ClientError::BadInterval(_)
            | ClientError::Metrics(_) => EXIT_USAGE,
            _ => EXIT_FAILURE,
        }
    }
}

/// A connection to a VMM's control socket.
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    greeting: Greeting,
    next_id: u64,
    timeout: Duration,
}

/// A reply: the raw line and its `return` value.
#[derive(Clone, Debug)]
pub struct RawReply {
    /// The line as received (no newline).
    pub line: String,
    /// The `return` value.
    pub ret: Value,
}

impl Client {
    /// Connects and reads the greeting; replies must come within `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path).map_err(|e| match e.kind() {
            ErrorKind::NotFound => ClientError::NoSocket(path.to_path_buf()),
            ErrorKind::ConnectionRefused => ClientError::Refused(path.to_path_buf()),
            ErrorKind::PermissionDenied => ClientError::Permission(path.to_path_buf()),
            _ => ClientError::Connect {
                path: path.to_path_buf(),
                source: e,
            },
        })?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let writer = stream.try_clone()?;
        let mut client = Client {
            reader: BufReader::new(stream),
            writer,
            greeting: Greeting {
                protocol: 0,
                vmm: String::new(),
                pid: 0,
                commands: Vec::new(),
            },
            next_id: 1,
            timeout,
        };
        let (line, first) = client
            .read_message()?
            .ok_or_else(|| ClientError::Closed(" before greeting".into()))?;
        if let Some(err) = first.error {
            return Err(ClientError::Remote {
                command: "connect",
                code: err.code,
                message: err.message,
            });
        }
        let greeting = first
            .greeting
            .ok_or_else(|| ProtocolError::BadMessage(format!("expected a greeting, got {line}")))?;
        if greeting.protocol != PROTOCOL_VERSION {
            return Err(ClientError::Version {
                got: greeting.protocol,
            });
        }
        client.greeting = greeting;
        Ok(client)
    }

    /// The VMM's greeting.
    pub fn greeting(&self) -> &Greeting {
        &self.greeting
    }

    /// Reads one message; `None` at EOF.
    fn read_message(&mut self) -> Result<Option<(String, Incoming)>, ClientError> {
        let mut line = String::new();
        let n = Read::by_ref(&mut self.reader)
            .take(MAX_LINE as u64 * 64)
            .read_line(&mut line)
            .map_err(|e| match e.kind() {
                ErrorKind::WouldBlock | ErrorKind::TimedOut => ClientError::Timeout(self.timeout),
                _ => ClientError::Io(e),
            })?;
        if n == 0 {
            return Ok(None);
        }
        let line = line.trim_end().to_string();
        let msg: Incoming = serde_json::from_str(&line)
            .map_err(|e| ProtocolError::BadMessage(format!("{e}: {line}")))?;
        Ok(Some((line, msg)))
    }

    /// Sends `request` and returns its reply (events in between are skipped).
    pub fn request(&mut self, request: Request) -> Result<RawReply, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let line = to_line(&OutgoingRequest {
            request,
            id,
            protocol: PROTOCOL_VERSION,
        })
        .map_err(|e| ProtocolError::BadMessage(e.to_string()))?;
        self.writer.write_all(&line).map_err(|e| match e.kind() {
            ErrorKind::BrokenPipe | ErrorKind::ConnectionReset => {
                ClientError::Closed(" (the VM has ended?)".into())
            }
            _ => ClientError::Io(e),
        })?;
        loop {
            let Some((line, msg)) = self.read_message()? else {
                return Err(ClientError::Closed(
                    " before replying (the VM has ended?)".into(),
                ));
            };
            if msg.event.is_some() {
                continue;
            }
            if msg.id.as_ref().and_then(Value::as_u64) != Some(id) {
                // A reply without our id: an error about the connection itself.
                if let Some(err) = msg.error {
                    return Err(ClientError::Remote {
                        command: request.name(),
                        code: err.code,
                        message: err.message,
                    });
                }
                continue;
            }
            return match (msg.ok, msg.error) {
                (Some(true), _) => Ok(RawReply {
                    line,
                    ret: msg.ret.unwrap_or(Value::Null),
                }),
                (_, Some(err)) => Err(ClientError::Remote {
                    command: request.name(),
                    code: err.code,
                    message: err.message,
                }),
                _ => Err(ProtocolError::BadMessage(format!("not a reply: {line}")).into()),
            };
        }
    }

    /// `stats`, decoded.
    pub fn stats(&mut self) -> Result<(RawReply, StatsView), ClientError> {
        let raw = self.request(Request::Stats)?;
        let view = serde_json::from_value(raw.ret.clone())
            .map_err(|e| ProtocolError::BadMessage(format!("stats reply: {e}")))?;
        Ok((raw, view))
    }

    /// Waits up to `timeout` for the `vm_end` event (or the connection to close); returns its
    /// data if it came.
    pub fn wait_vm_end(&mut self, timeout: Duration) -> Result<Option<Value>, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClientError::Timeout(timeout));
            }
            self.reader.get_ref().set_read_timeout(Some(left))?;
            match self.read_message()? {
                None => return Ok(None),
                Some((_, msg)) if msg.event.as_deref() == Some("vm_end") => return Ok(msg.data),
                Some(_) => {}
            }
        }
    }
}

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

/// `stats --watch`: one table (or JSON line) every `secs` seconds until the VM ends.
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
    loop {
        let (raw, view) = match client.stats() {
            Ok(r) => r,
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

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

/// A readable table of a `stats` reply; with an earlier snapshot, rates.
pub fn render_table(s: &StatsView, prev: Option<&StatsView>) -> String {
    use std::fmt::Write as _;
    let m = &s.memconv;
    // Seconds between the snapshots (none when it is the same one).
    let prev = prev
        .filter(|p| p.uptime_ms < s.uptime_ms)
        .map(|p| ((s.uptime_ms - p.uptime_ms) as f64 / 1e3, p));
    let mut o = String::new();
    let _ = writeln!(
        o,
        "VM {}: up {:.1} s{}, {} vCPU{}, {} MiB RAM, granularity {}, stores private={} shared={}",
        s.state,
        s.uptime_ms as f64 / 1e3,
        if s.age_ms > 0 {
            format!(" (snapshot {} ms old)", s.age_ms)
        } else {
            String::new()
        },
        s.cpus,
        if s.cpus == 1 { "" } else { "s" },
        m.ram_bytes >> 20,
        m.granularity,
        m.private_store.kind,
        m.shared_store.kind
    );
    let rate = |now: u64, then: fn(&StatsView) -> u64| -> String {
        match prev {
            Some((dt, p)) if dt > 0.0 => {
                format!("{:>12.0}", now.saturating_sub(then(p)) as f64 / dt)
            }
            _ => format!("{:>12}", "-"),
        }
    };
    let _ = writeln!(
        o,
        "conversions   {:>10} {:>10} {:>10} {:>10} {:>12}",
        "4k", "sub2m", "2m", "total", "per second"
    );
    let _ = writeln!(
        o,
        "  to_shared   {:>10} {:>10} {:>10} {:>10} {}",
        m.to_shared.k4,
        m.to_shared.sub2m,
        m.to_shared.m2,
        m.to_shared.total(),
        rate(m.to_shared.total(), |p| p.memconv.to_shared.total())
    );
    let _ = writeln!(
        o,
        "  to_private  {:>10} {:>10} {:>10} {:>10} {}",
        m.to_private.k4,
        m.to_private.sub2m,
        m.to_private.m2,
        m.to_private.total(),
        rate(m.to_private.total(), |p| p.memconv.to_private.total())
    );
    let _ = writeln!(
        o,
        "pages converted {} (no-op {}), doorbells {} carrying {} ranges ({:.1}/exit), hypercalls {}",
        m.pages_converted,
        m.noop_pages,
        m.doorbells,
        m.mailbox_ranges,
        m.ranges_per_exit,
        m.hypercalls
    );
    let _ = writeln!(
        o,
        "rejects {}{}, accepts {} ({} units), double-accept violations {}",
        m.rejects_total,
        m.rejects_by_reason(),
        m.accept_entries,
        m.accepted_units,
        m.double_accept_violations
    );
    let l = &m.latency;
    let _ = writeln!(
        o,
        "latency: n={} mean {:.1} us, p50 <= {:.1} us, p99 <= {:.1} us, max {:.1} us",
        l.count,
        l.mean_ns as f64 / 1e3,
        l.p50_ns_le as f64 / 1e3,
        l.p99_ns_le as f64 / 1e3,
        l.max_ns as f64 / 1e3
    );
    let _ = writeln!(
        o,
        "memory MiB  {:>8} {:>8} {:>8} {:>8}",
        "owned", "bound", "kernel", "resident"
    );
    for (side, u) in [("private", &m.private_store), ("shared", &m.shared_store)] {
        let _ = writeln!(
            o,
            "  {side:<9} {:>8.1} {:>8.1} {:>8.1} {:>8.1}",
            mib(u.owned_bytes),
            mib(u.engine_bound_bytes),
            mib(u.kernel_bytes),
            mib(u.kernel_resident_bytes)
        );
    }
    let d = &m.double_alloc;
    let _ = writeln!(
        o,
        "double allocation: computed {:.1} MiB (peak {:.1}), kernel {:.1} MiB; mixed chunks {} (peak {}), memslots {}",
        mib(d.computed_bytes),
        mib(d.computed_peak_bytes),
        mib(d.kernel_bytes),
        m.mixed_chunks,
        m.mixed_chunks_peak,
        m.memslots
    );
    const REASONS: [&str; 9] = [
        "total",
        "io_out",
        "io_in",
        "serial",
        "doorbell",
        "mmio",
        "hlt",
        "hypercall",
        "interrupted",
    ];
    let _ = write!(o, "exits  cpu");
    for r in REASONS {
        let _ = write!(o, " {r:>11}");
    }
    let _ = writeln!(o);
    for (cpu, e) in s.exits.iter().enumerate() {
        let _ = write!(o, "       {cpu:>3}");
        for r in REASONS {
            let _ = write!(o, " {:>11}", e.get(r).copied().unwrap_or(0));
        }
        let _ = writeln!(o);
    }
    if let Some((dt, p)) = prev {
        if dt > 0.0 {
            let _ = writeln!(
                o,
                "       exits/s {:.0}",
                s.exits_total.saturating_sub(p.exits_total) as f64 / dt
            );
        }
    }
    match &m.pool_report {
        Some(p) => {
            let _ = writeln!(
                o,
                "guest pool '{}': used {:.1} / {:.1} MiB (high water {:.1}), shared {:.1} MiB (peak {:.1}), maps {} failures {}, throttle waits {} ({:.1} ms), conversions 4k {} 2m {} other {}",
                p.policy,
                mib(p.used_bytes),
                mib(p.capacity_bytes),
                mib(p.high_water_bytes),
                mib(p.shared_bytes),
                mib(p.shared_peak_bytes),
                p.maps,
                p.map_failures,
                p.throttle_waits,
                p.throttle_wait_ns as f64 / 1e6,
                p.conversions_4k,
                p.conversions_2m,
                p.conversions_other
            );
        }
        None => {
            let _ = writeln!(o, "guest pool: no report yet");
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_socket_is_exit_status_2() {
        let path = std::env::temp_dir().join(format!("vmm-ctl-missing-{}", std::process::id()));
        let err = Client::connect(&path, Duration::from_secs(1))
            .err()
            .expect("no socket there");
        assert!(matches!(err, ClientError::NoSocket(_)), "{err}");
        assert_eq!(err.exit_status(), 2);
    }

    #[test]
    fn refused_socket_is_exit_status_2() {
        let dir = std::env::temp_dir().join(format!("vmm-ctl-refused-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("sock");
        let _ = std::fs::remove_file(&path);
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let err = Client::connect(&path, Duration::from_secs(1))
            .err()
            .expect("nobody listens");
        assert!(matches!(err, ClientError::Refused(_)), "{err}");
        assert_eq!(err.exit_status(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn table_renders_with_and_without_rates() {
        let s = StatsView {
            state: "running".into(),
            cpus: 1,
            exits: vec![[("total".to_string(), 10u64)].into_iter().collect()],
            exits_total: 10,
            ..StatsView::default()
        };
        let first = render_table(&s, None);
        assert_eq!(
            render_table(&s, Some(&s)),
            first,
            "no rates from one snapshot"
        );
        assert!(first.contains("VM running"), "{first}");
        assert!(first.contains("guest pool: no report yet"));
        let mut later = s.clone();
        later.memconv.to_shared.k4 = 500;
        later.exits_total = 30;
        later.uptime_ms = s.uptime_ms + 500;
        let t = render_table(&later, Some(&s));
        assert!(t.contains("1000"), "{t}");
        assert!(t.contains("exits/s 40"), "{t}");
    }
}
