//! The 16550 serial console on COM1 (vm-superio), writing to stdout or a file, and noting when
//! the guest's first byte arrived (for the boot benchmark). A closed output (EPIPE: stdout piped
//! into a reader that went away) is noted once and the guest's later bytes are discarded; other
//! write errors (a full disk, `/dev/full`) are rate-limited warnings, never one per byte.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use vm_superio::{Serial, Trigger};

use crate::devices::bus::{BusDevice, BusEffect};

/// Errors of the serial console.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// The --serial file could not be created.
    #[error("cannot create serial output file {path}: {source}")]
    Create {
        /// The file.
        path: String,
        /// What failed.
        source: io::Error,
    },
}

/// The guest has no interrupt controller: transmit-ready interrupts go nowhere.
pub struct NoInterrupt;

impl Trigger for NoInterrupt {
    type E = io::Error;
    fn trigger(&self) -> Result<(), io::Error> {
        Ok(())
    }
}

/// Where console bytes go, with the arrival time of the first one.
pub struct ConsoleSink {
    out: Box<dyn Write + Send>,
    first_byte: OnceLock<Instant>,
    bytes: u64,
    /// The reader went away (EPIPE): output is discarded from then on.
    closed: bool,
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if !buf.is_empty() {
            self.first_byte.get_or_init(Instant::now);
            self.bytes += buf.len() as u64;
        }
        if self.closed {
            return Ok(buf.len());
        }
        match self.out.write(buf) {
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                self.closed = true;
                tracing::warn!("serial output closed ({e}); the guest's console output is discarded from now on");
                Ok(buf.len())
            }
            other => other,
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        if self.closed {
            return Ok(());
        }
        self.out.flush()
    }
}

/// COM1, shared by all vCPU threads.
pub struct Console {
    serial: Mutex<Serial<NoInterrupt, vm_superio::serial::NoEvents, ConsoleSink>>,
}

/// Number of I/O ports the UART decodes.
pub const SERIAL_PORTS: u16 = 8;

impl Console {
    /// A console writing to `path`, or to stdout when `None`.
    pub fn new(path: Option<&Path>) -> Result<Self, SerialError> {
        let out: Box<dyn Write + Send> = match path {
            Some(p) => Box::new(File::create(p).map_err(|source| SerialError::Create {
                path: p.display().to_string(),
                source,
            })?),
            None => Box::new(io::stdout()),
        };
        Ok(Self::with_writer(out))
    }

    /// A console writing to any sink (used by tests and benchmarks).
    pub fn with_writer(out: Box<dyn Write + Send>) -> Self {
        let sink = ConsoleSink {
            out,
            first_byte: OnceLock::new(),
            bytes: 0,
            closed: false,
        };
        Self {
            serial: Mutex::new(Serial::new(NoInterrupt, sink)),
        }
    }

    /// A guest `out` to UART register `offset`.
    pub fn write(&self, offset: u8, value: u8) {
        let mut serial = self.serial.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = serial.write(offset, value) {
            memconv::guest_warn!("serial write failed: {e:?}");
        }
    }

    /// A guest `in` from UART register `offset`.
    pub fn read(&self, offset: u8) -> u8 {
        let mut serial = self.serial.lock().unwrap_or_else(|p| p.into_inner());
        serial.read(offset)
    }

    /// When the guest wrote its first byte, if it did.
    pub fn first_byte_at(&self) -> Option<Instant> {
        let serial = self.serial.lock().unwrap_or_else(|p| p.into_inner());
        serial.writer().first_byte.get().copied()
    }

    /// Bytes the guest has written.
    pub fn bytes_written(&self) -> u64 {
        let serial = self.serial.lock().unwrap_or_else(|p| p.into_inner());
        serial.writer().bytes
    }

    /// Flushes buffered output.
    pub fn flush(&self) {
        let mut serial = self.serial.lock().unwrap_or_else(|p| p.into_inner());
        let _ = serial.writer_mut().flush();
    }
}

/// On the bus: UART register `offset`; a write sends its first byte, a read returns the
/// register in the first byte and zeros after it.
impl BusDevice for Console {
    fn read(&self, _cpu: u32, offset: u64, data: &mut [u8]) -> bool {
        let value = Console::read(self, offset as u8);
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = value;
        }
        true
    }

    fn write(&self, _cpu: u32, offset: u64, data: &[u8]) -> BusEffect {
        if let Some(byte) = data.first() {
            Console::write(self, offset as u8, *byte);
        }
        BusEffect::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmitted_bytes_reach_the_sink_and_lsr_says_ready() {
        let buf = Shared::default();
        let console = Console::with_writer(Box::new(buf.clone()));
        assert!(console.first_byte_at().is_none());
        for b in b"hi\n" {
            console.write(0, *b);
        }
        assert_eq!(&*buf.0.lock().unwrap(), b"hi\n");
        assert_eq!(console.bytes_written(), 3);
        assert!(console.first_byte_at().is_some());
        // Line status register: transmitter holding register empty.
        assert_ne!(console.read(5) & 0x20, 0);
    }
}
