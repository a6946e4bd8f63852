//! The vCPU run state as a state machine: the states a vCPU thread is in as the pauser and the
//! end-of-VM check see them ([`VcpuState`]), the transitions between them ([`Transition`]),
//! and [`StateCell`], the one place that changes a vCPU's state (an atomic, so other threads
//! read it without locks).

use std::sync::atomic::{AtomicU8, Ordering};

/// Where a vCPU thread is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum VcpuState {
    /// In KVM_RUN, or about to enter it (announced before the pause flag is checked).
    Running = 0,
    /// Not started yet, or handling an exit.
    Outside = 1,
    /// Parked while vCPUs are paused.
    Parked = 2,
    /// Executed HLT; waits for the VM to end.
    Halted = 3,
    /// The thread left its loop.
    Done = 4,
}

/// A change of a vCPU's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    /// Outside or Parked -> Running: about to enter KVM_RUN.
    Enter,
    /// Running -> Parked: the vCPU saw the pause flag.
    Park,
    /// Running -> Outside: KVM_RUN returned.
    Exit,
    /// Outside -> Halted: the exit was HLT.
    Halt,
    /// Any -> Done: the thread leaves its loop.
    Finish,
}

impl VcpuState {
    /// The state after `t`, or None if `t` is not allowed from this state.
    pub fn after(self, t: Transition) -> Option<VcpuState> {
        use VcpuState::*;
        match (self, t) {
            (Outside | Parked, Transition::Enter) => Some(Running),
            (Running, Transition::Park) => Some(Parked),
            (Running, Transition::Exit) => Some(Outside),
            (Outside, Transition::Halt) => Some(Halted),
            (_, Transition::Finish) => Some(Done),
            _ => None,
        }
    }

    fn from_u8(v: u8) -> VcpuState {
        match v {
            0 => VcpuState::Running,
            1 => VcpuState::Outside,
            2 => VcpuState::Parked,
            3 => VcpuState::Halted,
            _ => VcpuState::Done,
        }
    }

    /// Whether the vCPU runs no guest code and handles no exit.
    pub fn is_quiescent(self) -> bool {
        matches!(
            self,
            VcpuState::Parked | VcpuState::Halted | VcpuState::Done
        )
    }

    /// Whether the vCPU will never run guest code again on its own.
    pub fn is_halted_or_done(self) -> bool {
        matches!(self, VcpuState::Halted | VcpuState::Done)
    }
}

/// One vCPU's state, readable from any thread, changed only by its own thread through
/// [`StateCell::apply`] (SeqCst, which the pause handshake relies on).
#[derive(Debug)]
pub struct StateCell(AtomicU8);

impl Default for StateCell {
    fn default() -> Self {
        StateCell(AtomicU8::new(VcpuState::Outside as u8))
    }
}

impl StateCell {
    /// The current state.
    pub fn get(&self) -> VcpuState {
        VcpuState::from_u8(self.0.load(Ordering::SeqCst))
    }

    /// Applies `t`; an illegal transition leaves the state unchanged (and is a bug, reported).
    pub fn apply(&self, t: Transition) -> VcpuState {
        let now = self.get();
        match now.after(t) {
            Some(next) => {
                self.0.store(next as u8, Ordering::SeqCst);
                next
            }
            None => {
                tracing::error!("vCPU state machine: {t:?} is not allowed from {now:?}");
                debug_assert!(false, "illegal vCPU transition {t:?} from {now:?}");
                now
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_run_loop_cycle_is_legal_and_nothing_else_is() {
        let c = StateCell::default();
        assert_eq!(c.get(), VcpuState::Outside);
        assert_eq!(c.apply(Transition::Enter), VcpuState::Running);
        assert_eq!(c.apply(Transition::Park), VcpuState::Parked);
        assert_eq!(c.apply(Transition::Enter), VcpuState::Running);
        assert_eq!(c.apply(Transition::Exit), VcpuState::Outside);
        assert_eq!(c.apply(Transition::Halt), VcpuState::Halted);
        assert!(c.get().is_quiescent() && c.get().is_halted_or_done());
        assert_eq!(c.apply(Transition::Finish), VcpuState::Done);
        assert_eq!(VcpuState::Halted.after(Transition::Enter), None);
        assert_eq!(VcpuState::Running.after(Transition::Halt), None);
        assert_eq!(VcpuState::Outside.after(Transition::Exit), None);
        assert!(!VcpuState::Outside.is_quiescent());
    }
}
