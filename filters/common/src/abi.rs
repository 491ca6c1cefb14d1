//! The proxy-wasm ABI 0.2.1 hostcalls (imports from module `env`), each wrapped so that every
//! proxy status comes back as an error value and nothing panics. Only the adapter uses this
//! module. The numbers are those of the ABI specification (proxy-wasm/spec, ABI 0.2.1), which
//! Envoy's host implementation (proxy-wasm-cpp-host) follows.
//!
//! Values returned by the proxy are copied into buffers it allocates through this module's
//! `proxy_on_memory_allocate` export; [`take`] turns them back into owned `Vec`s.

#![allow(unsafe_code)]

use std::ptr::{null, null_mut};

/// A proxy status other than `Ok`.
pub type RawStatus = u32;

/// Status `Ok`.
pub const OK: u32 = 0;
/// Status `NotFound`.
pub const NOT_FOUND: u32 = 1;
/// Status `BadArgument`.
pub const BAD_ARGUMENT: u32 = 2;
/// Status `CasMismatch`.
pub const CAS_MISMATCH: u32 = 8;

/// Header map types.
pub mod map {
    /// Downstream request headers.
    pub const REQUEST_HEADERS: u32 = 0;
    /// Downstream request trailers.
    pub const REQUEST_TRAILERS: u32 = 1;
    /// Upstream response headers.
    pub const RESPONSE_HEADERS: u32 = 2;
    /// Upstream response trailers.
    pub const RESPONSE_TRAILERS: u32 = 3;
    /// Headers of an HTTP callout's answer.
    pub const CALL_RESPONSE_HEADERS: u32 = 6;
}

/// Buffer types.
pub mod buffer {
    /// Downstream request body.
    pub const REQUEST_BODY: u32 = 0;
    /// Upstream response body.
    pub const RESPONSE_BODY: u32 = 1;
    /// Body of an HTTP callout's answer.
    pub const CALL_RESPONSE_BODY: u32 = 4;
    /// Message of a gRPC callout's answer.
    pub const GRPC_RECEIVE: u32 = 5;
    /// The plugin configuration (during `proxy_on_configure`).
    pub const PLUGIN_CONFIGURATION: u32 = 7;
}

/// Stream types of `proxy_continue_stream`.
pub mod stream {
    /// The downstream request.
    pub const REQUEST: u32 = 0;
    /// The upstream response.
    pub const RESPONSE: u32 = 1;
}

