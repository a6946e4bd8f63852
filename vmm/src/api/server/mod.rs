//! The control-socket server: binding the socket (mode 0600, stale-socket replacement, never
//! stealing a live one), one event-manager subscriber owning the listener, the VM-end eventfd
//! and every connection, and the loop that serves on the VMM's main thread until the VM ends.
//!
//! Robustness: every connection has a bounded input buffer ([`MAX_LINE`](crate::api::protocol::MAX_LINE): a longer line gets
//! `line_too_long` and the connection is closed) and a bounded output buffer
//! ([`MAX_OUTPUT`]: a client that does not read its replies is dropped, as is one whose pending
//! output makes no progress for [`STALL_TIMEOUT`], and one that sends nothing for
//! [`IDLE_TIMEOUT`] gets `idle_timeout` and is closed, so idle connections cannot hold every
//! client slot); at most [`MAX_REQUESTS_PER_TURN`] requests
//! of one client are handled before the others get a turn; garbage gets an error reply; a
//! client that disconnects mid-line is forgotten. None of this reaches the vCPU threads: they
//! never wait for the server (`pause` waits for them, bounded).
//!
//! One module per concern: `socket` (the socket file and [`ServerError`]), `conn` (a
//! connection's buffers), `handler` (a request line to a reply line), `snapshot` (the `stats`
//! snapshot cache) and `event_loop` (the subscriber and [`serve`]).

mod conn;
mod event_loop;
mod handler;
mod snapshot;
mod socket;

pub use conn::{idle_timeout, IDLE_TIMEOUT, IDLE_TIMEOUT_ENV, MAX_OUTPUT, STALL_TIMEOUT};
pub use event_loop::{serve, MAX_CLIENTS, MAX_REQUESTS_PER_TURN};
pub use handler::{VmContext, PAUSE_SETTLE_TIMEOUT};
pub use snapshot::SNAPSHOT_MAX_REUSE;
pub use socket::{ApiSocket, ServerError};
