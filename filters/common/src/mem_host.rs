//! An in-memory [`Host`] for unit tests of filter logic: headers, bodies, properties, shared
//! data with Envoy's CAS rules, recorded callouts, a settable clock and metrics.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, SystemTime};

use crate::host::{Body, GrpcCall, Host, HostError, HttpCall, MapKind, MetricKind, SharedError};

/// Shared data as Envoy keeps it: key -> (value, cas). Clone it into several hosts to model
/// several workers of one Envoy.
#[derive(Debug, Clone, Default)]
pub struct SharedStore {
    inner: Rc<RefCell<SharedInner>>,
}

#[derive(Debug, Default)]
struct SharedInner {
    data: HashMap<String, (Vec<u8>, u32)>,
    next_cas: u32,
    forced_conflicts: u32,
    /// A write another worker makes just before the next write of its key (a lost race).
    race: Option<(String, Vec<u8>)>,
}

impl SharedStore {
    /// Make the next `n` CAS writes fail with a mismatch, as if other workers raced.
    pub fn force_conflicts(&self, n: u32) {
        self.inner.borrow_mut().forced_conflicts = n;
    }
    /// Another worker writes `value` to `key` just before this Envoy's next write of `key`
    /// (after that write's read): the interleaving of a lost race, at the exact point.
    pub fn race_next_write(&self, key: &str, value: &[u8]) {
        self.inner.borrow_mut().race = Some((key.to_string(), value.to_vec()));
    }
    /// Number of keys stored.
    pub fn len(&self) -> usize {
        self.inner.borrow().data.len()
    }
    /// True when no key is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Total bytes of keys and values stored.
    pub fn bytes(&self) -> usize {
        self.inner
            .borrow()
            .data
            .iter()
            .map(|(k, (v, _))| k.len() + v.len())
            .sum()
    }
}

/// An HTTP callout the filter made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedCall {
    /// Token returned to the filter.
    pub token: u32,
    /// Target cluster.
    pub cluster: String,
    /// Headers, pseudo-headers included.
    pub headers: Vec<(String, String)>,
    /// Body, if any.
    pub body: Option<Vec<u8>>,
    /// Timeout.
    pub timeout: Duration,
}

impl RecordedCall {
    /// A header of the call.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A gRPC callout the filter made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedGrpcCall {
    /// Token returned to the filter.
    pub token: u32,
    /// Target cluster.
    pub cluster: String,
    /// Service name.
    pub service: String,
    /// Method name.
    pub method: String,
    /// Initial metadata.
    pub metadata: Vec<(String, Vec<u8>)>,
    /// The serialized request message.
    pub message: Vec<u8>,
    /// Timeout.
    pub timeout: Duration,
}

#[derive(Debug, Default)]
struct MetricStore {
    by_name: HashMap<String, u32>,
    values: Vec<(String, MetricKind, i64)>,
}

/// The in-memory host.
#[derive(Debug)]
pub struct MemHost {
    maps: HashMap<MapKind, Vec<(String, String)>>,
    bodies: HashMap<Body, Vec<u8>>,
    /// Properties by path (`["source", "address"]`).
    pub properties: HashMap<Vec<String>, Vec<u8>>,
    /// Shared data (clone one store into several hosts to model workers).
    pub shared: SharedStore,
    /// Callouts made so far.
    pub calls: Vec<RecordedCall>,
    /// gRPC callouts made so far.
    pub grpc_calls: Vec<RecordedGrpcCall>,
    /// When set, `http_call` and `grpc_call` fail (no such cluster).
    pub fail_calls: bool,
    /// The next callout token, shared by the hosts of one Envoy (unique across requests).
    tokens: Rc<Cell<u32>>,
    /// Current time; move it with [`MemHost::advance`].
    pub now: SystemTime,
    metrics: Rc<RefCell<MetricStore>>,
    /// Last tick period asked for.
    pub tick_period: Option<Duration>,
    /// `(context_id, reason)` of every `wake` call, in order. MemHost cannot reach the woken
    /// filter; a test calls that filter's `on_wake` itself.
    pub woken: Vec<(u32, u32)>,
}

