//! `tollgate-probe`: the smallest Tollgate filter. With `{}` it passes traffic and does nothing
//! else (the floor of the wasm runtime in benchmarks). With `wait_ms` it pauses each request until
//! the root wakes it from `on_tick`, optionally makes a callout from the woken request, and
//! passes the callout's status upstream as `x-probe-call-status` — which is how the integration
//! tests check the dispatcher's wake and callout forwarding on a real Envoy. With
//! `panic_on_request` it panics on purpose, to show the panic hook's critical log line.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use tollgate_common::{
    CallResponse, ConfigError, Decision, Host, HttpCall, HttpFilter, MapKind, RootFilter,
};

/// Configuration.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Hold each request this long, then let the root wake it (0: pass through at once).
    #[serde(default)]
    pub wait_ms: u64,
    /// When woken, call this cluster's `/healthz` before continuing.
    #[serde(default)]
    pub call_cluster: Option<String>,
    /// Read the request's `:path` in the response hook and echo what it got (or
    /// `unavailable`) as `x-probe-request-path`: Envoy refuses that read, which must not crash.
    #[serde(default)]
    pub read_request_in_response: bool,
    /// Panic in the request hook, on purpose: the tests check that the panic hook logs the
    /// panic at critical level before the VM dies. Never set it anywhere else.
    #[serde(default)]
    pub panic_on_request: bool,
    /// Benchmarks only (the cost of one host call in the proxy, `make bench`'s `hostcall-cost`):
    /// host calls made on every request, by kind.
    #[serde(default)]
    pub calls: CallCounts,
}

/// Host calls the probe makes on every request (all zero by default).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallCounts {
    /// Increments of one counter (request hook).
    #[serde(default)]
    pub metric_increments: u32,
    /// Reads of the `request.path` property, which the request's cache does not keep (request hook).
    #[serde(default)]
    pub property_reads: u32,
    /// Reads of one shared-data key (request hook).
    #[serde(default)]
    pub shared_reads: u32,
    /// Response headers added (`x-probe-<i>`, response hook).
    #[serde(default)]
    pub response_header_adds: u32,
    /// Request headers added (`x-probe-<i>`, request hook). Envoy clears the route cache on every
    /// request-header write, so each one also costs the router a new route match.
    #[serde(default)]
    pub request_header_adds: u32,
    /// Read the request's header map (one hostcall: the request's cache keeps it; request hook).
    #[serde(default)]
    pub request_map_read: bool,
    /// Writes of the shared-data key (request hook).
    #[serde(default)]
    pub shared_writes: u32,
    /// Read the clock (once: the entry's cache keeps it; request hook).
    #[serde(default)]
    pub clock_read: bool,
}

#[derive(Default)]
struct Waiting {
    list: Vec<(u32, SystemTime)>,
}

/// Root: keeps the waiting requests and wakes them on ticks.
pub struct ProbeRoot {
    config: Rc<Config>,
    /// The counter `calls.metric_increments` increments.
    metric: Option<u32>,
    waiting: Rc<RefCell<Waiting>>,
}

impl RootFilter for ProbeRoot {
    type Filter = ProbeFilter;
    const NAME: &'static str = "probe";

    fn new(_context_id: u32) -> Self {
        ProbeRoot {
            config: Rc::default(),
            metric: None,
            waiting: Rc::default(),
        }
    }

    fn configure(&mut self, host: &mut dyn Host, configuration: &[u8]) -> Result<(), ConfigError> {
        let config: Config = tollgate_common::config::parse(configuration)?;
        if config.wait_ms > 0 {
            host.set_tick_period(Duration::from_millis(10));
        }
        if config.calls.metric_increments > 0 {
            self.metric = host
                .define_metric(tollgate_common::MetricKind::Counter, "tollgate.probe.calls")
                .ok();
        }
        if config.calls.shared_reads > 0 {
            // Absent keys answer without a copy; the benchmark reads a present one.
            let _ = host.shared_set(PROBE_KEY, b"probe", None);
        }
        self.config = Rc::new(config);
        Ok(())
    }

