//! Serving the queues ([`Core`]): the state the poller and the MMIO handlers share behind one
//! mutex (transport, disk, scratch space), queue validation at DRIVER_OK, one polling round
//! over every ready queue, and the notification switches the poller flips around a sleep.
//!
//! Ring-level faults (rings not shared, a bogus available index, a head index out of range)
//! set DEVICE_NEEDS_RESET and stop the device until the driver resets it, also counted.
//!
//! The DMA fence: a round pins the queue's three rings once (every descriptor, available and
//! used ring access of the round happens under that pin) and each request pins its own
//! buffers ([`super::request`]). When a conversion holds a ring (`Busy`) the queue is skipped
//! this round; when it holds a request's buffers, that request and the ones after it go back
//! to the available ring (`next_avail` rewound) and the round ends, releasing every pin:
//! the device never waits for a vCPU while it holds a pin.

use std::sync::{Mutex, MutexGuard};

use memconv::{DmaPin, FenceError};
use virtio_queue::{Queue, QueueOwnedT, QueueT};

use super::disk::Disk;
use super::guest::GuestAccess;
use super::request::{Processed, Requests, Seg};
use super::stats::{bump, Counters};
use crate::devices::mmio::MmioTransport;

/// The state the poller and the MMIO handlers share (behind one mutex).
pub struct State {
    /// The virtio-mmio transport and its queues.
    pub transport: MmioTransport,
    /// The disk image.
    pub disk: Disk,
    segs: Vec<Seg>,
    heads: Vec<u16>,
}

impl State {
    /// The state over `transport` and `disk`, with scratch space for queues of `max_queue`.
    pub fn new(transport: MmioTransport, disk: Disk, max_queue: u16) -> Self {
        State {
            transport,
            disk,
            segs: Vec::with_capacity(usize::from(max_queue)),
            heads: Vec::with_capacity(usize::from(max_queue)),
        }
    }
}

/// Why a queue cannot be served: the device needs a reset.
#[derive(Debug)]
enum QueueFault {
    /// A ring is not in shared RAM.
    RingNotShared,
    /// virtio-queue refused the ring (bad available index, memory error), or a head index
    /// out of range (logged where found).
    Ring,
}

fn ring_sizes(size: u16) -> (u64, u64, u64) {
    let n = u64::from(size);
    // Descriptor table; available ring with used_event; used ring with avail_event.
    (16 * n, 6 + 2 * n, 6 + 8 * n)
}

/// What serving the queues needs: the shared state, guest memory and the counters.
pub struct Core {
    state: Mutex<State>,
    /// Guest memory.
    pub guest: GuestAccess,
    /// The device's counters.
    pub counters: Counters,
}

impl Core {
    /// A core over `state` and `guest`, counters at zero.
    pub fn new(state: State, guest: GuestAccess) -> Self {
        Core {
            state: Mutex::new(state),
            guest,
            counters: Counters::default(),
        }
    }

    /// Locks the shared state.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// At DRIVER_OK: every ready queue must be well formed and its rings shared (rings a
    /// conversion holds right now are checked by the poller's first round instead: a vCPU
    /// never waits for a conversion here).
    pub fn validate_queues(&self, st: &mut State) -> bool {
        let mem = self.guest.memory();
        for q in st.transport.queues.iter().filter(|q| q.ready()) {
            let rings = self.pin_rings(q);
            if !q.is_valid(mem) || matches!(rings, Err(e) if e != FenceError::Busy) {
                tracing::debug!("virtio-blk: queue rejected at DRIVER_OK");
                return false;
            }
        }
        true
    }

