//! The memconv doorbell port (`abi::DOORBELL_PORT`): a write makes the conversion service
//! process the writing vCPU's mailbox. The port is write-only.

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

impl BusDevice for Doorbell {
    fn read(&self, _cpu: u32, _offset: u64, _data: &mut [u8]) -> bool {
        false
    }

    fn write(&self, cpu: u32, _offset: u64, _data: &[u8]) -> BusEffect {
        match self.memconv.service_mailbox(cpu) {
            MailboxOutcome::Exit(code) => BusEffect::GuestExit(code),
            MailboxOutcome::Report(report) => BusEffect::PoolReport(report),
            _ => BusEffect::None,
        }
    }
}