/// Log levels (trace 0 ... critical 5).
pub mod level {
    /// Critical.
    pub const CRITICAL: u32 = 5;
}

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_log(level: u32, message_data: *const u8, message_size: usize) -> u32;
    fn proxy_get_log_level(return_level: *mut u32) -> u32;
    fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_set_effective_context(context_id: u32) -> u32;
    fn proxy_continue_stream(stream_type: u32) -> u32;
    fn proxy_get_status(
        return_code: *mut u32,
        return_message_data: *mut *mut u8,
        return_message_size: *mut usize,
    ) -> u32;
    fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_get_shared_data(
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
        return_cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
    fn proxy_define_metric(
        metric_type: u32,
        name_data: *const u8,
        name_size: usize,
        return_id: *mut u32,
    ) -> u32;
    fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
    fn proxy_record_metric(metric_id: u32, value: u64) -> u32;
    fn proxy_http_call(
        upstream_data: *const u8,
        upstream_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        body_data: *const u8,
        body_size: usize,
        trailers_data: *const u8,
        trailers_size: usize,
        timeout_milliseconds: u32,
        return_token: *mut u32,
    ) -> u32;
    fn proxy_grpc_call(
        upstream_data: *const u8,
        upstream_size: usize,
        service_name_data: *const u8,
        service_name_size: usize,
        method_name_data: *const u8,
        method_name_size: usize,
        initial_metadata_data: *const u8,
        initial_metadata_size: usize,
        message_data: *const u8,
        message_size: usize,
        timeout_milliseconds: u32,
        return_token: *mut u32,
    ) -> u32;
    fn proxy_get_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_pairs(
        map_type: u32,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> u32;
    fn proxy_replace_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_add_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_remove_header_map_value(map_type: u32, key_data: *const u8, key_size: usize) -> u32;
    fn proxy_get_buffer_bytes(
        buffer_type: u32,
        start: usize,
        max_size: usize,
        return_buffer_data: *mut *mut u8,
        return_buffer_size: *mut usize,
    ) -> u32;
    fn proxy_set_buffer_bytes(
        buffer_type: u32,
        start: usize,
        size: usize,
        buffer_data: *const u8,
        buffer_size: usize,
    ) -> u32;
    fn proxy_send_local_response(
        status_code: u32,
        status_code_details_data: *const u8,
        status_code_details_size: usize,
        body_data: *const u8,
        body_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
}

/// Take ownership of a buffer the proxy allocated through `proxy_on_memory_allocate`.
///
/// # Safety
/// `data` must be null or a buffer of `size` bytes allocated by this module's allocator for
/// the proxy, not owned by anything else.
unsafe fn take(data: *mut u8, size: usize) -> Option<Vec<u8>> {
    if data.is_null() {
        None
    } else {
        Some(Vec::from_raw_parts(data, size, size))
    }
}

fn status(s: u32) -> Result<(), RawStatus> {
    if s == OK {
        Ok(())
    } else {
        Err(s)
    }
}

/// Allocate `size` bytes for the proxy (the `proxy_on_memory_allocate` export): exactly
/// `size` bytes of capacity, so that [`take`] can rebuild the `Vec`.
pub fn allocate(size: usize) -> *mut u8 {
    let mut v: Vec<std::mem::MaybeUninit<u8>> = Vec::with_capacity(size);
    // SAFETY: MaybeUninit needs no initialization; the proxy writes the bytes.
    unsafe { v.set_len(size) };
    Box::into_raw(v.into_boxed_slice()).cast::<u8>()
}

/// Log a line.
pub fn log(level: u32, message: &str) -> Result<(), RawStatus> {
    // SAFETY: pointer and length of a live slice.
    status(unsafe { proxy_log(level, message.as_ptr(), message.len()) })
}

/// The proxy's log level (trace 0 ... critical 5, off 6).
pub fn log_level() -> Result<u32, RawStatus> {
    let mut level = 0u32;
    // SAFETY: the proxy writes a u32.
    status(unsafe { proxy_get_log_level(&mut level) }).map(|()| level)
}

/// Wall-clock time in nanoseconds since the Unix epoch.
pub fn now_nanos() -> Result<u64, RawStatus> {
    let mut t = 0u64;
    // SAFETY: the proxy writes a u64.
    status(unsafe { proxy_get_current_time_nanoseconds(&mut t) }).map(|()| t)
}

/// Set the root's tick period (0 stops the ticks).
pub fn set_tick_period_ms(ms: u32) -> Result<(), RawStatus> {
    // SAFETY: no pointers.
    status(unsafe { proxy_set_tick_period_milliseconds(ms) })
}

/// Make `context_id` the effective context of the following hostcalls.
pub fn set_effective_context(context_id: u32) -> Result<(), RawStatus> {
    // SAFETY: no pointers.
    status(unsafe { proxy_set_effective_context(context_id) })
}

/// Resume a paused stream ([`stream::REQUEST`] or [`stream::RESPONSE`]).
pub fn continue_stream(which: u32) -> Result<(), RawStatus> {
    // SAFETY: no pointers.
    status(unsafe { proxy_continue_stream(which) })
}

/// The status code and message of the callout being handled (for a gRPC callout, its gRPC
/// status).
pub fn get_status() -> Result<(u32, Vec<u8>), RawStatus> {
    let mut code = 0u32;
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: the proxy writes a u32 and a buffer it allocated with our allocator (or nothing).
    status(unsafe { proxy_get_status(&mut code, &mut data, &mut size) })?;
    Ok((code, unsafe { take(data, size) }.unwrap_or_default()))
}

/// The property path format: segments separated by NUL bytes.
pub fn property_path(path: &[&str]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(path.iter().map(|p| p.len() + 1).sum());
    for (i, part) in path.iter().enumerate() {
        if i > 0 {
            bytes.push(0);
        }
        bytes.extend_from_slice(part.as_bytes());
    }
    bytes
}

/// A property; `Ok(None)` when absent.
pub fn get_property(path: &[&str]) -> Result<Option<Vec<u8>>, RawStatus> {
    let path = property_path(path);
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: pointer and length of a live slice; the proxy writes a buffer it allocated.
    match unsafe { proxy_get_property(path.as_ptr(), path.len(), &mut data, &mut size) } {
        OK => Ok(unsafe { take(data, size) }),
        NOT_FOUND => Ok(None),
        s => Err(s),
    }
}

/// A shared-data value and its CAS; `Ok(None)` when absent.
pub fn get_shared_data(key: &str) -> Result<Option<(Vec<u8>, u32)>, RawStatus> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    let mut cas = 0u32;
    // SAFETY: as in `get_property`.
    match unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas) }
    {
        OK => Ok(Some((unsafe { take(data, size) }.unwrap_or_default(), cas))),
        NOT_FOUND => Ok(None),
        s => Err(s),
    }
}

