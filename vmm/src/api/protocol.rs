//! The control-socket protocol: one JSON object per line in each direction, in the spirit of
//! QMP. Owns the wire types (greeting, requests, replies, events), the protocol version, the
//! error codes, request decoding, and the client's typed view of a `stats` reply.
//!
//! On connect the server sends a greeting line:
//! `{"greeting":{"protocol":1,"vmm":"0.1.0","pid":123,"commands":["stats",...]}}`.
//! A request is `{"cmd":"NAME"}` with an optional `"id"` (any JSON value, echoed in the reply
//! exactly as sent, byte for byte) and an optional `"protocol"` (the version the client speaks;
//! refused if not supported). A key given twice is refused (`bad_request`).
//! A reply is `{"id":..,"ok":true,"return":{..}}` or
//! `{"id":..,"ok":false,"error":{"code":"unknown_command","message":".."}}`.
//! Events are lines with an `"event"` key, e.g. `{"event":"vm_end","data":{..}}`, sent when
//! the VM ends; clients skip events they do not expect.
//!
//! Compatibility: within one protocol version fields are only ever added; clients ignore
//! fields they do not know.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

use fields::RequestFields;

use crate::config::VmConfig;
use crate::devices::BlkStats;
use crate::vcpu::{ExitCounts, VmEnd};

/// The protocol version this VMM speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// Longest request line the server accepts, newline excluded.
pub const MAX_LINE: usize = 64 * 1024;

/// Every command, in the order the greeting lists them.
pub const COMMANDS: [&str; 5] = ["stats", "config", "pause", "resume", "shutdown"];

/// Errors decoding a request or a reply. Each maps to a wire [`ErrorCode`].
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The line is not JSON (or not UTF-8).
    #[error("not a JSON object: {0}")]
    Parse(String),
    /// JSON, but not a valid request (not an object, no `cmd`, bad arguments).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// `cmd` names no command.
    #[error("unknown command {0:?} (commands: {list})", list = COMMANDS.join(", "))]
    UnknownCommand(String),
    /// The request asked for a protocol version this server does not speak.
    #[error("protocol version {got} is not supported (this VMM speaks {PROTOCOL_VERSION})")]
    UnsupportedProtocol {
        /// The version asked for.
        got: u64,
    },
    /// A line longer than [`MAX_LINE`].
    #[error("request line longer than {MAX_LINE} bytes")]
    LineTooLong,
    /// A reply or greeting the client cannot understand.
    #[error("malformed message from the VMM: {0}")]
    BadMessage(String),
}

impl ProtocolError {
    /// The wire error code.
    pub fn code(&self) -> ErrorCode {
        match self {
            ProtocolError::Parse(_) => ErrorCode::ParseError,
            ProtocolError::BadRequest(_) | ProtocolError::BadMessage(_) => ErrorCode::BadRequest,
            ProtocolError::UnknownCommand(_) => ErrorCode::UnknownCommand,
            ProtocolError::UnsupportedProtocol { .. } => ErrorCode::UnsupportedProtocol,
            ProtocolError::LineTooLong => ErrorCode::LineTooLong,
        }
    }
}

/// Error codes of failed replies (`error.code`, snake_case on the wire).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The line is not JSON.
    ParseError,
    /// Not a valid request object.
    BadRequest,
    /// No such command.
    UnknownCommand,
    /// Protocol version not supported.
    UnsupportedProtocol,
    /// The line exceeded [`MAX_LINE`]; the server closes the connection after this reply.
    LineTooLong,
    /// The server has as many clients as it serves; it closes the connection.
    TooManyClients,
    /// The VM is ending: pause/resume/shutdown are refused.
    VmEnding,
    /// The client sent nothing for the idle timeout; the server closes the connection.
    IdleTimeout,
    /// The server failed; the VM is unaffected.
    Internal,
    /// A code this client does not know (newer server).
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::ParseError => "parse_error",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownCommand => "unknown_command",
            ErrorCode::UnsupportedProtocol => "unsupported_protocol",
            ErrorCode::LineTooLong => "line_too_long",
            ErrorCode::TooManyClients => "too_many_clients",
            ErrorCode::VmEnding => "vm_ending",
            ErrorCode::IdleTimeout => "idle_timeout",
            ErrorCode::Internal => "internal",
            ErrorCode::Unknown => "unknown",
        }
    }
}

/// A request, by command. No command takes arguments in protocol 1: a request is `cmd`, plus
/// the optional `id` and `protocol`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Conversion statistics, exit counts, guest pool report, uptime: [`StatsReply`].
    Stats,
    /// How the VM was started: [`ConfigReply`].
    Config,
    /// Stop running guest code until `resume`: [`StateReply`].
    Pause,
    /// Run guest code again: [`StateReply`].
    Resume,
    /// End the VM (as stopped by the host; the summary is still written): [`StateReply`].
    Shutdown,
}

