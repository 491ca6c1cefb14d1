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
//!
//! **Few known headers: value by value.** When the module's filters declared that they read
//! only a few request headers (at most [`SINGLE_READS_MAX`]; [`crate::HeaderReads`], asked of
//! the root after each configuration), those are read one value at a time
//! (`proxy_get_header_map_value`, the first value, as a read from the map gives), each once per
//! request, absent ones included; a read of any other header fetches the whole map, which then
//! answers every read. A write drops the written header's remembered value.
//!
//! Besides the headers, the cache saves the hostcalls that would change nothing or repeat an
//! answer the module already has:
//! - **Writes that change nothing.** Once the map is read, removing a request header that is
//!   absent, or setting one to the single value it already has, makes no hostcall.
//! - **The response headers, once per entry.** In a response hook the first read of a response
//!   header fetches the whole map (one hostcall), like the request headers; the copy lives for
//!   the entry only (the next hook reads the map again).
//! - **The clock, once per entry.** [`Cached`] lives for one entry of the proxy into the
//!   module (a hook, a callout answer, a wake); the first `now()` of the entry asks the proxy
//!   and later ones (the other filters of the combined module, a filter asking twice) get the
//!   same instant. A request that waits (a callout, a wake) reads the clock again in its next
//!   entry.
//! - **Properties of the connection and the route, once per request.** `source.*`,
//!   `destination.*`, `connection.*` and `xds.route_name` do not change during a request;
//!   the first read of each asks the proxy, later ones (another filter, another hook) are
//!   served from the cache. Any other property is read from the proxy each time.

use std::cell::{OnceCell, RefCell};
use std::rc::Rc;
use std::time::{Duration, SystemTime};

use crate::filter::HeaderReads;
use crate::host::{Body, GrpcCall, Host, HostError, HttpCall, MapKind, MetricKind, SharedError};

/// The request headers to read value by value for a module that declared `reads`: `Some` when
/// they are at most [`SINGLE_READS_MAX`] (none at all included), else `None` (the map).
pub fn singles(reads: HeaderReads) -> Option<Rc<[String]>> {
    match reads {
        HeaderReads::Only(names) if names.len() <= SINGLE_READS_MAX => Some(names.into()),
        _ => None,
    }
}

/// At most this many declared request headers are read value by value; more, and the first read
/// fetches the whole map. In Envoy 1.40 (callgrind, the benchmarks' request of 8 headers) one
/// value costs about 9.5k instructions and the map about 17.7k (each call that returns data
/// enters the VM again to allocate the copy): two values would cost more than the map.
pub const SINGLE_READS_MAX: usize = 1;

/// The request headers of one request, once read.
#[derive(Debug, Default)]
pub struct HeaderCache {
    request: OnceCell<Vec<(String, String)>>,
    /// The request headers read value by value (lower case), when the module declared few
    /// enough; `None`: the first read fetches the map.
    singles: Option<Rc<[String]>>,
    /// Those read so far, before any read of the map (`None`: absent).
    values: RefCell<Vec<(String, Option<String>)>>,
    /// Properties that hold for the whole request (see [`stable_property`]), as read.
    properties: RefCell<Vec<KnownProperty>>,
}

/// A property's path and value (`None`: absent), as read.
type KnownProperty = (Vec<String>, Option<Vec<u8>>);

/// True for a property that cannot change during a request: the connection's and the peer's
/// addresses and the route's name.
pub fn stable_property(path: &[&str]) -> bool {
    match path {
        [first, ..] if matches!(*first, "source" | "destination" | "connection") => true,
        ["xds", "route_name"] => true,
        _ => false,
    }
}

impl HeaderCache {
    /// An empty cache (nothing read yet).
    pub fn new() -> Self {
        HeaderCache::default()
    }

    /// An empty cache that reads `singles` value by value (see [`singles`]).
    pub fn with_singles(singles: Option<Rc<[String]>>) -> Self {
        HeaderCache {
            singles,
            ..HeaderCache::default()
        }
    }

    /// True once the request headers have been read.
    pub fn is_filled(&self) -> bool {
        self.request.get().is_some()
    }
}

/// A [`Host`] that serves request-header reads and stable properties from a request's
/// [`HeaderCache`], and the clock and response-header reads once per entry. Build one per entry
/// ([`Cached::new`]).
pub struct Cached<'a> {
    /// The host behind the cache.
    pub host: &'a mut dyn Host,
    /// The request's cache.
    pub cache: &'a mut HeaderCache,
    /// The proxy's clock, read at most once in this entry.
    now: OnceCell<SystemTime>,
    /// The response headers, read at most once in this entry.
    response: OnceCell<Vec<(String, String)>>,
}

