//! Exit dispatch with tiny inline guests: a few bytes of real-mode machine code in guest RAM,
//! run by the real vCPU loop (`vcpu::run_vcpu`) through the real device bus, with probe
//! devices that record what was routed to them. Cheap next to the tests that boot whole
//! fixtures: on a kvm_pvm host the snippet runs in KVM's instruction emulator (no paging, no
//! SSE), a few microseconds per instruction.

mod common;

use std::io::{self, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};
use vmm::devices::bus::{BusDevice, BusEffect, DeviceKind, Space};
use vmm::serial::Console;
use vmm::vcpu::{self, ExitCounts, VcpuControl, VmEnd, VmShared};

/// Where the snippet is loaded and starts (real mode, CS base 0).
const CODE_GPA: u64 = 0x1000;
/// A probe device's port window.
const PROBE_PORT: u16 = 0x700;
/// A port no device owns.
const UNOWNED_PORT: u16 = 0x600;
/// A probe device's MMIO window (above RAM, below 4 GiB: reachable from real mode through a
/// segment base).
const PROBE_MMIO: u64 = 0xd000_0000;
/// A GPA with neither RAM nor a device.
const UNMAPPED_MMIO: u64 = 0xe000_0000;

/// One access routed to a probe: (space, cpu, offset, bytes written).
type Access = (Space, u32, u64, Vec<u8>);

/// A bus device that records every write and reads as `0x5a`.
struct Probe {
    space: Space,
    log: Mutex<Vec<Access>>,
}

impl Probe {
    fn new(space: Space) -> Arc<Self> {
        Arc::new(Probe {
            space,
            log: Mutex::new(Vec::new()),
        })
    }

    fn log(&self) -> Vec<Access> {
        self.log.lock().unwrap().clone()
    }
}

impl BusDevice for Probe {
    fn read(&self, _cpu: u32, _offset: u64, data: &mut [u8]) -> bool {
        data.fill(0x5a);
        true
    }

    fn write(&self, cpu: u32, offset: u64, data: &[u8]) -> BusEffect {
        self.log
            .lock()
            .unwrap()
            .push((self.space, cpu, offset, data.to_vec()));
        BusEffect::None
    }
}

/// Serial output collected in memory.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What one snippet run produced.
struct Run {
    end: Option<VmEnd>,
    counts: ExitCounts,
    serial: Vec<u8>,
    port_probe: Vec<Access>,
    mmio_probe: Vec<Access>,
    unknown_ports: Vec<(u16, u64)>,
}

/// Runs `code` on one real-mode vCPU (DS based at `PROBE_MMIO`, ES at `UNMAPPED_MMIO`) until
/// the VM ends or 20 s pass.
fn run_snippet(code: &[u8]) -> Run {
    run_snippet_with(code, None)
}

/// [`run_snippet`] with one more device on a port window of two.
fn run_snippet_with(code: &[u8], extra: Option<(u16, Arc<dyn BusDevice>)>) -> Run {
    vcpu::install_kick_handler().unwrap();
    let (vm, host, memconv) = common::test_vm(memconv::abi::MIN_RAM);
    memconv
        .private_memory()
        .write_slice(code, GuestAddress(CODE_GPA))
        .unwrap();

    let fd = vm.create_vcpu(0).unwrap();
    let mut sregs = fd.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    sregs.ds.base = PROBE_MMIO;
    sregs.es.base = UNMAPPED_MMIO;
    fd.set_sregs(&sregs).unwrap();
    let mut regs = fd.get_regs().unwrap();
    regs.rip = CODE_GPA;
    regs.rflags = 2;
    fd.set_regs(&regs).unwrap();

    let control = Arc::new(VcpuControl::new(1));
    host.attach_vcpus(Arc::clone(&control));
    let serial = Captured::default();
    let port_probe = Probe::new(Space::Pio);
    let mmio_probe = Probe::new(Space::Mmio);
    let shared = Arc::new(
        VmShared::new(
            Arc::clone(&memconv),
            Console::with_writer(Box::new(serial.clone())),
            Arc::clone(&control),
            1,
        )
        .with_device(
            Space::Pio,
            PROBE_PORT.into(),
            2,
            DeviceKind::Other,
            port_probe.clone(),
        )
        .unwrap()
        .with_device(
            Space::Mmio,
            PROBE_MMIO,
            0x1000,
            DeviceKind::Other,
            mmio_probe.clone(),
        )
        .unwrap(),
    );
    let shared = match extra {
        Some((port, dev)) => Arc::new(
            Arc::into_inner(shared)
                .unwrap()
                .with_device(Space::Pio, port.into(), 2, DeviceKind::Other, dev)
                .unwrap(),
        ),
        None => shared,
    };
    let thread = {
        let shared = Arc::clone(&shared);
        std::thread::spawn(move || vcpu::run_vcpu(fd, 0, shared))
    };
    let end = shared.wait_end(Some(Duration::from_secs(20)));
    if end.is_none() {
        shared.end(VmEnd::Stopped);
    }
    thread.join().unwrap();
    let serial = serial.0.lock().unwrap().clone();
    Run {
        end,
        counts: shared.exit_counts()[0].clone(),
        serial,
        port_probe: port_probe.log(),
        mmio_probe: mmio_probe.log(),
        unknown_ports: shared.unknown_ports().into_iter().collect(),
    }
}

/// `mov dx, imm16`.
fn mov_dx(port: u16) -> Vec<u8> {
    let [lo, hi] = port.to_le_bytes();
    vec![0xba, lo, hi]
}

