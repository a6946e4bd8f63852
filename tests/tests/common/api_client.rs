//! A raw client of the control-socket protocol (newline-delimited JSON, a greeting first):
//! lines as sent and received, for the tests that check bytes (ids beyond 64 bits), and parsed
//! replies with events skipped, for the rest.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

/// One connection to a VMM's control socket, its greeting read.
pub struct Conn {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// The greeting the server sent first.
    pub greeting: Value,
}

impl Conn {
    /// Connects and reads the greeting; `None` if the socket is not up, refuses, or greets with
    /// something else.
    pub fn try_open(sock: &Path) -> Option<Conn> {
        let stream = UnixStream::connect(sock).ok()?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .ok()?;
        let writer = stream.try_clone().ok()?;
        let mut conn = Conn {
            reader: BufReader::new(stream),
            writer,
            greeting: Value::Null,
        };
        let greeting: Value = serde_json::from_str(&conn.line()?).ok()?;
        greeting.get("greeting")?;
        conn.greeting = greeting;
        Some(conn)
    }

    /// Connects, fails the test unless greeted with protocol 1.
    pub fn open(sock: &Path) -> Conn {
        let conn = Conn::try_open(sock).expect("connect and read the greeting");
        assert_eq!(
            conn.greeting["greeting"]["protocol"], 1,
            "{}",
            conn.greeting
        );
        conn
    }

    /// The next line as received (without its newline); `None` at EOF, on an error or a timeout.
    pub fn line(&mut self) -> Option<String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(n) if n > 0 => Some(line.trim_end().to_string()),
            // EOF, a reset, the read timeout: the server is done with this client.
            _ => None,
        }
    }

    /// The next message parsed; `None` at EOF (or a reset connection).
    pub fn read_msg(&mut self) -> Option<Value> {
        let line = self.line()?;
        Some(
            serde_json::from_str(&line).unwrap_or_else(|e| {
                panic!("the server sent a line that is not JSON ({e}): {line:?}")
            }),
        )
    }

    /// Sends raw bytes.
    pub fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).expect("send to the VMM");
    }

    /// Sends raw bytes that the server may refuse to read to the end; false if the write failed.
    pub fn try_send(&mut self, bytes: &[u8]) -> bool {
        self.writer.write_all(bytes).is_ok()
    }

    /// Closes the sending half (the server sees EOF after what was sent).
    pub fn shutdown_write(&self) {
        self.writer
            .shutdown(std::net::Shutdown::Write)
            .expect("half-close");
    }

    /// Sends one line and returns the next line as received; `None` if the connection is gone.
    pub fn try_request(&mut self, line: &str) -> Option<String> {
        self.writer.write_all(line.as_bytes()).ok()?;
        self.writer.write_all(b"\n").ok()?;
        self.line()
    }

    /// Sends one line and returns the next reply, parsed (events skipped).
    pub fn request(&mut self, line: &str) -> Value {
        self.send(format!("{line}\n").as_bytes());
        self.reply()
    }

    /// The next message that is not an event.
    pub fn reply(&mut self) -> Value {
        loop {
            let msg = self.read_msg().expect("a reply before EOF");
            if msg.get("event").is_none() {
                return msg;
            }
        }
    }

    /// `cmd`'s successful return value.
    pub fn cmd(&mut self, cmd: &str) -> Value {
        let reply = self.request(&format!("{{\"cmd\":\"{cmd}\"}}"));
        assert_eq!(reply["ok"], true, "{cmd}: {reply}");
        reply["return"].clone()
    }

    /// The error code of a reply that must be an error with a message.
    pub fn error_code(reply: &Value) -> String {
        assert_eq!(reply["ok"], false, "expected an error: {reply}");
        assert!(
            reply["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{reply}"
        );
        reply["error"]["code"].as_str().unwrap_or("").to_string()
    }
}
