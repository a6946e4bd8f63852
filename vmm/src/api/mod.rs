//! The control socket (`vmm run --api-socket PATH`, `vmm ctl PATH ...`): live conversion and
//! pool statistics, configuration, pause/resume and shutdown of a running VM.
//!
//! Owns the VMM's end of the socket: the wire protocol ([`protocol`]: JSON lines, versioned,
//! typed requests, error codes) and the server ([`server`]: an event-manager subscriber
//! serving every client on the VMM's main thread while the vCPU threads run, never blocking
//! them). The `vmm ctl` client and the Prometheus rendering are tools built on the protocol
//! ([`crate::tools::ctl`], [`crate::tools::metrics`]). The server only reads what the VM publishes (memconv's snapshot
//! with the guest's latest pool report, the vCPUs' exit counts) and drives the vCPU control
//! (pause/resume) and the VM's end (shutdown). The protocol is documented in README.md
//! ("Control socket").

pub mod protocol;
pub mod server;

pub use protocol::PROTOCOL_VERSION;
pub use server::{serve, ApiSocket, ServerError, VmContext};
