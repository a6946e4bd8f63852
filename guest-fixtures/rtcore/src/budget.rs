//! How long a waiter polls before it halts ([`PollBudget`]): a spin-then-halt budget that
//! follows recent waits, in the manner of KVM's halt polling. A halt costs an exit (~76 us
//! round trip in kvm_pvm native mode) and a wake-up; polling costs a core that a busy host
//! may need for the thread that would end the wait. So: a wait that ended while polling keeps
//! the budget; a wait that halted and still ended soon (within twice the largest budget:
//! polling a little longer would have saved the halt) doubles it; a wait that halted and
//! lasted long (the host was busy or nothing was coming) halves it.

/// An adaptive polling budget in nanoseconds, between a floor and a ceiling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PollBudget {
    ns: u64,
    min_ns: u64,
    max_ns: u64,
}

impl PollBudget {
    /// A budget between `min_ns` and `max_ns` (at least `min_ns`), starting at the ceiling.
    pub const fn new(min_ns: u64, max_ns: u64) -> Self {
        let max_ns = if max_ns < min_ns { min_ns } else { max_ns };
        PollBudget {
            ns: max_ns,
            min_ns,
            max_ns,
        }
    }

    /// How long to poll now.
    pub fn ns(&self) -> u64 {
        self.ns
    }

    /// A wait ended after `waited_ns`; `halted` if it halted before it ended.
    pub fn record(&mut self, waited_ns: u64, halted: bool) {
        if !halted {
            return;
        }
        if waited_ns <= self.max_ns.saturating_mul(2) {
            self.ns = self.ns.saturating_mul(2).clamp(self.min_ns, self.max_ns);
        } else {
            self.ns = (self.ns / 2).clamp(self.min_ns, self.max_ns);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polled_waits_keep_short_halts_grow_long_halts_shrink() {
        let mut b = PollBudget::new(1_000, 200_000);
        assert_eq!(b.ns(), 200_000);
        b.record(5_000, false);
        assert_eq!(b.ns(), 200_000);
        for _ in 0..20 {
            b.record(5_000_000, true);
        }
        assert_eq!(b.ns(), 1_000);
        b.record(100_000, true);
        assert_eq!(b.ns(), 2_000);
        for _ in 0..20 {
            b.record(300_000, true);
        }
        assert_eq!(b.ns(), 200_000);
        assert_eq!(PollBudget::new(10, 5).ns(), 10);
    }
}