/// Store a shared-data value; `cas` 0 writes unconditionally.
pub fn set_shared_data(key: &str, value: &[u8], cas: u32) -> Result<(), RawStatus> {
    // SAFETY: pointers and lengths of live slices.
    status(unsafe {
        proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas)
    })
}

/// Define a metric (0 counter, 1 gauge, 2 histogram); its id.
pub fn define_metric(kind: u32, name: &str) -> Result<u32, RawStatus> {
    let mut id = 0u32;
    // SAFETY: pointer and length of a live slice; the proxy writes a u32.
    status(unsafe { proxy_define_metric(kind, name.as_ptr(), name.len(), &mut id) }).map(|()| id)
}

/// Add to a counter or gauge.
pub fn increment_metric(id: u32, delta: i64) -> Result<(), RawStatus> {
    // SAFETY: no pointers.
    status(unsafe { proxy_increment_metric(id, delta) })
}

/// Set a gauge or record a histogram value.
pub fn record_metric(id: u32, value: u64) -> Result<(), RawStatus> {
    // SAFETY: no pointers.
    status(unsafe { proxy_record_metric(id, value) })
}

fn opt_ptr(data: Option<&[u8]>) -> (*const u8, usize) {
    match data {
        Some(d) if !d.is_empty() => (d.as_ptr(), d.len()),
        _ => (null(), 0),
    }
}

/// Start an HTTP callout; its token.
pub fn http_call(
    cluster: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
    timeout_ms: u32,
) -> Result<u32, RawStatus> {
    let headers = serialize_map(headers);
    let trailers = serialize_map(&[]);
    let (body_ptr, body_len) = opt_ptr(body);
    let mut token = 0u32;
    // SAFETY: pointers and lengths of live slices; the proxy writes a u32.
    status(unsafe {
        proxy_http_call(
            cluster.as_ptr(),
            cluster.len(),
            headers.as_ptr(),
            headers.len(),
            body_ptr,
            body_len,
            trailers.as_ptr(),
            trailers.len(),
            timeout_ms,
            &mut token,
        )
    })
    .map(|()| token)
}

/// Start a unary gRPC callout; its token.
pub fn grpc_call(
    cluster: &str,
    service: &str,
    method: &str,
    metadata: &[(&str, &[u8])],
    message: &[u8],
    timeout_ms: u32,
) -> Result<u32, RawStatus> {
    let metadata = serialize_map_bytes(metadata);
    let (msg_ptr, msg_len) = opt_ptr(Some(message));
    let mut token = 0u32;
    // SAFETY: pointers and lengths of live slices; the proxy writes a u32.
    status(unsafe {
        proxy_grpc_call(
            cluster.as_ptr(),
            cluster.len(),
            service.as_ptr(),
            service.len(),
            method.as_ptr(),
            method.len(),
            metadata.as_ptr(),
            metadata.len(),
            msg_ptr,
            msg_len,
            timeout_ms,
            &mut token,
        )
    })
    .map(|()| token)
}

