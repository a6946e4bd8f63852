//! vmm: a minimal KVM VMM for confidential-style test VMs. It boots a bare-metal guest in
//! 64-bit mode, runs its vCPUs (natively on kvm_pvm hosts), and routes the guest's
//! private<->shared conversion requests to the `memconv` service.

#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod api;
#[allow(missing_docs)] // Documented by the vcpu/devices engineer (merge).
pub mod boot;
pub mod cli;
pub mod config;
#[allow(missing_docs)] // Documented by the vcpu/devices engineer (merge).
pub mod devices;
pub mod exit_codes;
pub mod fixtures;
#[allow(missing_docs)] // Documented by the vcpu/devices engineer (merge).
pub mod pvm;
#[allow(missing_docs)] // Shared file: its last fields are documented at the merge.
pub mod run;
#[allow(missing_docs)] // Documented by the vcpu/devices engineer (merge).
pub mod serial;
pub mod tools;
#[allow(missing_docs)] // Documented by the vcpu/devices engineer (merge).
pub mod vcpu;
#[allow(missing_docs)] // Documented by the vcpu/devices engineer (merge).
pub mod vm;