impl Request {
    /// The command name.
    pub fn name(self) -> &'static str {
        match self {
            Request::Stats => "stats",
            Request::Config => "config",
            Request::Pause => "pause",
            Request::Resume => "resume",
            Request::Shutdown => "shutdown",
        }
    }
}

/// A request `id` as the client sent it (raw JSON text, echoed verbatim).
pub type RawId = Box<RawValue>;

/// A decoded request line.
#[derive(Clone, Debug)]
pub struct Envelope {
    /// The client's `id`, echoed in the reply exactly as sent.
    pub id: Option<RawId>,
    /// The request.
    pub request: Request,
}

/// A request line as a client sends it.
#[derive(Clone, Debug, Serialize)]
pub struct OutgoingRequest {
    /// The command.
    #[serde(flatten)]
    pub request: Request,
    /// Echoed in the reply.
    pub id: u64,
    /// The protocol version the client speaks.
    pub protocol: u32,
}

/// Decodes one request line (without its newline). On error, returns the request's `id` if
/// it had one, for the error reply.
pub fn decode_request(line: &[u8]) -> Result<Envelope, (Option<RawId>, ProtocolError)> {
    let parse_error = |e: serde_json::Error| (None, ProtocolError::Parse(e.to_string()));
    // Valid JSON that is not an object: bad_request; not JSON: parse_error.
    if line.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        serde_json::from_slice::<serde::de::IgnoredAny>(line).map_err(parse_error)?;
        return Err((
            None,
            ProtocolError::BadRequest("a request is a JSON object".into()),
        ));
    }
    let fields: RequestFields = serde_json::from_slice(line).map_err(parse_error)?;
    let id = fields.id;
    if let Some(key) = fields.duplicate {
        // A repeated `id` has no one value to echo.
        let id = if key == "id" { None } else { id };
        return Err((
            id,
            ProtocolError::BadRequest(format!("duplicate key {key:?}")),
        ));
    }
    let mut obj: serde_json::Map<String, Value> = fields.members.into_iter().collect();
    if let Some(v) = obj.remove("protocol") {
        match v.as_u64() {
            Some(n) if n == u64::from(PROTOCOL_VERSION) => {}
            Some(n) => return Err((id, ProtocolError::UnsupportedProtocol { got: n })),
            None => {
                return Err((
                    id,
                    ProtocolError::BadRequest("\"protocol\" must be a number".into()),
                ))
            }
        }
    }
    let cmd = match obj.get("cmd") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => {
            return Err((
                id,
                ProtocolError::BadRequest("\"cmd\" must be a string".into()),
            ))
        }
        None => {
            return Err((
                id,
                ProtocolError::BadRequest("missing \"cmd\" (e.g. {\"cmd\":\"stats\"})".into()),
            ))
        }
    };
    if !COMMANDS.contains(&cmd.as_str()) {
        return Err((id, ProtocolError::UnknownCommand(cmd)));
    }
    // serde does not refuse extra fields next to an internally tagged unit variant.
    if let Some(extra) = obj.keys().find(|k| k.as_str() != "cmd") {
        return Err((
            id,
            ProtocolError::BadRequest(format!("{cmd}: unexpected argument {extra:?}")),
        ));
    }
    match serde_json::from_value::<Request>(Value::Object(obj)) {
        Ok(request) => Ok(Envelope { id, request }),
        Err(e) => Err((id, ProtocolError::BadRequest(format!("{cmd}: {e}")))),
    }
}

/// The first line the server sends on a connection.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Greeting {
    /// Protocol version ([`PROTOCOL_VERSION`]).
    pub protocol: u32,
    /// The VMM's version.
    pub vmm: String,
    /// The VMM's process id.
    pub pid: u32,
    /// The commands it serves.
    pub commands: Vec<String>,
}

impl Greeting {
    /// This VMM's greeting.
    pub fn current() -> Self {
        Greeting {
            protocol: PROTOCOL_VERSION,
            vmm: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            commands: COMMANDS.iter().map(|c| c.to_string()).collect(),
        }
    }
}

/// The greeting line's object.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GreetingLine {
    /// The greeting.
    pub greeting: Greeting,
}

/// An error in a reply.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WireError {
    /// Machine-readable code.
    pub code: ErrorCode,
    /// Human-readable message.
    pub message: String,
}

/// A reply line (server side: the `return` value is any serializable value).
#[derive(Clone, Debug, Serialize)]
pub struct Reply<T: Serialize> {
    /// The request's `id` exactly as sent, if it had one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<RawId>,
    /// Whether the command succeeded.
    pub ok: bool,
    /// The command's result when `ok`.
    #[serde(rename = "return", skip_serializing_if = "Option::is_none")]
    pub ret: Option<T>,
    /// The error when not `ok`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<WireError>,
}

impl<T: Serialize> Reply<T> {
    /// A successful reply.
    pub fn ok(id: Option<RawId>, ret: T) -> Self {
        Reply {
            id,
            ok: true,
            ret: Some(ret),
            error: None,
        }
    }
}