/// One header value; `Ok(None)` when absent.
pub fn get_header(map: u32, key: &str) -> Result<Option<Vec<u8>>, RawStatus> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: the proxy writes a buffer it allocated with our allocator (or nothing).
    match unsafe { proxy_get_header_map_value(map, key.as_ptr(), key.len(), &mut data, &mut size) }
    {
        OK => Ok(Some(unsafe { take(data, size) }.unwrap_or_default())),
        NOT_FOUND => Ok(None),
        s => Err(s),
    }
}

/// All pairs of a header map.
pub fn get_headers(map: u32) -> Result<Vec<(String, Vec<u8>)>, RawStatus> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: as in `get_header`.
    match unsafe { proxy_get_header_map_pairs(map, &mut data, &mut size) } {
        OK => Ok(unsafe { take(data, size) }
            .map(|b| deserialize_map(&b))
            .unwrap_or_default()),
        NOT_FOUND => Ok(Vec::new()),
        s => Err(s),
    }
}

/// Replace a header's values with one value.
pub fn set_header(map: u32, key: &str, value: &str) -> Result<(), RawStatus> {
    // SAFETY: pointers and lengths of live slices.
    status(unsafe {
        proxy_replace_header_map_value(map, key.as_ptr(), key.len(), value.as_ptr(), value.len())
    })
}

/// Add a header value.
pub fn add_header(map: u32, key: &str, value: &str) -> Result<(), RawStatus> {
    // SAFETY: pointers and lengths of live slices.
    status(unsafe {
        proxy_add_header_map_value(map, key.as_ptr(), key.len(), value.as_ptr(), value.len())
    })
}

/// Remove a header.
pub fn remove_header(map: u32, key: &str) -> Result<(), RawStatus> {
    // SAFETY: pointer and length of a live slice.
    match unsafe { proxy_remove_header_map_value(map, key.as_ptr(), key.len()) } {
        OK | NOT_FOUND => Ok(()),
        s => Err(s),
    }
}

/// Up to `max` bytes of a buffer from `start`; `Ok(None)` when there is none.
pub fn get_buffer(buffer: u32, start: usize, max: usize) -> Result<Option<Vec<u8>>, RawStatus> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: as in `get_header`.
    match unsafe { proxy_get_buffer_bytes(buffer, start, max, &mut data, &mut size) } {
        OK => Ok(unsafe { take(data, size) }),
        NOT_FOUND => Ok(None),
        s => Err(s),
    }
}

/// Replace `size` bytes at `start` of a buffer with `value`.
pub fn set_buffer(buffer: u32, start: usize, size: usize, value: &[u8]) -> Result<(), RawStatus> {
    // SAFETY: pointer and length of a live slice.
    status(unsafe { proxy_set_buffer_bytes(buffer, start, size, value.as_ptr(), value.len()) })
}