    /// One pin over the queue's descriptor table, available ring and used ring.
    fn pin_rings(&self, q: &Queue) -> Result<DmaPin<'_>, FenceError> {
        let (d, a, u) = ring_sizes(q.size());
        self.guest
            .pin(&[(q.desc_table(), d), (q.avail_ring(), a), (q.used_ring(), u)])
    }

    /// Serves every ready queue once; returns (requests completed, device active).
    pub fn service_round(&self) -> (usize, bool) {
        let mut st = self.lock();
        if !st.transport.active() {
            return (0, false);
        }
        bump(&self.counters.polls, 1);
        let mut done = 0;
        for qi in 0..st.transport.queues.len() {
            if !st.transport.queues[qi].ready() {
                continue;
            }
            match self.service_queue(&mut st, qi) {
                Ok(n) => done += n,
                Err(fault) => {
                    tracing::debug!("virtio-blk: queue {qi} fault: {fault:?}; device needs reset");
                    if matches!(fault, QueueFault::RingNotShared) {
                        bump(&self.counters.violations, 1);
                    }
                    bump(&self.counters.device_faults, 1);
                    st.transport.set_needs_reset();
                    return (done, false);
                }
            }
        }
        (done, true)
    }

    /// Announces the sleep on every ready queue; true if work is already pending.
    pub fn prepare_sleep(&self) -> bool {
        let mut st = self.lock();
        if !st.transport.active() {
            return false;
        }
        let mem = self.guest.memory();
        let mut pending = false;
        let mut fault = false;
        for q in st.transport.queues.iter_mut().filter(|q| q.ready()) {
            let _rings = match self.pin_rings(q) {
                Ok(pin) => pin,
                Err(FenceError::Busy) => {
                    // A conversion holds a ring now: keep polling rather than sleep.
                    pending = true;
                    continue;
                }
                Err(_) => {
                    fault = true;
                    break;
                }
            };
            match q.enable_notification(mem) {
                Ok(p) => pending |= p,
                Err(_) => {
                    fault = true;
                    break;
                }
            }
        }
        if fault {
            bump(&self.counters.device_faults, 1);
            st.transport.set_needs_reset();
            return false;
        }
        pending
    }

    /// Back to polling: no notifications wanted.
    pub fn after_wake(&self) {
        let mut st = self.lock();
        if !st.transport.active() {
            return;
        }
        let mem = self.guest.memory();
        for qi in 0..st.transport.queues.len() {
            let q = &st.transport.queues[qi];
            if !q.ready() {
                continue;
            }
            let Ok(_rings) = self.pin_rings(q) else {
                continue;
            };
            // With EVENT_IDX this writes nothing; without it, it sets NO_NOTIFY.
            let _ = st.transport.queues[qi].disable_notification(mem);
        }
    }

    fn service_queue(&self, st: &mut State, qi: usize) -> Result<usize, QueueFault> {
        let mem = self.guest.memory();
        let State {
            transport,
            disk,
            segs,
            heads,
        } = st;
        let q = &mut transport.queues[qi];
        // Every ring access of this round happens under this pin.
        let _rings = match self.pin_rings(q) {
            Ok(pin) => pin,
            Err(FenceError::Busy) => {
                bump(&self.counters.fence_retries, 1);
                return Ok(0);
            }
            Err(FenceError::NotBacked { .. }) => return Err(QueueFault::Ring),
            Err(_) => return Err(QueueFault::RingNotShared),
        };
        heads.clear();
        {
            let iter = q.iter(mem).map_err(|e| {
                tracing::debug!("virtio-blk: queue {qi}: {e}");
                QueueFault::Ring
            })?;
            heads.extend(iter.map(|chain| chain.head_index()));
        }
        let size = q.size();
        let desc_table = q.desc_table();
        let requests = Requests {
            guest: &self.guest,
            disk,
            counters: &self.counters,
        };
        let first_avail = q.next_avail().wrapping_sub(heads.len() as u16);
        for (i, &head) in heads.iter().enumerate() {
            if head >= size {
                tracing::debug!("virtio-blk: queue {qi}: head index {head} >= size {size}");
                return Err(QueueFault::Ring);
            }
            let used_len = match requests.process(segs, desc_table, size, head) {
                Processed::Done(n) => n,
                Processed::Retry => {
                    // A conversion holds this request's pages: it and the rest wait for a
                    // later round, with no pin held meanwhile.
                    q.set_next_avail(first_avail.wrapping_add(i as u16));
                    bump(&self.counters.fence_retries, 1);
                    return Ok(i);
                }
            };
            bump(&self.counters.requests, 1);
            // The used ring was checked shared at the start of this round.
            q.add_used(mem, head, used_len).map_err(|e| {
                tracing::debug!("virtio-blk: queue {qi}: {e}");
                QueueFault::Ring
            })?;
        }
        Ok(heads.len())
    }
}
