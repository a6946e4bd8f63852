//! The control socket (`vmm run --api-socket PATH`, `vmm ctl PATH ...`): live conversion and
//! pool statistics, configuration, pause/resume and shutdown of a running VM.
//!
//! Owns everything on both ends of the socket: the wire protocol ([`protocol`]: JSON lines,
//! versioned, typed requests, error codes), the server ([`server`]: an event-manager
//! subscriber serving every client on the VMM's main thread while the vCPU threads run, never
//! blocking them), the `vmm ctl` client ([`client`]) and the Prometheus rendering of the
//! statistics ([`metrics`]). The server only reads what the VM publishes (memconv's snapshot
//! with the guest's latest pool report, the vCPUs' exit counts) and drives the vCPU control
//! (pause/resume) and the VM's end (shutdown). The protocol is documented in README.md
//! ("Control socket").

pub mod bench;
pub mod client;
pub mod metrics;
pub mod protocol;
pub mod server;

pub use client::{ctl, Client, ClientError, CtlCommand, CtlOptions};
pub use protocol::PROTOCOL_VERSION;
pub use server::{serve, ApiSocket, ServerError, VmContext};
