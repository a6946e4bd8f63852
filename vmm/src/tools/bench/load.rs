//! Busy threads beside a benchmarked VM ([`BusyLoad`]): what any host running more than one
//! VM, or `vmm conform --jobs`, looks like to the VM's threads. Each thread spins on integer
//! work until the load is dropped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// `n` spinning threads, stopped and joined on drop.
pub struct BusyLoad {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl BusyLoad {
    /// Starts `n` busy threads (fewer if the host refuses to start more).
    pub fn start(n: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..n)
            .filter_map(|i| {
                let stop = Arc::clone(&stop);
                std::thread::Builder::new()
                    .name(format!("busy{i}"))
                    .spawn(move || {
                        let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ i as u64;
                        while !stop.load(Ordering::Relaxed) {
                            for _ in 0..1024 {
                                x ^= x << 13;
                                x ^= x >> 7;
                                x ^= x << 17;
                            }
                            std::hint::black_box(x);
                        }
                    })
                    .ok()
            })
            .collect();
        BusyLoad { stop, threads }
    }

    /// Threads running.
    pub fn threads(&self) -> usize {
        self.threads.len()
    }
}

impl Drop for BusyLoad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Cores this process may run on.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The warning a benchmark prints when `busy` busy threads plus the VM's own `vm_threads`
/// outnumber the cores, or None.
pub fn oversubscribed(busy: usize, vm_threads: usize) -> Option<String> {
    let cores = cores();
    (busy > 0 && busy + vm_threads > cores).then(|| {
        format!(
            "warning: {busy} busy threads + the VM's {vm_threads} (vCPU, device) outnumber the \
             {cores} cores: loaded figures are a share of an oversubscribed host"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_threads_start_and_stop() {
        let l = BusyLoad::start(2);
        assert_eq!(l.threads(), 2);
        drop(l);
        assert!(oversubscribed(0, 2).is_none());
        assert!(oversubscribed(cores(), 1).is_some());
    }
}