impl<'a> Cached<'a> {
    /// The cache of one entry of a request.
    pub fn new(host: &'a mut dyn Host, cache: &'a mut HeaderCache) -> Self {
        Cached {
            host,
            cache,
            now: OnceCell::new(),
            response: OnceCell::new(),
        }
    }

    /// The cell of a map this cache keeps (request or response headers).
    fn cell(&self, map: MapKind) -> Option<&OnceCell<Vec<(String, String)>>> {
        match map {
            MapKind::RequestHeaders => Some(&self.cache.request),
            MapKind::ResponseHeaders => Some(&self.response),
            _ => None,
        }
    }

    fn cell_mut(&mut self, map: MapKind) -> Option<&mut OnceCell<Vec<(String, String)>>> {
        match map {
            MapKind::RequestHeaders => Some(&mut self.cache.request),
            MapKind::ResponseHeaders => Some(&mut self.response),
            _ => None,
        }
    }

    /// A kept map, read from the proxy the first time.
    fn map(&self, map: MapKind) -> Option<&Vec<(String, String)>> {
        self.cell(map)
            .map(|c| c.get_or_init(|| self.host.headers(map)))
    }

    /// A declared request header, read value by value while the map is not read: from what
    /// this request read before, else one hostcall. `None`: not read this way.
    fn single(&self, name: &str) -> Option<Option<String>> {
        if self.cache.is_filled() {
            return None;
        }
        let declared = self.cache.singles.as_ref()?;
        if !declared.iter().any(|d| d.eq_ignore_ascii_case(name)) {
            return None;
        }
        if let Ok(known) = self.cache.values.try_borrow() {
            if let Some((_, v)) = known.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)) {
                return Some(v.clone());
            }
        }
        let v = self.host.header(MapKind::RequestHeaders, name);
        if let Ok(mut known) = self.cache.values.try_borrow_mut() {
            known.push((name.to_string(), v.clone()));
        }
        Some(v)
    }

    /// A request header was written: forget the value read value by value.
    fn wrote(&mut self, map: MapKind, name: &str) {
        if map == MapKind::RequestHeaders {
            self.cache
                .values
                .get_mut()
                .retain(|(k, _)| !k.eq_ignore_ascii_case(name));
        }
    }

    /// The values of a header of a kept map, when the map has been read.
    fn known_values<'m>(
        &'m self,
        map: MapKind,
        name: &'m str,
    ) -> Option<impl Iterator<Item = &'m str> + 'm> {
        let m = self.cell(map)?.get()?;
        Some(
            m.iter()
                .filter(move |(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str()),
        )
    }
}