impl Default for MemHost {
    fn default() -> Self {
        MemHost::new()
    }
}

impl MemHost {
    /// An empty host at a fixed time (2026-01-01T00:00:00Z).
    pub fn new() -> Self {
        MemHost {
            maps: HashMap::new(),
            bodies: HashMap::new(),
            properties: HashMap::new(),
            shared: SharedStore::default(),
            calls: Vec::new(),
            grpc_calls: Vec::new(),
            fail_calls: false,
            tokens: Rc::new(Cell::new(1)),
            now: SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600),
            metrics: Rc::default(),
            tick_period: None,
            woken: Vec::new(),
        }
    }

    /// A host with a request: method, path (with query) and extra headers.
    pub fn request(method: &str, path: &str, headers: &[(&str, &str)]) -> Self {
        let mut h = MemHost::new();
        let mut all = vec![
            (":method".to_string(), method.to_string()),
            (":path".to_string(), path.to_string()),
            (":authority".to_string(), "gateway.test".to_string()),
            (":scheme".to_string(), "http".to_string()),
        ];
        all.extend(
            headers
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string())),
        );
        h.maps.insert(MapKind::RequestHeaders, all);
        h
    }

    /// Another host (a new request) that shares this one's shared data, metrics and clock:
    /// the next request on the same Envoy.
    pub fn next_request(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> Self {
        let mut h = MemHost::request(method, path, headers);
        h.shared = self.shared.clone();
        h.metrics = self.metrics.clone();
        h.now = self.now;
        h.tokens = self.tokens.clone();
        h
    }

    /// Another host without a request that shares this one's shared data, metrics, callout
    /// tokens and clock: the root context of another worker of the same Envoy.
    pub fn worker(&self) -> Self {
        let mut h = MemHost::new();
        h.shared = self.shared.clone();
        h.metrics = self.metrics.clone();
        h.now = self.now;
        h.tokens = self.tokens.clone();
        h
    }

    fn next_token(&self) -> u32 {
        let token = self.tokens.get();
        self.tokens.set(token.wrapping_add(1).max(1));
        token
    }

    /// Replace a whole header map.
    pub fn set_map(&mut self, map: MapKind, headers: &[(&str, &str)]) {
        self.maps.insert(
            map,
            headers
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
                .collect(),
        );
    }

    /// Replace a body buffer.
    pub fn set_body_bytes(&mut self, which: Body, data: &[u8]) {
        self.bodies.insert(which, data.to_vec());
    }

    /// A body buffer's bytes.
    pub fn body_bytes(&self, which: Body) -> &[u8] {
        self.bodies.get(&which).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Set a property (`set_property(&["source", "address"], "10.0.0.1:5555")`).
    pub fn set_property(&mut self, path: &[&str], value: &str) {
        self.properties.insert(
            path.iter().map(|s| s.to_string()).collect(),
            value.as_bytes().to_vec(),
        );
    }

    /// Move the clock forward.
    pub fn advance(&mut self, by: Duration) {
        self.now += by;
    }

    /// A metric's value by full name.
    pub fn metric(&self, name: &str) -> Option<i64> {
        let m = self.metrics.borrow();
        m.by_name
            .get(name)
            .and_then(|id| m.values.get(*id as usize))
            .map(|(_, _, v)| *v)
    }

    /// How many metrics were defined.
    pub fn metrics_defined(&self) -> usize {
        self.metrics.borrow().values.len()
    }
}

impl Host for MemHost {
    fn header(&self, map: MapKind, name: &str) -> Option<String> {
        self.maps
            .get(&map)?
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    }

    fn headers(&self, map: MapKind) -> Vec<(String, String)> {
        self.maps.get(&map).cloned().unwrap_or_default()
    }

    fn set_header(&mut self, map: MapKind, name: &str, value: &str) {
        let m = self.maps.entry(map).or_default();
        m.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
        m.push((name.to_ascii_lowercase(), value.to_string()));
    }

    fn add_header(&mut self, map: MapKind, name: &str, value: &str) {
        self.maps
            .entry(map)
            .or_default()
            .push((name.to_ascii_lowercase(), value.to_string()));
    }

    fn remove_header(&mut self, map: MapKind, name: &str) {
        if let Some(m) = self.maps.get_mut(&map) {
            m.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
        }
    }

    fn body(&self, which: Body, start: usize, max: usize) -> Option<Vec<u8>> {
        let b = self.bodies.get(&which)?;
        let end = start.saturating_add(max).min(b.len());
        b.get(start..end).map(<[u8]>::to_vec)
    }

    fn set_body(&mut self, which: Body, start: usize, size: usize, data: &[u8]) {
        let b = self.bodies.entry(which).or_default();
        let start = start.min(b.len());
        let end = start.saturating_add(size).min(b.len());
        b.splice(start..end, data.iter().copied());
    }

    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        let key: Vec<String> = path.iter().map(|s| s.to_string()).collect();
        self.properties.get(&key).cloned()
    }

    fn shared_get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, HostError> {
        Ok(self.shared.inner.borrow().data.get(key).cloned())
    }

    fn shared_set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SharedError> {
        let mut s = self.shared.inner.borrow_mut();
        if s.race.as_ref().is_some_and(|(k, _)| k == key) {
            if let Some((k, v)) = s.race.take() {
                s.next_cas = s.next_cas.wrapping_add(1).max(1);
                let next = s.next_cas;
                s.data.insert(k, (v, next));
            }
        }
        if cas.is_some() && s.forced_conflicts > 0 {
            s.forced_conflicts -= 1;
            return Err(SharedError::CasMismatch);
        }
        // Envoy: a CAS only guards an existing key; a missing key is always inserted.
        if let (Some(c), Some((_, current))) = (cas, s.data.get(key)) {
            if c != 0 && c != *current {
                return Err(SharedError::CasMismatch);
            }
        }
        s.next_cas = s.next_cas.wrapping_add(1).max(1);
        let next = s.next_cas;
        s.data.insert(key.to_string(), (value.to_vec(), next));
        Ok(())
    }

    fn http_call(&mut self, call: &HttpCall<'_>) -> Result<u32, HostError> {
        if self.fail_calls {
            return Err(HostError::Failed("dispatch_http_call"));
        }
        let token = self.next_token();
        self.calls.push(RecordedCall {
            token,
            cluster: call.cluster.to_string(),
            headers: call
                .headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: call.body.map(<[u8]>::to_vec),
            timeout: call.timeout,
        });
        Ok(token)
    }

    fn grpc_call(&mut self, call: &GrpcCall<'_>) -> Result<u32, HostError> {
        if self.fail_calls {
            return Err(HostError::Failed("dispatch_grpc_call"));
        }
        let token = self.next_token();
        self.grpc_calls.push(RecordedGrpcCall {
            token,
            cluster: call.cluster.to_string(),
            service: call.service.to_string(),
            method: call.method.to_string(),
            metadata: call
                .metadata
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_vec()))
                .collect(),
            message: call.message.to_vec(),
            timeout: call.timeout,
        });
        Ok(token)
    }

    fn now(&self) -> SystemTime {
        self.now
    }

    fn define_metric(&mut self, kind: MetricKind, name: &str) -> Result<u32, HostError> {
        let mut m = self.metrics.borrow_mut();
        if let Some(id) = m.by_name.get(name) {
            return Ok(*id);
        }
        let id = u32::try_from(m.values.len()).map_err(|_| HostError::Failed("define_metric"))?;
        m.values.push((name.to_string(), kind, 0));
        m.by_name.insert(name.to_string(), id);
        Ok(id)
    }

    fn increment_metric(&mut self, id: u32, delta: i64) {
        if let Some(v) = self.metrics.borrow_mut().values.get_mut(id as usize) {
            v.2 = v.2.saturating_add(delta);
        }
    }

    fn record_metric(&mut self, id: u32, value: u64) {
        if let Some(v) = self.metrics.borrow_mut().values.get_mut(id as usize) {
            v.2 = i64::try_from(value).unwrap_or(i64::MAX);
        }
    }

    fn set_tick_period(&mut self, period: Duration) {
        self.tick_period = Some(period);
    }

    fn wake(&mut self, context_id: u32, reason: u32) -> bool {
        self.woken.push((context_id, reason));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip() {
        let mut h = MemHost::request("GET", "/a?b=1", &[("X-One", "1")]);
        assert_eq!(h.method(), "GET");
        assert_eq!(h.path(), "/a?b=1");
        assert_eq!(h.authority(), "gateway.test");
        assert_eq!(
            h.header(MapKind::RequestHeaders, "x-one").as_deref(),
            Some("1")
        );
        h.add_header(MapKind::RequestHeaders, "x-one", "2");
        assert_eq!(
            h.headers(MapKind::RequestHeaders)
                .iter()
                .filter(|(k, _)| k == "x-one")
                .count(),
            2
        );
        h.set_header(MapKind::RequestHeaders, "X-One", "3");
        assert_eq!(
            h.header(MapKind::RequestHeaders, "x-one").as_deref(),
            Some("3")
        );
        h.remove_header(MapKind::RequestHeaders, "x-one");
        assert_eq!(h.header(MapKind::RequestHeaders, "x-one"), None);
        assert_eq!(h.header(MapKind::ResponseHeaders, ":status"), None);
    }

    #[test]
    fn bodies_slice_and_splice() {
        let mut h = MemHost::new();
        h.set_body_bytes(Body::Response, b"hello world");
        assert_eq!(h.body(Body::Response, 6, 100).unwrap(), b"world");
        h.set_body(Body::Response, 0, 5, b"HOWDY!");
        assert_eq!(h.body_bytes(Body::Response), b"HOWDY! world");
        assert_eq!(h.body(Body::Request, 0, 10), None);
    }

    #[test]
    fn shared_data_follows_envoy_cas_rules() {
        let mut a = MemHost::new();
        let mut b = a.next_request("GET", "/", &[]);
        assert_eq!(a.shared_get("k").unwrap(), None);
        a.shared_set("k", b"1", None).unwrap();
        let (v, cas) = b.shared_get("k").unwrap().unwrap();
        assert_eq!(v, b"1");
        a.shared_set("k", b"2", Some(cas)).unwrap();
        assert_eq!(
            b.shared_set("k", b"3", Some(cas)),
            Err(SharedError::CasMismatch)
        );
        let (_, cas2) = b.shared_get("k").unwrap().unwrap();
        b.shared_set("k", b"3", Some(cas2)).unwrap();
        assert_eq!(a.shared_get("k").unwrap().unwrap().0, b"3");
        // a CAS against a missing key inserts, as in Envoy
        a.shared_set("new", b"x", Some(12345)).unwrap();
        a.shared.force_conflicts(1);
        assert_eq!(
            a.shared_set("k", b"4", Some(1)),
            Err(SharedError::CasMismatch)
        );
        assert_eq!(a.shared.len(), 2);
        assert_eq!(a.shared.bytes(), 1 + 1 + 3 + 1);
    }

    #[test]
    fn calls_are_recorded_with_tokens() {
        let mut h = MemHost::new();
        let call = HttpCall {
            cluster: "jwks",
            headers: vec![(":method", "GET"), (":path", "/keys")],
            body: None,
            timeout: Duration::from_secs(1),
        };
        let t1 = h.http_call(&call).unwrap();
        let t2 = h.http_call(&call).unwrap();
        assert_ne!(t1, t2);
        assert_eq!(h.calls[1].header(":path"), Some("/keys"));
        h.fail_calls = true;
        assert!(h.http_call(&call).is_err());
    }

    #[test]
    fn clock_and_properties() {
        let mut h = MemHost::new();
        let t0 = h.now_secs();
        h.advance(Duration::from_millis(1500));
        assert!((h.now_secs() - t0 - 1.5).abs() < 1e-9);
        h.set_property(&["source", "address"], "10.1.2.3:4567");
        assert_eq!(
            h.property(&["source", "address"]).unwrap(),
            b"10.1.2.3:4567"
        );
        assert_eq!(h.property(&["nope"]), None);
        h.set_tick_period(Duration::from_secs(1));
        assert_eq!(h.tick_period, Some(Duration::from_secs(1)));
    }
}
