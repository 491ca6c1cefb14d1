//! A child filter behind trait objects ([`Part`] for its root), and the [`ChildHost`] each child's
//! code talks to: the real host, except that the child's callouts are recorded as its own, its
//! wakes carry its index, and its tick period (asked for by its root or by one of its requests)
//! is recorded in the chain's [`Ticks`], which asks the proxy for the greatest common divisor.

use std::cell::Cell;
use std::time::{Duration, SystemTime};
use tollgate_common::fast_hash::FastMap;

use tollgate_common::{
    Body, CallResponse, ConfigError, GrpcCall, GrpcResponse, HeaderReads, Host, HostError,
    HttpCall, HttpFilter, MapKind, MetricKind, RootFilter, SharedError,
};

/// Where a child's index goes in a wake reason: the top bits. A child's own reasons must be
/// below `1 << REASON_BITS` (ours are small constants and call indexes).
pub const REASON_BITS: u32 = 28;

/// Most children a chain can have (four filters today).
pub const MAX_CHILDREN: usize = 1 << (32 - REASON_BITS);

/// The reason the chain's `on_wake` gets for child `child`'s wake with `reason`; `None` when
/// `reason` does not fit.
pub fn pack(child: usize, reason: u32) -> Option<u32> {
    let child = u32::try_from(child).ok()?;
    (child < (1 << (32 - REASON_BITS)) && reason < (1 << REASON_BITS))
        .then_some((child << REASON_BITS) | reason)
}

/// The child and its own reason, from a packed reason.
pub fn unpack(packed: u32) -> (usize, u32) {
    (
        (packed >> REASON_BITS) as usize,
        packed & ((1 << REASON_BITS) - 1),
    )
}

/// A child filter's root, object-safe.
pub trait Part {
    /// Parse and compile the child's configuration section.
    fn configure(&mut self, host: &mut dyn Host, configuration: &[u8]) -> Result<(), ConfigError>;
    /// The child's periodic work.
    fn on_tick(&mut self, host: &mut dyn Host);
    /// An HTTP callout of the child's root answered.
    fn on_call_response(&mut self, host: &mut dyn Host, token: u32, response: CallResponse);
    /// A gRPC callout of the child's root answered.
    fn on_grpc_response(&mut self, host: &mut dyn Host, token: u32, response: GrpcResponse);
    /// The child's filter for a new request.
    fn create_filter(&self, context_id: u32) -> Box<dyn HttpFilter>;
    /// The request headers the child's filters read.
    fn request_header_reads(&self) -> HeaderReads;
}

impl<R: RootFilter> Part for R {
    fn configure(&mut self, host: &mut dyn Host, configuration: &[u8]) -> Result<(), ConfigError> {
        RootFilter::configure(self, host, configuration)
    }
    fn on_tick(&mut self, host: &mut dyn Host) {
        RootFilter::on_tick(self, host)
    }
    fn on_call_response(&mut self, host: &mut dyn Host, token: u32, response: CallResponse) {
        RootFilter::on_call_response(self, host, token, response)
    }
    fn on_grpc_response(&mut self, host: &mut dyn Host, token: u32, response: GrpcResponse) {
        RootFilter::on_grpc_response(self, host, token, response)
    }
    fn create_filter(&self, context_id: u32) -> Box<dyn HttpFilter> {
        Box::new(RootFilter::create_filter(self, context_id))
    }
    fn request_header_reads(&self) -> HeaderReads {
        RootFilter::request_header_reads(self)
    }
}

/// The children's tick periods, shared by the chain's root and its requests (a request may ask
/// for its filter's root to tick, as in Envoy, where the timer belongs to the root whichever
/// context asks), and the VM's period as last asked of the proxy.
#[derive(Debug, Default)]
pub struct Ticks {
    periods: [Cell<Duration>; MAX_CHILDREN],
    vm: Cell<Duration>,
}

impl Ticks {
    /// Child `child`'s period (zero: it asked for none).
    pub fn get(&self, child: usize) -> Duration {
        self.periods.get(child).map_or(Duration::ZERO, Cell::get)
    }

    /// Record child `child`'s period.
    pub fn set(&self, child: usize, period: Duration) {
        if let Some(c) = self.periods.get(child) {
            c.set(period);
        }
    }

    /// Take every child's period from `other` (a configuration that was accepted).
    pub fn copy_from(&self, other: &Ticks) {
        for (mine, theirs) in self.periods.iter().zip(&other.periods) {
            mine.set(theirs.get());
        }
    }

    /// The VM's period: the greatest common divisor of the children's, in milliseconds.
    pub fn vm_period(&self) -> Duration {
        self.vm.get()
    }

