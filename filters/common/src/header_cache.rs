//! A per-request cache of the request headers in front of a [`Host`]: the first read of a
//! request header fetches the whole map from the proxy in one call; later reads (including
//! lookups of absent headers) are served from memory; writes go to the proxy and update the
//! cached map the way Envoy updates its own (`set` replaces every value, appended at the end;
//! `add` appends; `remove` removes every value). Other maps pass through.
//!
//! Once read, the copy also answers in the response hooks, where Envoy itself refuses to read
//! the request headers (`BadArgument`): the headers as the filters last saw and wrote them.
//!
//! One read of the whole map costs one hostcall and a copy of every header; each single read
//! costs one hostcall. The dispatcher keeps one cache per request (see `dispatch`), so every
//! filter of the request — and every child of the combined module — shares it.

use std::cell::OnceCell;
use std::time::{Duration, SystemTime};

use crate::host::{Body, GrpcCall, Host, HostError, HttpCall, MapKind, MetricKind, SharedError};

/// The request headers of one request, once read.
#[derive(Debug, Default)]
pub struct HeaderCache {
    request: OnceCell<Vec<(String, String)>>,
}

impl HeaderCache {
    /// An empty cache (nothing read yet).
    pub fn new() -> Self {
        HeaderCache::default()
    }

    /// True once the request headers have been read.
    pub fn is_filled(&self) -> bool {
        self.request.get().is_some()
    }
}

/// A [`Host`] that serves request-header reads from a [`HeaderCache`].
pub struct Cached<'a> {
    /// The host behind the cache.
    pub host: &'a mut dyn Host,
    /// The request's cache.
    pub cache: &'a mut HeaderCache,
}

impl Cached<'_> {
    fn request(&self) -> &Vec<(String, String)> {
        self.cache
            .request
            .get_or_init(|| self.host.headers(MapKind::RequestHeaders))
    }
}

impl Host for Cached<'_> {
    fn header(&self, map: MapKind, name: &str) -> Option<String> {
        if map != MapKind::RequestHeaders {
            return self.host.header(map, name);
        }
        self.request()
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    }
    fn headers(&self, map: MapKind) -> Vec<(String, String)> {
        if map != MapKind::RequestHeaders {
            return self.host.headers(map);
        }
        self.request().clone()
    }
    fn set_header(&mut self, map: MapKind, name: &str, value: &str) {
        self.host.set_header(map, name, value);
        if map == MapKind::RequestHeaders {
            if let Some(m) = self.cache.request.get_mut() {
                m.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
                m.push((name.to_ascii_lowercase(), value.to_string()));
            }
        }
    }
    fn add_header(&mut self, map: MapKind, name: &str, value: &str) {
        self.host.add_header(map, name, value);
        if map == MapKind::RequestHeaders {
            if let Some(m) = self.cache.request.get_mut() {
                m.push((name.to_ascii_lowercase(), value.to_string()));
            }
        }
    }
    fn remove_header(&mut self, map: MapKind, name: &str) {
        self.host.remove_header(map, name);
        if map == MapKind::RequestHeaders {
            if let Some(m) = self.cache.request.get_mut() {
                m.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
            }
        }
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
        self.host.http_call(call)
    }
    fn grpc_call(&mut self, call: &GrpcCall<'_>) -> Result<u32, HostError> {
        self.host.grpc_call(call)
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
        self.host.set_tick_period(period)
    }
    fn wake(&mut self, context_id: u32, reason: u32) -> bool {
        self.host.wake(context_id, reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem_host::MemHost;

    #[test]
    fn reads_are_served_from_one_fetch_and_writes_update_it() {
        let mut mem = MemHost::request("GET", "/a?b", &[("x-one", "1"), ("x-two", "2")]);
        let mut cache = HeaderCache::new();
        let mut h = Cached {
            host: &mut mem,
            cache: &mut cache,
        };
        assert_eq!(
            h.header(MapKind::RequestHeaders, "X-One").as_deref(),
            Some("1")
        );
        assert_eq!(h.header(MapKind::RequestHeaders, "x-none"), None);
        assert_eq!(h.path(), "/a?b");
        h.set_header(MapKind::RequestHeaders, "x-one", "one");
        h.add_header(MapKind::RequestHeaders, "x-three", "3");
        h.remove_header(MapKind::RequestHeaders, "x-two");
        h.set_header(MapKind::ResponseHeaders, "x-r", "r");
        assert_eq!(
            h.header(MapKind::RequestHeaders, "x-one").as_deref(),
            Some("one")
        );
        assert_eq!(h.header(MapKind::RequestHeaders, "x-two"), None);
        assert_eq!(
            h.header(MapKind::ResponseHeaders, "x-r").as_deref(),
            Some("r")
        );
        let cached = h.headers(MapKind::RequestHeaders);
        // The cache and the proxy agree, in the same order.
        assert_eq!(cached, mem.headers(MapKind::RequestHeaders));
        assert!(cache.is_filled());
    }

    #[test]
    fn writes_before_the_first_read_reach_the_proxy_and_the_later_fetch() {
        let mut mem = MemHost::request("GET", "/", &[]);
        let mut cache = HeaderCache::new();
        let mut h = Cached {
            host: &mut mem,
            cache: &mut cache,
        };
        h.set_header(MapKind::RequestHeaders, "x-a", "1");
        assert!(!h.cache.is_filled());
        assert_eq!(
            h.header(MapKind::RequestHeaders, "x-a").as_deref(),
            Some("1")
        );
    }
}
