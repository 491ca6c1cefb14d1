//! Named metrics. Envoy shows proxy-wasm metrics under the `wasmcustom.` prefix, so a counter
//! named `tollgate.auth.allowed` appears as `wasmcustom.tollgate.auth.allowed` in `/stats`.

use std::cell::RefCell;

use crate::fast_hash::FastMap;
use crate::host::{Host, MetricKind};

/// Metrics of one filter, defined on first use and cached by name. Share one per VM
/// (through the root) so that each name is defined once.
#[derive(Debug, Default)]
pub struct Metrics {
    prefix: String,
    ids: RefCell<FastMap<String, Option<u32>>>,
    /// Ids of `family` + `member` names, so that a request's counter is never formatted.
    pairs: RefCell<FastMap<(&'static str, &'static str), Option<u32>>>,
}

impl Metrics {
    /// Metrics named `tollgate.<filter>.<name>`.
    pub fn new(filter: &str) -> Self {
        Metrics {
            prefix: format!("tollgate.{filter}."),
            ids: RefCell::new(FastMap::default()),
            pairs: RefCell::new(FastMap::default()),
        }
    }

    /// The full name of a metric.
    pub fn full_name(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn id(&self, host: &mut dyn Host, kind: MetricKind, name: &str) -> Option<u32> {
        if let Some(id) = self.ids.borrow().get(name) {
            return *id;
        }
        let id = host.define_metric(kind, &self.full_name(name)).ok();
        self.ids.borrow_mut().insert(name.to_string(), id);
        id
    }

    /// Add `delta` to a counter.
    pub fn count(&self, host: &mut dyn Host, name: &str, delta: u64) {
        if let Some(id) = self.id(host, MetricKind::Counter, name) {
            host.increment_metric(id, i64::try_from(delta).unwrap_or(i64::MAX));
        }
    }

    /// Add 1 to the counter `<family><member>` (`denied.` + `expired`): the name is built once,
    /// when the counter is first defined; later calls are one host call, no formatting.
    pub fn count_in(&self, host: &mut dyn Host, family: &'static str, member: &'static str) {
        let cached = self.pairs.borrow().get(&(family, member)).copied();
        let id = match cached {
            Some(id) => id,
            None => {
                let name = format!("{}{family}{member}", self.prefix);
                let id = host.define_metric(MetricKind::Counter, &name).ok();
                self.pairs.borrow_mut().insert((family, member), id);
                id
            }
        };
        if let Some(id) = id {
            host.increment_metric(id, 1);
        }
    }

    /// Add to (or, with a negative delta, subtract from) a gauge.
    pub fn gauge_add(&self, host: &mut dyn Host, name: &str, delta: i64) {
        if let Some(id) = self.id(host, MetricKind::Gauge, name) {
            host.increment_metric(id, delta);
        }
    }

    /// Set a gauge.
    pub fn gauge_set(&self, host: &mut dyn Host, name: &str, value: u64) {
        if let Some(id) = self.id(host, MetricKind::Gauge, name) {
            host.record_metric(id, value);
        }
    }

    /// Record a histogram value.
    pub fn record(&self, host: &mut dyn Host, name: &str, value: u64) {
        if let Some(id) = self.id(host, MetricKind::Histogram, name) {
            host.record_metric(id, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem_host::MemHost;

    #[test]
    fn counters_are_defined_once_and_add_up() {
        let m = Metrics::new("auth");
        let mut h = MemHost::new();
        m.count(&mut h, "allowed", 1);
        m.count(&mut h, "allowed", 2);
        m.gauge_set(&mut h, "keys", 7);
        assert_eq!(h.metric("tollgate.auth.allowed"), Some(3));
        assert_eq!(h.metric("tollgate.auth.keys"), Some(7));
        assert_eq!(h.metrics_defined(), 2);
        m.count_in(&mut h, "denied.", "expired");
        m.count_in(&mut h, "denied.", "expired");
        assert_eq!(h.metric("tollgate.auth.denied.expired"), Some(2));
        assert_eq!(h.metrics_defined(), 3);
    }
}
