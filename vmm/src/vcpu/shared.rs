//! What the vCPU threads of one VM share ([`VmShared`]), composed of the parts each concern
//! owns: the conversion service, the console, the vCPU control, the device bus the exits are
//! routed through, the end-of-VM rendezvous and the telemetry.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use memconv::abi;
use memconv::ConversionService;
use vmm_sys_util::eventfd::EventFd;

use super::control::VcpuControl;
use super::end::{EndRendezvous, VmEnd};
use super::telemetry::{ExitCounts, PoolSample, Telemetry};
use crate::devices::bus::{Bus, BusDevice, BusError, DeviceKind, Space};
use crate::devices::doorbell::Doorbell;
use crate::devices::{BlkStats, Devices};
use crate::serial::{Console, SERIAL_PORTS};

/// Everything vCPU threads share.
pub struct VmShared {
    /// The conversion service.
    pub memconv: Arc<ConversionService>,
    /// COM1.
    pub console: Arc<Console>,
    /// Pause/stop.
    pub control: Arc<VcpuControl>,
    /// Port and MMIO routing (the console, the doorbell, the MMIO devices).
    pub(super) bus: Bus,
    /// Why and when the VM ended.
    pub(super) ending: EndRendezvous,
    /// Exit counts, unknown ports, pool reports.
    pub(super) telemetry: Telemetry,
    /// The MMIO devices (for their statistics), once attached.
    devices: Option<Arc<Devices>>,
}

fn insert_fixed(bus: &mut Bus, base: u16, len: u16, kind: DeviceKind, dev: Arc<dyn BusDevice>) {
    if let Err(e) = bus.insert(Space::Pio, base.into(), len.into(), kind, dev) {
        // The fixed ports are disjoint by construction.
        tracing::error!("{e}");
    }
}

impl VmShared {
    /// Shared state for a VM with `cpus` vCPUs: the console on COM1 and the doorbell on the
    /// bus, no MMIO devices.
    pub fn new(
        memconv: Arc<ConversionService>,
        console: Console,
        control: Arc<VcpuControl>,
        cpus: u32,
    ) -> Self {
        let console = Arc::new(console);
        let mut bus = Bus::new();
        insert_fixed(
            &mut bus,
            abi::SERIAL_PORT,
            SERIAL_PORTS,
            DeviceKind::Serial,
            console.clone(),
        );
        insert_fixed(
            &mut bus,
            abi::DOORBELL_PORT,
            1,
            DeviceKind::Doorbell,
            Arc::new(Doorbell::new(Arc::clone(&memconv))),
        );
        Self {
            memconv,
            console,
            control,
            bus,
            ending: EndRendezvous::default(),
            telemetry: Telemetry::new(cpus),
            devices: None,
        }
    }

    /// The same, with the devices of the MMIO window on the bus.
    pub fn with_devices(mut self, devices: Arc<Devices>) -> Self {
        if let Err(e) = devices.attach(&mut self.bus) {
            // The MMIO window holds one device per DEVICE_WINDOW by construction.
            tracing::error!("{e}");
        }
        self.devices = Some(devices);
        self
    }

    /// The block device's counters now, when the VM has one.
    pub fn disk_stats(&self) -> Option<BlkStats> {
        self.devices.as_ref()?.block().map(|b| b.stats())
    }

    /// The same, with one more device on the bus (tests attach probes this way).
    pub fn with_device(
        mut self,
        space: Space,
        base: u64,
        len: u64,
        kind: DeviceKind,
        dev: Arc<dyn BusDevice>,
    ) -> Result<Self, BusError> {
        self.bus.insert(space, base, len, kind, dev)?;
        Ok(self)
    }

    /// Ends the VM (the first reason wins) and stops every vCPU.
    pub fn end(&self, why: VmEnd) {
        self.ending.record(why);
        self.control.stop();
        self.ending.signal();
    }

    /// Has `fd` written to when the VM ends (once; later calls are ignored). The VM may
    /// already have ended: check [`VmShared::wait_end`] after installing it.
    pub fn set_end_notifier(&self, fd: EventFd) {
        self.ending.set_notifier(fd);
    }

    /// Blocks until the VM has ended, or `timeout` passes; returns the reason if ended.
    pub fn wait_end(&self, timeout: Option<Duration>) -> Option<VmEnd> {
        self.ending.wait(timeout)
    }

    /// A copy of every vCPU's exit counts.
    pub fn exit_counts(&self) -> Vec<ExitCounts> {
        self.telemetry.exit_counts()
    }

    /// Unknown ports touched, with access counts.
    pub fn unknown_ports(&self) -> BTreeMap<u16, u64> {
        self.telemetry.unknown_ports()
    }

    /// The guest pool reports received so far, over time.
    pub fn pool_timeline(&self) -> Vec<PoolSample> {
        self.telemetry.pool_timeline()
    }
}