    fn on_tick(&mut self, host: &mut dyn Host) {
        let now = host.now();
        let due: Vec<u32> = {
            let mut w = self.waiting.borrow_mut();
            let (due, keep): (Vec<_>, Vec<_>) = w.list.drain(..).partition(|(_, at)| *at <= now);
            w.list = keep;
            due.into_iter().map(|(id, _)| id).collect()
        };
        for id in due {
            if !host.wake(id, 1) {
                log::debug!("probe: request {id} was gone before its wake");
            }
        }
    }

    fn create_filter(&self, context_id: u32) -> ProbeFilter {
        ProbeFilter {
            context_id,
            config: self.config.clone(),
            waiting: self.waiting.clone(),
            token: None,
            metric: self.metric,
        }
    }
}

/// Per-request state.
pub struct ProbeFilter {
    context_id: u32,
    config: Rc<Config>,
    waiting: Rc<RefCell<Waiting>>,
    token: Option<u32>,
    metric: Option<u32>,
}

/// The shared-data key `calls.shared_reads` reads.
const PROBE_KEY: &str = "tollgate.probe.key";

/// Adds `x-probe-0` .. `x-probe-<n-1>` (value `1`) to `map`: one host call each.
fn add_probe_headers(host: &mut dyn Host, map: MapKind, n: u32) {
    for i in 0..n {
        let mut name = String::from("x-probe-");
        tollgate_common::decimal::push_u64(&mut name, u64::from(i));
        host.add_header(map, &name, "1");
    }
}

impl ProbeFilter {
    /// The request hook's share of `calls`.
    fn request_calls(&self, host: &mut dyn Host) {
        let calls = &self.config.calls;
        if let Some(id) = self.metric {
            for _ in 0..calls.metric_increments {
                host.increment_metric(id, 1);
            }
        }
        for _ in 0..calls.property_reads {
            let _ = host.property(&["request", "path"]);
        }
        for _ in 0..calls.shared_reads {
            let _ = host.shared_get(PROBE_KEY);
        }
        for _ in 0..calls.shared_writes {
            let _ = host.shared_set(PROBE_KEY, b"probe", None);
        }
        if calls.request_map_read {
            let _ = host.header(MapKind::RequestHeaders, ":path");
        }
        if calls.clock_read {
            let _ = host.now();
        }
        add_probe_headers(host, MapKind::RequestHeaders, calls.request_header_adds);
    }
}

impl HttpFilter for ProbeFilter {
    fn on_request_headers(&mut self, host: &mut dyn Host, _end_of_stream: bool) -> Decision {
        // Panics, on purpose, when `panic_on_request` is set.
        assert!(
            !self.config.panic_on_request,
            "probe: a panic on purpose (panic_on_request)"
        );
        self.request_calls(host);
        if self.config.wait_ms == 0 {
            return Decision::Continue;
        }
        let at = host.now() + Duration::from_millis(self.config.wait_ms);
        self.waiting.borrow_mut().list.push((self.context_id, at));
        Decision::Pause
    }

    fn on_response_headers(&mut self, host: &mut dyn Host, _end_of_stream: bool) -> Decision {
        if self.config.read_request_in_response {
            let path = host.header(MapKind::RequestHeaders, ":path");
            let shown = path.as_deref().unwrap_or("unavailable");
            host.set_header(MapKind::ResponseHeaders, "x-probe-request-path", shown);
        }
        add_probe_headers(
            host,
            MapKind::ResponseHeaders,
            self.config.calls.response_header_adds,
        );
        Decision::Continue
    }

    fn on_wake(&mut self, host: &mut dyn Host, _reason: u32) -> Decision {
        host.set_header(MapKind::RequestHeaders, "x-probe-woken", "1");
        let Some(cluster) = self.config.call_cluster.as_deref() else {
            return Decision::Continue;
        };
        let call = HttpCall {
            cluster,
            headers: vec![
                (":method", "GET"),
                (":path", "/healthz"),
                (":authority", cluster),
            ],
            body: None,
            timeout: Duration::from_secs(10),
        };
        match host.http_call(&call) {
            Ok(token) => {
                self.token = Some(token);
                Decision::Pause
            }
            Err(e) => {
                host.set_header(
                    MapKind::RequestHeaders,
                    "x-probe-call-status",
                    &format!("error: {e}"),
                );
                Decision::Continue
            }
        }
    }

