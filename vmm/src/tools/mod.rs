//! Tooling built on the VMM core, apart from it: the conformance suite ([`conform`]), the
//! benchmarks ([`bench`]), the `vmm ctl` control-socket client ([`ctl`]) and the Prometheus
//! rendering of the control socket's statistics ([`metrics`]), served over HTTP by
//! `vmm run --metrics-addr` ([`metrics_http`], a [`crate::run::LiveObserver`]), and Linux
//! DMA-trace replay ([`replay`]). Nothing in the core
//! (run, api, vcpu, devices...) depends on this module.

pub mod bench;
pub mod conform;
pub mod ctl;
pub mod metrics;
pub mod metrics_http;
pub mod replay;