impl Reply<()> {
    /// A failed reply.
    pub fn error(id: Option<RawId>, code: ErrorCode, message: impl Into<String>) -> Self {
        Reply {
            id,
            ok: false,
            ret: None,
            error: Some(WireError {
                code,
                message: message.into(),
            }),
        }
    }
}

/// Any line from the server, as a client reads it.
#[derive(Clone, Debug, Deserialize)]
pub struct Incoming {
    /// The request's `id` (replies).
    #[serde(default)]
    pub id: Option<Value>,
    /// Whether the command succeeded (replies).
    #[serde(default)]
    pub ok: Option<bool>,
    /// The result (successful replies).
    #[serde(rename = "return", default)]
    pub ret: Option<Value>,
    /// The error (failed replies).
    #[serde(default)]
    pub error: Option<WireError>,
    /// The event name (events).
    #[serde(default)]
    pub event: Option<String>,
    /// The event data (events).
    #[serde(default)]
    pub data: Option<Value>,
    /// The greeting (first line).
    #[serde(default)]
    pub greeting: Option<Greeting>,
}

/// What the VM is doing, as the control socket sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Guest code runs.
    Running,
    /// Paused through the control socket.
    Paused,
    /// Ending (shutdown asked, or the guest ended it).
    Ending,
}

impl VmState {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Ending => "ending",
        }
    }
}

/// The `stats` reply (server side).
#[derive(Clone, Debug, Serialize)]
pub struct StatsReply {
    /// Protocol version.
    pub protocol: u32,
    /// Running, paused or ending.
    pub state: VmState,
    /// Milliseconds from the VM's creation to the snapshot.
    pub uptime_ms: u64,
    /// How old the snapshot is, in milliseconds: a snapshot is reused for at most 100 times
    /// what it cost (`snapshot_us`), at most 250 ms, so pollers cost the VM at most ~1%.
    pub age_ms: u64,
    /// vCPUs.
    pub cpus: u32,
    /// Exits per vCPU by reason (exact up to each vCPU's latest exit at snapshot time).
    pub exits: Vec<ExitCounts>,
    /// Sum of `exits[].total`.
    pub exits_total: u64,
    /// Pauses of the vCPUs so far (memslot edits and control-socket pauses).
    pub vcpu_pauses: u64,
    /// Microseconds taking the snapshot took (memconv's lock wait and kernel queries).
    pub snapshot_us: u64,
    /// The conversion service's snapshot, with the guest's latest pool report.
    pub memconv: memconv::StatsSnapshot,
    /// The virtio block device's counters (`io_errors` among them), when the VM has one.
    pub disk: Option<BlkStats>,
}

/// The `config` reply.
#[derive(Clone, Debug, Serialize)]
pub struct ConfigReply {
    /// The configuration `vmm run` built from its flags.
    pub config: VmConfig,
    /// `pvm` or `hardware`.
    pub host: &'static str,
    /// Whether guest code runs natively.
    pub native: bool,
}

/// The `pause`, `resume` and `shutdown` replies.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StateReply {
    /// The state after the command.
    pub state: VmState,
    /// Whether the command changed it (pausing a paused VM does not).
    pub changed: bool,
}

/// The `vm_end` event's data.
#[derive(Clone, Debug, Serialize)]
pub struct VmEndEvent {
    /// Why the VM ended.
    pub end: VmEnd,
    /// The status `vmm run` exits with.
    pub exit_status: u8,
}

/// An event line.
#[derive(Clone, Debug, Serialize)]
pub struct Event<T: Serialize> {
    /// Event name.
    pub event: &'static str,
    /// Event data.
    pub data: T,
}

// ---- The client's view of a `stats` reply: what the VMM adds around memconv's snapshot, which
// the client reads as memconv's own type. Missing fields default (older or newer servers);
// unknown fields are ignored.

/// A `stats` reply as `vmm ctl` reads it ([`StatsReply`] with its VMM part loosely typed).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct StatsView {
    /// Protocol version.
    pub protocol: u32,
    /// `running`, `paused` or `ending`.
    pub state: String,
    /// Milliseconds from the VM's creation to the snapshot.
    pub uptime_ms: u64,
    /// Age of the snapshot, ms.
    pub age_ms: u64,
    /// vCPUs.
    pub cpus: u32,
    /// Exits per vCPU: reason -> count (`total` included).
    pub exits: Vec<BTreeMap<String, u64>>,
    /// All exits.
    pub exits_total: u64,
    /// vCPU pauses.
    pub vcpu_pauses: u64,
    /// Microseconds the memconv snapshot took.
    pub snapshot_us: u64,
    /// memconv's snapshot, with the guest's latest pool report.
    pub memconv: memconv::StatsSnapshot,
    /// The block device's counters, when the VM has one.
    pub disk: Option<BlkStats>,
}

/// Serializes one message as a line (with its newline).
pub fn to_line<T: Serialize>(message: &T) -> Result<Vec<u8>, serde_json::Error> {
    let mut line = serde_json::to_vec(message)?;
    line.push(b'\n');
    Ok(line)
}

mod fields;

#[cfg(test)]
mod tests;