    fn on_call_response(
        &mut self,
        host: &mut dyn Host,
        token: u32,
        response: CallResponse,
    ) -> Decision {
        if self.token != Some(token) {
            return Decision::Pause;
        }
        let status = response
            .status()
            .map(|s| s.to_string())
            .unwrap_or_else(|| "failed".into());
        host.set_header(MapKind::RequestHeaders, "x-probe-call-status", &status);
        Decision::Continue
    }
}

tollgate_common::export_filter!(ProbeRoot);

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_common::testing::Driver;

    #[test]
    fn waits_until_woken_then_calls_and_continues() {
        let mut d =
            Driver::<ProbeRoot>::new(r#"{"wait_ms": 50, "call_cluster": "users"}"#).unwrap();
        let id = d.request("GET", "/x", &[]);
        assert_eq!(d.request_headers(id, true), Decision::Pause);
        d.tick();
        assert!(d.woken().is_empty(), "not due yet");
        d.advance(Duration::from_millis(60));
        d.tick();
        assert_eq!(d.woken(), vec![(id, 1)]);
        assert_eq!(d.wake_decision(id, 1), Some(Decision::Pause));
        let token = d.calls()[0].token;
        let ok = CallResponse {
            headers: vec![(":status".into(), "200".into())],
            body: vec![],
        };
        assert_eq!(d.answer(token, ok), Decision::Continue);
        assert_eq!(
            d.header(id, MapKind::RequestHeaders, "x-probe-call-status")
                .as_deref(),
            Some("200")
        );
    }

    #[test]
    fn empty_configuration_passes_through() {
        let mut d = Driver::<ProbeRoot>::new("").unwrap();
        let id = d.request("GET", "/", &[]);
        assert_eq!(d.request_headers(id, true), Decision::Continue);
        assert!(Driver::<ProbeRoot>::new(r#"{"wait": 1}"#).is_err());
    }

    #[test]
    fn makes_the_host_calls_it_is_told_to() {
        let config = r#"{"calls": {"metric_increments": 3, "property_reads": 2,
            "shared_reads": 2, "response_header_adds": 2}}"#;
        let mut d = Driver::<ProbeRoot>::new(config).unwrap();
        let id = d.request("GET", "/", &[]);
        assert_eq!(d.request_headers(id, true), Decision::Continue);
        assert_eq!(d.metric("tollgate.probe.calls"), Some(3));
        assert_eq!(
            d.response_headers(id, &[(":status", "200")], true),
            Decision::Continue
        );
        assert_eq!(
            d.header(id, MapKind::ResponseHeaders, "x-probe-1")
                .as_deref(),
            Some("1")
        );
        assert_eq!(d.header(id, MapKind::ResponseHeaders, "x-probe-2"), None);
        assert_eq!(d.header(id, MapKind::RequestHeaders, "x-probe-0"), None);
    }

    #[test]
    fn adds_the_request_headers_it_is_told_to() {
        let config = r#"{"calls": {"request_header_adds": 3}}"#;
        let mut d = Driver::<ProbeRoot>::new(config).unwrap();
        let id = d.request("GET", "/", &[]);
        assert_eq!(d.request_headers(id, true), Decision::Continue);
        for i in 0..3 {
            let name = format!("x-probe-{i}");
            assert_eq!(
                d.header(id, MapKind::RequestHeaders, &name).as_deref(),
                Some("1"),
                "{name}"
            );
        }
        assert_eq!(d.header(id, MapKind::RequestHeaders, "x-probe-3"), None);
        // in the request hook only: the response gets none
        assert_eq!(
            d.response_headers(id, &[(":status", "200")], true),
            Decision::Continue
        );
        assert_eq!(d.header(id, MapKind::ResponseHeaders, "x-probe-0"), None);
    }
}