    /// Ask the proxy for the greatest common divisor of the children's periods when it changed.
    pub fn apply(&self, host: &mut dyn Host) {
        let g = self
            .periods
            .iter()
            .map(|p| u64::try_from(p.get().as_millis()).unwrap_or(u64::MAX))
            .filter(|ms| *ms > 0)
            .fold(0, gcd);
        let period = Duration::from_millis(g);
        if period != self.vm.get() {
            self.vm.set(period);
            host.set_tick_period(period);
        }
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Callout tokens of one context (the root, or one request) -> the child that started them.
#[derive(Debug, Default)]
pub struct Owners {
    /// HTTP callouts.
    pub http: FastMap<u32, usize>,
    /// gRPC callouts.
    pub grpc: FastMap<u32, usize>,
}

/// The host child `child` talks to.
pub struct ChildHost<'a> {
    /// The host behind (the dispatcher's, for the whole module).
    pub host: &'a mut dyn Host,
    /// The child's index in the chain.
    pub child: usize,
    /// Where the child's callouts are recorded.
    pub owners: &'a mut Owners,
    /// Where the child's tick period is recorded.
    pub ticks: &'a Ticks,
    /// Ask the proxy for the VM's new period at once (false while a configuration is being
    /// read: it is applied only when the whole configuration is accepted).
    pub apply_ticks: bool,
}

impl Host for ChildHost<'_> {
    fn header(&self, map: MapKind, name: &str) -> Option<String> {
        self.host.header(map, name)
    }
    fn headers(&self, map: MapKind) -> Vec<(String, String)> {
        self.host.headers(map)
    }
    fn set_header(&mut self, map: MapKind, name: &str, value: &str) {
        self.host.set_header(map, name, value)
    }
    fn add_header(&mut self, map: MapKind, name: &str, value: &str) {
        self.host.add_header(map, name, value)
    }
    fn remove_header(&mut self, map: MapKind, name: &str) {
        self.host.remove_header(map, name)
    }
    fn body(&self, which: Body, start: usize, max: usize) -> Option<Vec<u8>> {
        self.host.body(which, start, max)
    }
    fn set_body(&mut self, which: Body, start: usize, size: usize, data: &[u8]) {
        self.host.set_body(which, start, size, data)
    }
    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        self.host.property(path)
    }
    fn shared_get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, HostError> {
        self.host.shared_get(key)
    }
    fn shared_set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SharedError> {
        self.host.shared_set(key, value, cas)
    }
    fn http_call(&mut self, call: &HttpCall<'_>) -> Result<u32, HostError> {
        let token = self.host.http_call(call)?;
        self.owners.http.insert(token, self.child);
        Ok(token)
    }
    fn grpc_call(&mut self, call: &GrpcCall<'_>) -> Result<u32, HostError> {
        let token = self.host.grpc_call(call)?;
        self.owners.grpc.insert(token, self.child);
        Ok(token)
    }
    fn now(&self) -> SystemTime {
        self.host.now()
    }
    fn define_metric(&mut self, kind: MetricKind, name: &str) -> Result<u32, HostError> {
        self.host.define_metric(kind, name)
    }
    fn increment_metric(&mut self, id: u32, delta: i64) {
        self.host.increment_metric(id, delta)
    }
    fn record_metric(&mut self, id: u32, value: u64) {
        self.host.record_metric(id, value)
    }
    fn set_tick_period(&mut self, period: Duration) {
        self.ticks.set(self.child, period);
        if self.apply_ticks {
            self.ticks.apply(self.host);
        }
    }
    fn wake(&mut self, context_id: u32, reason: u32) -> bool {
        match pack(self.child, reason) {
            Some(packed) => self.host.wake(context_id, packed),
            None => {
                log::warn!(
                    "child {}: wake reason {reason} does not fit in {REASON_BITS} bits: not delivered",
                    self.child
                );
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_carry_the_child() {
        for child in 0..MAX_CHILDREN {
            for reason in [0, 1, 7, (1 << REASON_BITS) - 1] {
                assert_eq!(unpack(pack(child, reason).unwrap()), (child, reason));
            }
        }
        assert_eq!(pack(0, 1 << REASON_BITS), None);
        assert_eq!(pack(MAX_CHILDREN, 1), None);
    }

    #[test]
    fn gcd_of_periods() {
        assert_eq!([50, 10, 50].into_iter().fold(0, gcd), 10);
        assert_eq!([50].into_iter().fold(0, gcd), 50);
        assert_eq!([30, 50].into_iter().fold(0, gcd), 10);
        assert_eq!(std::iter::empty::<u64>().fold(0, gcd), 0);
    }
}
