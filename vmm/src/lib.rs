//! vmm: a minimal KVM VMM for confidential-style test VMs. It boots a bare-metal guest in
//! 64-bit mode, runs its vCPUs (natively on kvm_pvm hosts), and routes the guest's
//! private<->shared conversion requests to the `memconv` service.

#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod api;
pub mod boot;
pub mod cli;
pub mod config;
pub mod devices;
pub mod exit_codes;
pub mod fixtures;
pub mod guest_cmdline;
pub mod main_job;
pub mod panic_guard;
pub mod pvm;
pub mod run;
pub mod serial;
pub mod signals;
pub mod tools;
pub mod vcpu;
pub mod vm;
