//! vCPU threads, by concern: [`control`] (kicking vCPUs out of KVM_RUN, pause/resume/stop),
//! [`state`] (the run state machine), [`thread`] (the run loop), [`dispatch`] (exits routed
//! through the device bus), [`hypercall`] (KVM_HC_MAP_GPA_RANGE), [`end`] (the end-of-VM
//! rendezvous), [`telemetry`] (exit counts, unknown ports, pool reports) and [`shared`]
//! (what the threads of one VM share, composed of those parts).

pub mod control;
pub mod dispatch;
pub mod end;
pub mod hypercall;
pub mod shared;
pub mod state;
pub mod telemetry;
pub mod thread;

pub use control::{install_kick_handler, VcpuControl, VcpuError};
pub use end::VmEnd;
pub use hypercall::{handle_hypercall, hypercall_return};
pub use shared::VmShared;
pub use state::VcpuState;
pub use telemetry::{ExitCounts, PoolSample, PoolTimeline};
pub use thread::run_vcpu;
