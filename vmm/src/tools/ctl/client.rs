//! The control-socket connection: connect (with errors that say whether a VMM is there),
//! check the greeting's protocol version, send typed requests and read their replies and
//! events, each bounded by a timeout.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::exit_codes::{EXIT_FAILURE, EXIT_USAGE};

use crate::api::protocol::{
    to_line, ErrorCode, Greeting, Incoming, OutgoingRequest, ProtocolError, Request, StatsView,
    MAX_LINE, PROTOCOL_VERSION,
};
use crate::tools::metrics::MetricsError;

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
}