/// Send a local reply.
pub fn send_local_response(
    status_code: u32,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<(), RawStatus> {
    let map = serialize_map(headers);
    let (body_ptr, body_len) = opt_ptr(Some(body));
    // SAFETY: pointers and lengths of live slices.
    status(unsafe {
        proxy_send_local_response(
            status_code,
            null(),
            0,
            body_ptr,
            body_len,
            map.as_ptr(),
            map.len(),
            -1,
        )
    })
}

/// The proxy-wasm map format: count, (key length, value length) pairs, then NUL-terminated
/// keys and values.
pub fn serialize_map(map: &[(&str, &str)]) -> Vec<u8> {
    let pairs: Vec<(&str, &[u8])> = map.iter().map(|(k, v)| (*k, v.as_bytes())).collect();
    serialize_map_bytes(&pairs)
}

/// [`serialize_map`] with byte values (gRPC metadata).
pub fn serialize_map_bytes(map: &[(&str, &[u8])]) -> Vec<u8> {
    let size = 4 + map
        .iter()
        .map(|(k, v)| k.len() + v.len() + 10)
        .sum::<usize>();
    let mut bytes = Vec::with_capacity(size);
    bytes.extend_from_slice(&u32::try_from(map.len()).unwrap_or(0).to_le_bytes());
    for (k, v) in map {
        bytes.extend_from_slice(&u32::try_from(k.len()).unwrap_or(0).to_le_bytes());
        bytes.extend_from_slice(&u32::try_from(v.len()).unwrap_or(0).to_le_bytes());
    }
    for (k, v) in map {
        bytes.extend_from_slice(k.as_bytes());
        bytes.push(0);
        bytes.extend_from_slice(v);
        bytes.push(0);
    }
    bytes
}

fn read_u32(bytes: &[u8], at: usize) -> Option<usize> {
    let b = bytes.get(at..at + 4)?;
    Some(u32::from_le_bytes(<[u8; 4]>::try_from(b).ok()?) as usize)
}

/// Parse the proxy-wasm map format; a malformed map yields the pairs read before the fault.
pub fn deserialize_map(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let Some(count) = read_u32(bytes, 0) else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(count.min(1024));
    let mut p = 4usize.saturating_add(count.saturating_mul(8));
    for n in 0..count {
        let s = 4 + n * 8;
        let (Some(klen), Some(vlen)) = (read_u32(bytes, s), read_u32(bytes, s + 4)) else {
            break;
        };
        let Some(key) = p.checked_add(klen).and_then(|end| bytes.get(p..end)) else {
            break;
        };
        p = p.saturating_add(klen + 1);
        let Some(value) = p.checked_add(vlen).and_then(|end| bytes.get(p..end)) else {
            break;
        };
        p = p.saturating_add(vlen + 1);
        out.push((String::from_utf8_lossy(key).into_owned(), value.to_vec()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_format_round_trips_and_survives_truncation() {
        let map = [(":method", "GET"), (":path", "/a?b"), ("x-empty", "")];
        let bytes = serialize_map(&map);
        let back = deserialize_map(&bytes);
        assert_eq!(back.len(), 3);
        assert_eq!(back[1], (":path".to_string(), b"/a?b".to_vec()));
        assert_eq!(back[2].1, b"");
        for cut in 0..bytes.len() {
            let partial = deserialize_map(&bytes[..cut]);
            assert!(partial.len() <= 3);
        }
        assert!(deserialize_map(&[]).is_empty());
        // A count far larger than the data must not allocate or loop wildly.
        assert!(deserialize_map(&u32::MAX.to_le_bytes()).is_empty());
        let bin: [(&str, &[u8]); 1] = [("x-bin", &[0xff, 0])];
        assert_eq!(
            deserialize_map(&serialize_map_bytes(&bin)),
            vec![("x-bin".to_string(), vec![0xff, 0])]
        );
        assert_eq!(serialize_map(&[]), vec![0, 0, 0, 0]);
    }

    #[test]
    fn property_paths_are_nul_separated() {
        assert_eq!(property_path(&["source", "address"]), b"source\0address");
        assert_eq!(property_path(&["x"]), b"x");
        assert!(property_path(&[]).is_empty());
    }

    #[test]
    fn allocations_have_exactly_the_size_asked_for() {
        for size in [0usize, 1, 17, 4096] {
            let p = allocate(size);
            assert!(!p.is_null());
            // SAFETY: allocated above with exactly `size` bytes, written as the proxy would.
            let v = unsafe {
                std::ptr::write_bytes(p, 7, size);
                take(p, size)
            }
            .unwrap();
            assert_eq!((v.len(), v.capacity()), (size, size));
        }
    }
}
