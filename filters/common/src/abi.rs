//! Header-map, body and local-reply hostcalls that report every proxy status instead of
//! panicking. The SDK's wrappers (`proxy_wasm::hostcalls::get_map_value` and friends) panic on
//! any status they do not expect, and Envoy answers `BadArgument` when a header map is not
//! available — for example the request headers in a response hook, or in a body hook once the
//! headers hook has continued. A panic kills the VM for every request on that worker, so the
//! adapter makes these calls here. Only the adapter uses this module.

#![allow(unsafe_code)]

use std::ptr::{null, null_mut};

use proxy_wasm::types::{BufferType, MapType};

/// A proxy status other than `Ok`.
pub type RawStatus = u32;

const OK: u32 = 0;
const NOT_FOUND: u32 = 1;

#[allow(clashing_extern_declarations)]
#[link(wasm_import_module = "env")]
extern "C" {
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

/// One header value; `Ok(None)` when absent.
pub fn get_header(map: MapType, key: &str) -> Result<Option<Vec<u8>>, RawStatus> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: the proxy writes a buffer it allocated with our allocator (or nothing).
    match unsafe {
        proxy_get_header_map_value(map as u32, key.as_ptr(), key.len(), &mut data, &mut size)
    } {
        OK => Ok(Some(unsafe { take(data, size) }.unwrap_or_default())),
        NOT_FOUND => Ok(None),
        status => Err(status),
    }
}

/// All pairs of a header map.
pub fn get_headers(map: MapType) -> Result<Vec<(String, Vec<u8>)>, RawStatus> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: as in `get_header`.
    match unsafe { proxy_get_header_map_pairs(map as u32, &mut data, &mut size) } {
        OK => Ok(unsafe { take(data, size) }
            .map(|b| deserialize_map(&b))
            .unwrap_or_default()),
        NOT_FOUND => Ok(Vec::new()),
        status => Err(status),
    }
}

/// Replace a header's values with one value.
pub fn set_header(map: MapType, key: &str, value: &str) -> Result<(), RawStatus> {
    // SAFETY: pointers and lengths of live slices.
    let s = unsafe {
        proxy_replace_header_map_value(
            map as u32,
            key.as_ptr(),
            key.len(),
            value.as_ptr(),
            value.len(),
        )
    };
    if s == OK {
        Ok(())
    } else {
        Err(s)
    }
}

/// Add a header value.
pub fn add_header(map: MapType, key: &str, value: &str) -> Result<(), RawStatus> {
    // SAFETY: pointers and lengths of live slices.
    let s = unsafe {
        proxy_add_header_map_value(
            map as u32,
            key.as_ptr(),
            key.len(),
            value.as_ptr(),
            value.len(),
        )
    };
    if s == OK {
        Ok(())
    } else {
        Err(s)
    }
}

/// Remove a header.
pub fn remove_header(map: MapType, key: &str) -> Result<(), RawStatus> {
    // SAFETY: pointer and length of a live slice.
    let s = unsafe { proxy_remove_header_map_value(map as u32, key.as_ptr(), key.len()) };
    if s == OK || s == NOT_FOUND {
        Ok(())
    } else {
        Err(s)
    }
}

/// Up to `max` bytes of a buffer from `start`; `Ok(None)` when there is none.
pub fn get_buffer(
    buffer: BufferType,
    start: usize,
    max: usize,
) -> Result<Option<Vec<u8>>, RawStatus> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: as in `get_header`.
    match unsafe { proxy_get_buffer_bytes(buffer as u32, start, max, &mut data, &mut size) } {
        OK => Ok(unsafe { take(data, size) }),
        NOT_FOUND => Ok(None),
        status => Err(status),
    }
}

/// Replace `size` bytes at `start` of a buffer with `value`.
pub fn set_buffer(
    buffer: BufferType,
    start: usize,
    size: usize,
    value: &[u8],
) -> Result<(), RawStatus> {
    // SAFETY: pointer and length of a live slice.
    let s =
        unsafe { proxy_set_buffer_bytes(buffer as u32, start, size, value.as_ptr(), value.len()) };
    if s == OK {
        Ok(())
    } else {
        Err(s)
    }
}

/// Send a local reply.
pub fn send_local_response(
    status: u32,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<(), RawStatus> {
    let map = serialize_map(headers);
    let (body_ptr, body_len) = if body.is_empty() {
        (null(), 0)
    } else {
        (body.as_ptr(), body.len())
    };
    // SAFETY: pointers and lengths of live slices.
    let s = unsafe {
        proxy_send_local_response(
            status,
            null(),
            0,
            body_ptr,
            body_len,
            map.as_ptr(),
            map.len(),
            -1,
        )
    };
    if s == OK {
        Ok(())
    } else {
        Err(s)
    }
}

/// The proxy-wasm map format: count, (key length, value length) pairs, then NUL-terminated
/// keys and values.
pub fn serialize_map(map: &[(&str, &str)]) -> Vec<u8> {
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
        bytes.extend_from_slice(v.as_bytes());
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
    }
}
