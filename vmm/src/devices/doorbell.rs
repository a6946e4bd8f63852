//! The memconv doorbell port (`abi::DOORBELL_PORT`): a write of the writing vCPU's own index
//! makes the conversion service process that vCPU's mailbox. Any other value (another vCPU's
//! index, an index out of range) is refused: nothing is processed, the exit is counted as
//! `doorbell_mismatch` and a rate-limited warning is logged. The port is write-only.

use std::sync::Arc;

use memconv::{ConversionService, MailboxOutcome};

use super::bus::{BusDevice, BusEffect};

/// The doorbell, in front of the conversion service.
pub struct Doorbell {
    memconv: Arc<ConversionService>,
}

impl Doorbell {
    /// A doorbell ringing `memconv`.
    pub fn new(memconv: Arc<ConversionService>) -> Self {
        Self { memconv }
    }
}

/// The value of a port write of 1, 2 or 4 bytes (little endian); None for other sizes.
pub fn doorbell_value(data: &[u8]) -> Option<u32> {
    match data.len() {
        1 | 2 | 4 => {
            let mut v = [0u8; 4];
            v[..data.len()].copy_from_slice(data);
            Some(u32::from_le_bytes(v))
        }
        _ => None,
    }
}

impl BusDevice for Doorbell {
    fn read(&self, _cpu: u32, _offset: u64, _data: &mut [u8]) -> bool {
        false
    }

    fn write(&self, cpu: u32, _offset: u64, data: &[u8]) -> BusEffect {
        let value = doorbell_value(data);
        if value != Some(cpu) {
            memconv::guest_warn!(
                "vCPU {cpu} rang the doorbell with {value:?}, not its own index: refused"
            );
            return BusEffect::DoorbellRefused;
        }
        match self.memconv.service_mailbox(cpu) {
            MailboxOutcome::Exit(code) => BusEffect::GuestExit(code),
            MailboxOutcome::Report(report) => BusEffect::PoolReport(report),
            _ => BusEffect::None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_of_every_port_width() {
        assert_eq!(doorbell_value(&[3]), Some(3));
        assert_eq!(doorbell_value(&[1, 1]), Some(0x101));
        assert_eq!(doorbell_value(&7u32.to_le_bytes()), Some(7));
        assert_eq!(doorbell_value(&[]), None);
        assert_eq!(doorbell_value(&[0; 8]), None);
    }
}