#[test]
fn port_and_mmio_exits_are_routed_through_the_bus_and_counted() {
    let mut code = Vec::new();
    // Serial: mov dx, 0x3f8; mov al, 'K'; out dx, al.
    code.extend(mov_dx(memconv::abi::SERIAL_PORT));
    code.extend([0xb0, b'K', 0xee]);
    // Probe port, offset 0: mov dx, 0x700; mov al, 0x42; out dx, al.
    code.extend(mov_dx(PROBE_PORT));
    code.extend([0xb0, 0x42, 0xee]);
    // A port nobody owns reads all-ones: mov dx, 0x600; in al, dx; then report al to the
    // probe at offset 1: mov dx, 0x701; out dx, al.
    code.extend(mov_dx(UNOWNED_PORT));
    code.push(0xec);
    code.extend(mov_dx(PROBE_PORT + 1));
    code.push(0xee);
    // Probe MMIO, offset 4: mov byte [ds:4], 0x5a.
    code.extend([0xc6, 0x06, 0x04, 0x00, 0x5a]);
    // Unmapped MMIO: mov byte [es:0], 0xa5.
    code.extend([0x26, 0xc6, 0x06, 0x00, 0x00, 0xa5]);
    // hlt.
    code.push(0xf4);

    let run = run_snippet(&code);
    assert!(
        matches!(run.end, Some(VmEnd::AllHalted)),
        "end {:?}, exits {:?}",
        run.end,
        run.counts
    );
    assert_eq!(run.serial, b"K");
    assert_eq!(
        run.port_probe,
        vec![
            (Space::Pio, 0, 0, vec![0x42]),
            (Space::Pio, 0, 1, vec![0xff])
        ]
    );
    assert_eq!(run.mmio_probe, vec![(Space::Mmio, 0, 4, vec![0x5a])]);
    assert_eq!(run.unknown_ports, vec![(UNOWNED_PORT, 1)]);
    let c = &run.counts;
    assert_eq!(
        (c.io_out, c.io_in, c.serial, c.doorbell, c.unknown_port),
        (3, 1, 1, 0, 1),
        "{c:?}"
    );
    assert_eq!(
        (c.mmio, c.unknown_mmio, c.hlt, c.other),
        (2, 1, 1, 0),
        "{c:?}"
    );
    assert_eq!(c.total, 7 + c.interrupted, "{c:?}");
}

#[test]
fn probe_reads_reach_the_guest() {
    // mov dx, 0x700; in al, dx (the probe reads 0x5a); mov dx, 0x701; out dx, al; hlt.
    let mut code = mov_dx(PROBE_PORT);
    code.push(0xec);
    code.extend(mov_dx(PROBE_PORT + 1));
    code.extend([0xee, 0xf4]);
    let run = run_snippet(&code);
    assert!(matches!(run.end, Some(VmEnd::AllHalted)), "{:?}", run.end);
    assert_eq!(run.port_probe, vec![(Space::Pio, 0, 1, vec![0x5a])]);
    assert_eq!((run.counts.io_in, run.counts.unknown_port), (1, 0));
}

#[test]
fn doorbells_with_another_value_than_the_vcpus_index_are_refused_and_counted() {
    let doorbell = memconv::abi::DOORBELL_PORT;
    let mut code = mov_dx(doorbell);
    // mov eax, 1 (another vCPU's index); out dx, eax.
    code.extend([0x66, 0xb8, 1, 0, 0, 0, 0x66, 0xef]);
    // mov eax, 0xffffffff (out of range); out dx, eax.
    code.extend([0x66, 0xb8, 0xff, 0xff, 0xff, 0xff, 0x66, 0xef]);
    // 200 more refused doorbells: mov cx, 200; l: out dx, eax; loop l.
    code.extend([0xb9, 200, 0, 0x66, 0xef, 0xe2, 0xfc]);
    // mov eax, 0 (its own index); out dx, eax: serviced; hlt.
    code.extend([0x66, 0xb8, 0, 0, 0, 0, 0x66, 0xef, 0xf4]);
    let before = memconv::log_limit::GUEST_LOG.suppressed();
    let t0 = std::time::Instant::now();
    let run = run_snippet(&code);
    let secs = t0.elapsed().as_secs();
    assert!(matches!(run.end, Some(VmEnd::AllHalted)), "{:?}", run.end);
    let c = &run.counts;
    assert_eq!((c.doorbell, c.doorbell_mismatch), (203, 202), "{c:?}");
    // 202 warnings asked for; at most GUEST_LOG_PER_SECOND per second were written.
    let suppressed = memconv::log_limit::GUEST_LOG.suppressed() - before;
    let allowed = u64::from(memconv::log_limit::GUEST_LOG_PER_SECOND) * (secs + 1);
    assert!(
        suppressed + allowed >= 202,
        "{suppressed} suppressed in {secs} s"
    );
}

/// A device whose every write panics (a VMM bug, as far as the guest can tell).
struct Panicker;

impl BusDevice for Panicker {
    fn read(&self, _cpu: u32, _offset: u64, _data: &mut [u8]) -> bool {
        false
    }

    fn write(&self, _cpu: u32, _offset: u64, _data: &[u8]) -> BusEffect {
        panic!("the panicking probe was written");
    }
}

#[test]
fn a_panic_on_a_vcpu_thread_ends_the_vm_as_a_host_error() {
    const PANIC_PORT: u16 = 0x720;
    // mov dx, 0x720; out dx, al; hlt.
    let mut code = mov_dx(PANIC_PORT);
    code.extend([0xee, 0xf4]);
    let run = run_snippet_with(&code, Some((PANIC_PORT, Arc::new(Panicker))));
    match &run.end {
        Some(VmEnd::HostError { cpu: 0, error }) => {
            assert!(error.contains("vCPU thread panicked"), "{error}");
            assert!(error.contains("the panicking probe was written"), "{error}");
        }
        other => panic!("end {other:?}"),
    }
}