impl Host for Cached<'_> {
    fn header(&self, map: MapKind, name: &str) -> Option<String> {
        if map == MapKind::RequestHeaders {
            if let Some(v) = self.single(name) {
                return v;
            }
        }
        match self.map(map) {
            Some(m) => m
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone()),
            None => self.host.header(map, name),
        }
    }
    fn headers(&self, map: MapKind) -> Vec<(String, String)> {
        match self.map(map) {
            Some(m) => m.clone(),
            None => self.host.headers(map),
        }
    }
    fn set_header(&mut self, map: MapKind, name: &str, value: &str) {
        // Already this one value: nothing to do. (A value read lossily, with U+FFFD for bytes
        // that were not UTF-8, is never taken as equal.)
        if let Some(mut values) = self.known_values(map, name) {
            if values.next() == Some(value)
                && values.next().is_none()
                && !value.contains(char::REPLACEMENT_CHARACTER)
            {
                return;
            }
        }
        self.host.set_header(map, name, value);
        self.wrote(map, name);
        if let Some(m) = self.cell_mut(map).and_then(OnceCell::get_mut) {
            m.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
            m.push((name.to_ascii_lowercase(), value.to_string()));
        }
    }
    fn add_header(&mut self, map: MapKind, name: &str, value: &str) {
        self.host.add_header(map, name, value);
        self.wrote(map, name);
        if let Some(m) = self.cell_mut(map).and_then(OnceCell::get_mut) {
            m.push((name.to_ascii_lowercase(), value.to_string()));
        }
    }
    fn remove_header(&mut self, map: MapKind, name: &str) {
        if self
            .known_values(map, name)
            .is_some_and(|mut values| values.next().is_none())
        {
            // Known to be absent: nothing to remove.
            return;
        }
        self.host.remove_header(map, name);
        self.wrote(map, name);
        if let Some(m) = self.cell_mut(map).and_then(OnceCell::get_mut) {
            m.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
        }
    }
    fn body(&self, which: Body, start: usize, max: usize) -> Option<Vec<u8>> {
        self.host.body(which, start, max)
    }
    fn set_body(&mut self, which: Body, start: usize, size: usize, data: &[u8]) {
        self.host.set_body(which, start, size, data)
    }
    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        if !stable_property(path) {
            return self.host.property(path);
        }
        let same =
            |p: &Vec<String>| p.len() == path.len() && p.iter().zip(path).all(|(a, b)| a == b);
        if let Ok(known) = self.cache.properties.try_borrow() {
            if let Some((_, v)) = known.iter().find(|(p, _)| same(p)) {
                return v.clone();
            }
        }
        let v = self.host.property(path);
        if let Ok(mut known) = self.cache.properties.try_borrow_mut() {
            known.push((path.iter().map(|p| (*p).to_string()).collect(), v.clone()));
        }
        v
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
        *self.now.get_or_init(|| self.host.now())
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
        let mut h = Cached::new(&mut mem, &mut cache);
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
    fn writes_that_change_nothing_clock_and_stable_properties_make_no_hostcall() {
        use crate::testing::MemProxy;
        let mut vm = MemHost::request("GET", "/", &[("x-id", "a"), ("x-two", "1")]);
        vm.add_header(MapKind::RequestHeaders, "x-two", "2");
        vm.set_property(&["source", "address"], "10.0.0.1:5000");
        let mut proxy = MemProxy::new(vm);
        proxy.count_host_calls = true;
        let mut cache = HeaderCache::new();
        let calls = |p: &MemProxy| std::mem::take(&mut *p.host_calls.borrow_mut());
        {
            let mut h = Cached::new(&mut proxy, &mut cache);
            // Before the map is read, writes go to the proxy.
            h.remove_header(MapKind::RequestHeaders, "x-none");
            assert_eq!(
                h.header(MapKind::RequestHeaders, "x-id").as_deref(),
                Some("a")
            );
            h.remove_header(MapKind::RequestHeaders, "x-absent");
            h.set_header(MapKind::RequestHeaders, "x-id", "a");
            // Two values, or another value: written.
            h.set_header(MapKind::RequestHeaders, "x-two", "1");
            h.set_header(MapKind::RequestHeaders, "x-id", "b");
            let t = h.now();
            assert_eq!(h.now(), t);
            let a = h.property(&["source", "address"]);
            assert_eq!(a.as_deref(), Some(&b"10.0.0.1:5000"[..]));
            assert_eq!(h.property(&["source", "address"]), a);
            assert_eq!(h.property(&["request", "id"]), None);
            assert_eq!(h.property(&["request", "id"]), None);
        }
        assert_eq!(
            calls(&proxy),
            [
                "remove_header_map_value",
                "get_header_map_pairs",
                "replace_header_map_value",
                "replace_header_map_value",
                "get_current_time_nanoseconds",
                "get_property",
                "get_property",
                "get_property",
            ]
        );
        let all = proxy.headers(MapKind::RequestHeaders);
        assert_eq!(
            all.get(all.len() - 2..),
            Some(
                &[
                    ("x-two".to_string(), "1".to_string()),
                    ("x-id".to_string(), "b".to_string())
                ][..]
            )
        );
        calls(&proxy);
        // The next entry reads the clock again; the stable property is still known.
        proxy.vm.now += Duration::from_secs(1);
        let h = Cached::new(&mut proxy, &mut cache);
        assert_eq!(
            h.property(&["source", "address"]).as_deref(),
            Some(&b"10.0.0.1:5000"[..])
        );
        let _ = h.now();
        assert_eq!(calls(&proxy), ["get_current_time_nanoseconds"]);
    }

    #[test]
    fn response_headers_are_read_once_per_entry() {
        use crate::testing::MemProxy;
        let mut vm = MemHost::request("GET", "/", &[]);
        vm.set_header(MapKind::ResponseHeaders, ":status", "200");
        let mut proxy = MemProxy::new(vm);
        proxy.count_host_calls = true;
        let mut cache = HeaderCache::new();
        {
            let mut h = Cached::new(&mut proxy, &mut cache);
            assert_eq!(
                h.header(MapKind::ResponseHeaders, ":status").as_deref(),
                Some("200")
            );
            assert_eq!(h.header(MapKind::ResponseHeaders, "cache-status"), None);
            h.remove_header(MapKind::ResponseHeaders, "x-absent");
            h.set_header(
                MapKind::ResponseHeaders,
                "cache-status",
                "tollgate; fwd=miss",
            );
            assert_eq!(
                h.header(MapKind::ResponseHeaders, "cache-status")
                    .as_deref(),
                Some("tollgate; fwd=miss")
            );
        }
        assert_eq!(
            std::mem::take(&mut *proxy.host_calls.borrow_mut()),
            ["get_header_map_pairs", "replace_header_map_value"]
        );
        let h = Cached::new(&mut proxy, &mut cache);
        assert_eq!(h.headers(MapKind::ResponseHeaders).len(), 2);
        assert_eq!(
            h.header(MapKind::ResponseHeaders, ":status").as_deref(),
            Some("200")
        );
        assert_eq!(
            std::mem::take(&mut *proxy.host_calls.borrow_mut()),
            ["get_header_map_pairs"]
        );
    }

    #[test]
    fn declared_headers_are_read_value_by_value_once_and_others_fetch_the_map() {
        use crate::testing::MemProxy;
        let mut vm = MemHost::request("GET", "/a", &[("x-key", "k1"), ("x-other", "o")]);
        vm.add_header(MapKind::RequestHeaders, "x-key", "k2");
        let mut proxy = MemProxy::new(vm);
        proxy.count_host_calls = true;
        let reads = HeaderReads::only([":path", "X-Key", "x-absent"]);
        // Three names are more than a module reads value by value; one is not.
        assert_eq!(singles(reads), None);
        assert_eq!(singles(HeaderReads::Any), None);
        let declared = singles(HeaderReads::only(["X-Key"]));
        assert_eq!(declared.as_deref(), Some(&["x-key".to_string()][..]));
        let calls = |p: &MemProxy| std::mem::take(&mut *p.host_calls.borrow_mut());
        let mut cache = HeaderCache::with_singles(Some(Rc::from(
            [":path", "x-key", "x-absent"].map(String::from),
        )));
        {
            let mut h = Cached::new(&mut proxy, &mut cache);
            // The first value, as a read of the map gives; each name asked of the proxy once,
            // an absent one included.
            assert_eq!(
                h.header(MapKind::RequestHeaders, "X-Key").as_deref(),
                Some("k1")
            );
            assert_eq!(
                h.header(MapKind::RequestHeaders, "x-key").as_deref(),
                Some("k1")
            );
            assert_eq!(h.path(), "/a");
            assert_eq!(h.header(MapKind::RequestHeaders, "x-absent"), None);
            assert_eq!(h.header(MapKind::RequestHeaders, "x-absent"), None);
            // A write drops the remembered value: the next read asks again.
            h.set_header(MapKind::RequestHeaders, "x-key", "k3");
            assert_eq!(
                h.header(MapKind::RequestHeaders, "x-key").as_deref(),
                Some("k3")
            );
            assert!(!h.cache.is_filled());
        }
        assert_eq!(
            calls(&proxy),
            [
                "get_header_map_value",
                "get_header_map_value",
                "get_header_map_value",
                "replace_header_map_value",
                "get_header_map_value",
            ]
        );
        {
            // A header not declared fetches the map, which then answers every read.
            let h = Cached::new(&mut proxy, &mut cache);
            assert_eq!(
                h.header(MapKind::RequestHeaders, "x-other").as_deref(),
                Some("o")
            );
            assert_eq!(
                h.header(MapKind::RequestHeaders, "x-key").as_deref(),
                Some("k3")
            );
            assert_eq!(h.path(), "/a");
            assert!(h.cache.is_filled());
        }
        assert_eq!(calls(&proxy), ["get_header_map_pairs"]);
    }

    #[test]
    fn header_reads_union() {
        let only = |n: &[&str]| HeaderReads::only(n.iter().copied());
        assert_eq!(
            only(&[":path", "X-A"]).and(only(&["x-a", "x-b"])),
            only(&[":path", "x-a", "x-b"])
        );
        assert_eq!(HeaderReads::NONE.and(only(&["x-a"])), only(&["x-a"]));
        assert_eq!(only(&["x-a"]).and(HeaderReads::Any), HeaderReads::Any);
        assert_eq!(HeaderReads::Any.and(only(&["x-a"])), HeaderReads::Any);
        assert_eq!(singles(HeaderReads::NONE).as_deref(), Some(&[][..]));
    }

    #[test]
    fn writes_before_the_first_read_reach_the_proxy_and_the_later_fetch() {
        let mut mem = MemHost::request("GET", "/", &[]);
        let mut cache = HeaderCache::new();
        let mut h = Cached::new(&mut mem, &mut cache);
        h.set_header(MapKind::RequestHeaders, "x-a", "1");
        assert!(!h.cache.is_filled());
        assert_eq!(
            h.header(MapKind::RequestHeaders, "x-a").as_deref(),
            Some("1")
        );
    }
}
