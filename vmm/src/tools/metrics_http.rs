//! `vmm run --metrics-addr ADDR:PORT`: `/metrics` over HTTP (tiny_http) while the VM runs, for
//! a Prometheus scraper. The body is [`super::metrics`]'s rendering of the same statistics
//! snapshot `vmm ctl SOCKET metrics` prints: the Prometheus text format 0.0.4, or OpenMetrics
//! 1.0 when the request's `Accept` header asks for `application/openmetrics-text`. A snapshot
//! answers further scrapes for 250 ms, so a fast scraper cannot slow the guest's conversions.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::api::protocol::{StatsReply, StatsView, VmState, PROTOCOL_VERSION};
use crate::run::{LiveObserver, LiveVm};
use crate::tools::metrics::{render_as, Format, Labels};

/// Longest one statistics snapshot answers scrapes.
const SNAPSHOT_REUSE: Duration = Duration::from_millis(250);

/// Errors of the metrics endpoint.
#[derive(Debug, thiserror::Error)]
pub enum MetricsHttpError {
    /// `--metrics-addr` is not `ADDR:PORT` or `PORT`.
    #[error("--metrics-addr {0:?}: expected PORT (served on 127.0.0.1) or ADDR:PORT, e.g. 127.0.0.1:9464 or [::1]:9464")]
    BadAddress(String),
    /// The address could not be bound (in use, not local, no permission).
    #[error("--metrics-addr {addr}: cannot listen: {reason}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The server thread could not be started.
    #[error("cannot start the metrics server thread: {0}")]
    Thread(std::io::Error),
}

/// Parses `--metrics-addr`: `PORT` alone means loopback (127.0.0.1); any other interface must
/// be named explicitly (`0.0.0.0:9464`).
pub fn parse_addr(text: &str) -> Result<SocketAddr, MetricsHttpError> {
    if let Ok(port) = text.parse::<u16>() {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    text.parse()
        .map_err(|_| MetricsHttpError::BadAddress(text.to_string()))
}

/// A bound, not yet serving, `/metrics` endpoint.
pub struct MetricsServer {
    server: Arc<tiny_http::Server>,
    addr: SocketAddr,
    running: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Listens on `addr` (before the VM boots, so that a bad address is an error up front).
    pub fn bind(addr: SocketAddr) -> Result<Self, MetricsHttpError> {
        let server = tiny_http::Server::http(addr).map_err(|e| MetricsHttpError::Bind {
            addr,
            reason: e.to_string(),
        })?;
        let addr = server.server_addr().to_ip().unwrap_or(addr);
        Ok(MetricsServer {
            server: Arc::new(server),
            addr,
            running: None,
        })
    }

    /// The address it listens on (with the port the kernel chose for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// What one scrape reads: the VM's statistics, as a `stats` reply would carry them.
fn view(vm: &LiveVm) -> StatsView {
    let exits = vm.shared.exit_counts();
    let mut memconv = vm.shared.memconv.stats();
    let vcpu_pauses = vm.shared.control.pause_count();
    memconv.vcpu_pauses = vcpu_pauses;
    let reply = StatsReply {
        protocol: PROTOCOL_VERSION,
        state: if vm.shared.control.stopping() {
            VmState::Ending
        } else if vm.shared.control.is_paused() {
            VmState::Paused
        } else {
            VmState::Running
        },
        uptime_ms: vm.created.elapsed().as_millis() as u64,
        age_ms: 0,
        cpus: vm.cpus,
        exits_total: exits.iter().map(|e| e.total).sum(),
        exits,
        vcpu_pauses,
        snapshot_us: 0,
        memconv,
        disk: vm.shared.disk_stats(),
    };
    // The wire form is what `vmm ctl` renders from: go through it, so both render the same.
    serde_json::to_value(&reply)
        .and_then(serde_json::from_value)
        .unwrap_or_default()
}

/// Which format the request's `Accept` header asks for.
fn wanted_format(request: &tiny_http::Request) -> Format {
    let asks_openmetrics = request.headers().iter().any(|h| {
        h.field.equiv("Accept") && h.value.as_str().contains("application/openmetrics-text")
    });
    if asks_openmetrics {
        Format::OpenMetrics
    } else {
        Format::Prometheus
    }
}

fn respond(request: tiny_http::Request, status: u16, content_type: &str, body: String) {
    let mut response = tiny_http::Response::from_string(body).with_status_code(status);
    if let Ok(h) = tiny_http::Header::from_bytes("Content-Type", content_type) {
        response = response.with_header(h);
    }
    if let Err(e) = request.respond(response) {
        tracing::debug!("metrics: the scraper went away: {e}");
    }
}

/// Serves requests until the server is unblocked.
fn serve(server: &tiny_http::Server, vm: &LiveVm) {
    let labels = Labels::default();
    let mut cached: Option<(Instant, StatsView)> = None;
    for request in server.incoming_requests() {
        let path = request.url().split('?').next().unwrap_or("");
        let get = matches!(
            request.method(),
            tiny_http::Method::Get | tiny_http::Method::Head
        );
        if path != "/metrics" {
            respond(
                request,
                404,
                "text/plain",
                "only /metrics is served here\n".into(),
            );
            continue;
        }
        if !get {
            respond(request, 405, "text/plain", "use GET /metrics\n".into());
            continue;
        }
        if cached
            .as_ref()
            .is_none_or(|(t, _)| t.elapsed() >= SNAPSHOT_REUSE)
        {
            cached = Some((Instant::now(), view(vm)));
        }
        let Some((_, stats)) = cached.as_ref() else {
            continue;
        };
        let format = wanted_format(&request);
        respond(
            request,
            200,
            format.content_type(),
            render_as(stats, &labels, format),
        );
    }
}

impl LiveObserver for MetricsServer {
    fn started(&mut self, vm: LiveVm) {
        let server = Arc::clone(&self.server);
        let spawned = std::thread::Builder::new()
            .name("metrics-http".into())
            .spawn(move || serve(&server, &vm));
        match spawned {
            Ok(handle) => self.running = Some(handle),
            Err(e) => tracing::error!("{}", MetricsHttpError::Thread(e)),
        }
    }

    fn ended(&mut self) {
        if let Some(handle) = self.running.take() {
            self.server.unblock();
            if handle.join().is_err() {
                tracing::error!("the metrics server thread panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_default_to_loopback_and_bad_ones_are_errors() {
        assert_eq!(parse_addr("9464").unwrap().to_string(), "127.0.0.1:9464");
        assert_eq!(parse_addr("0.0.0.0:80").unwrap().to_string(), "0.0.0.0:80");
        assert_eq!(parse_addr("[::1]:9464").unwrap().to_string(), "[::1]:9464");
        for bad in ["", "localhost", "1.2.3:4", "127.0.0.1:99999", "127.0.0.1"] {
            assert!(parse_addr(bad).is_err(), "{bad}");
        }
    }
}
