//! Research spike: an Envoy 1.40 dynamic-module HTTP filter (see docs/dynamic-modules.md).
//!
//! Hand-written bindings for the few functions of Envoy's dynamic-modules C ABI
//! (`source/extensions/dynamic_modules/abi/abi.h`) this filter uses. The signatures were checked
//! against the Envoy 1.40.0 binary we ship (exported `envoy_dynamic_module_callback_*` symbols and
//! their register use).
//!
//! The filter config (the `filter_config` string of the Envoy config) is a comma-separated list
//! of the operations to do per request, so that one library measures each step:
//! - `path`: read the request's `:path` (one header read) and match the `/bench/rl` prefix;
//! - `clock`: read the wall clock (a plain `clock_gettime`, no call into Envoy);
//! - `bucket`: take a token from a GCRA bucket shared by all workers (a `Mutex` in the config:
//!   the workers are threads of one process, so this is exact cross-worker state);
//! - `counter`: increment one Envoy counter (the outcome counter);
//! - `headers`: add the two rate-limit response fields (`RateLimit-Policy`, `RateLimit`).
//!
//! An empty config (or `noop`) is a pass-through that still gets every stream hook.
#![allow(clippy::missing_safety_doc)]

use std::ffi::c_void;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

// ---------------------------------------------------------------------------------------------
// ABI types (abi.h): a buffer is a (pointer, length) pair passed by value.
// ---------------------------------------------------------------------------------------------

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Buffer {
    ptr: *const u8,
    length: usize,
}

impl Buffer {
    const fn of(s: &[u8]) -> Buffer {
        Buffer {
            ptr: s.as_ptr(),
            length: s.len(),
        }
    }
    unsafe fn as_bytes<'a>(self) -> &'a [u8] {
        if self.ptr.is_null() {
            &[]
        } else {
            std::slice::from_raw_parts(self.ptr, self.length)
        }
    }
}

type EnvoyPtr = *mut c_void;
type ModulePtr = *const c_void;

/// `envoy_dynamic_module_type_http_header_type`.
const REQUEST_HEADER: u32 = 0;
const RESPONSE_HEADER: u32 = 2;
/// `*_status_Continue` of every stream hook, `metrics_result_Success`.
const CONTINUE: u32 = 0;

extern "C" {
    fn envoy_dynamic_module_callback_http_get_header(
        filter_envoy_ptr: EnvoyPtr,
        header_type: u32,
        key: Buffer,
        result: *mut Buffer,
        index: usize,
        optional_size: *mut usize,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_add_header(
        filter_envoy_ptr: EnvoyPtr,
        header_type: u32,
        key: Buffer,
        value: Buffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_filter_config_define_counter(
        config_envoy_ptr: EnvoyPtr,
        name: Buffer,
        label_names: *const Buffer,
        label_names_length: usize,
        counter_id: *mut usize,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_increment_counter(
        filter_envoy_ptr: EnvoyPtr,
        id: usize,
        label_values: *const Buffer,
        label_values_length: usize,
        value: u64,
    ) -> u32;
}

// ---------------------------------------------------------------------------------------------
// The filter.
// ---------------------------------------------------------------------------------------------

/// GCRA with the ratelimit-never scenario's numbers: 1,000,000 per second, burst 1e9.
const EMISSION_NS: u64 = 1_000; // 1 s / 1,000,000
const TOLERANCE_NS: u64 = EMISSION_NS * 1_000_000_000;

struct Config {
    path: bool,
    clock: bool,
    bucket: bool,
    counter: bool,
    headers: bool,
    counter_id: usize,
    /// Theoretical arrival time (ns since the epoch) of the one bucket, shared by all workers.
    tat: Mutex<u64>,
}

struct Filter {
    config: *const Config,
    remaining: u64,
    matched: bool,
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

impl Config {
    /// GCRA take: returns the tokens left, or None when refused.
    fn take(&self, now: u64) -> Option<u64> {
        let Ok(mut tat) = self.tat.lock() else {
            return Some(0);
        }; // poisoned: fail open
        let new_tat = (*tat).max(now) + EMISSION_NS;
        let allow_at = new_tat.saturating_sub(TOLERANCE_NS + EMISSION_NS);
        if now < allow_at {
            return None;
        }
        *tat = new_tat;
        Some((now + TOLERANCE_NS).saturating_sub(new_tat) / EMISSION_NS)
    }
}

/// Decimal digits of `n` into `buf`, returning the used tail.
fn itoa(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const std::ffi::c_char {
    // ENVOY_DYNAMIC_MODULES_ABI_VERSION of Envoy 1.40.0's abi.h. Envoy compares it with its own
    // and only logs a warning when they differ.
    c"v0.2.0".as_ptr()
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    config_envoy_ptr: EnvoyPtr,
    _name: Buffer,
    config: Buffer,
) -> ModulePtr {
    let text = config.as_bytes();
    let has = |op: &[u8]| text.split(|&c| c == b',').any(|w| w.trim_ascii() == op);
    let mut cfg = Config {
        path: has(b"path"),
        clock: has(b"clock"),
        bucket: has(b"bucket"),
        counter: has(b"counter"),
        headers: has(b"headers"),
        counter_id: 0,
        tat: Mutex::new(0),
    };
    if cfg.counter {
        let rc = envoy_dynamic_module_callback_http_filter_config_define_counter(
            config_envoy_ptr,
            Buffer::of(b"allowed"),
            std::ptr::null(),
            0,
            &mut cfg.counter_id,
        );
        if rc != CONTINUE {
            return std::ptr::null();
        }
    }
    Box::into_raw(Box::new(cfg)) as ModulePtr
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(config: ModulePtr) {
    if !config.is_null() {
        drop(Box::from_raw(config as *mut Config));
    }
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_new(
    config: ModulePtr,
    _filter_envoy_ptr: EnvoyPtr,
) -> ModulePtr {
    let filter = Filter {
        config: config as *const Config,
        remaining: 0,
        matched: false,
    };
    Box::into_raw(Box::new(filter)) as ModulePtr
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_destroy(filter: ModulePtr) {
    if !filter.is_null() {
        drop(Box::from_raw(filter as *mut Filter));
    }
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    envoy: EnvoyPtr,
    filter: ModulePtr,
    _end_of_stream: bool,
) -> u32 {
    let f = &mut *(filter as *mut Filter);
    let cfg = &*f.config;
    f.matched = true;
    if cfg.path {
        let mut value = Buffer {
            ptr: std::ptr::null(),
            length: 0,
        };
        envoy_dynamic_module_callback_http_get_header(
            envoy,
            REQUEST_HEADER,
            Buffer::of(b":path"),
            &mut value,
            0,
            std::ptr::null_mut(),
        );
        f.matched = value.as_bytes().starts_with(b"/bench/rl");
    }
    if !f.matched {
        return CONTINUE;
    }
    let now = if cfg.clock { now_ns() } else { 0 };
    if cfg.bucket {
        f.remaining = cfg.take(now).unwrap_or(0);
    }
    if cfg.counter {
        envoy_dynamic_module_callback_http_filter_increment_counter(
            envoy,
            cfg.counter_id,
            std::ptr::null(),
            0,
            1,
        );
    }
    CONTINUE
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
    envoy: EnvoyPtr,
    filter: ModulePtr,
    _end_of_stream: bool,
) -> u32 {
    let f = &*(filter as *const Filter);
    let cfg = &*f.config;
    if cfg.headers && f.matched {
        envoy_dynamic_module_callback_http_add_header(
            envoy,
            RESPONSE_HEADER,
            Buffer::of(b"ratelimit-policy"),
            Buffer::of(b"\"bench-never\";q=1000000;w=1"),
        );
        // "bench-never";r=<remaining>;t=0
        let mut value = [0u8; 64];
        let mut digits = [0u8; 20];
        let head = b"\"bench-never\";r=";
        let r = itoa(f.remaining, &mut digits);
        let tail = b";t=0";
        let n = head.len() + r.len() + tail.len();
        value[..head.len()].copy_from_slice(head);
        value[head.len()..head.len() + r.len()].copy_from_slice(r);
        value[head.len() + r.len()..n].copy_from_slice(tail);
        envoy_dynamic_module_callback_http_add_header(
            envoy,
            RESPONSE_HEADER,
            Buffer::of(b"ratelimit"),
            Buffer::of(&value[..n]),
        );
    }
    CONTINUE
}

// The remaining hooks Envoy 1.40 looks up when it loads an HTTP filter: pass-through.

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
    _: EnvoyPtr,
    _: ModulePtr,
    _: bool,
) -> u32 {
    CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
    _: EnvoyPtr,
    _: ModulePtr,
) -> u32 {
    CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
    _: EnvoyPtr,
    _: ModulePtr,
    _: bool,
) -> u32 {
    CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(
    _: EnvoyPtr,
    _: ModulePtr,
) -> u32 {
    CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(_: EnvoyPtr, _: ModulePtr) {}

// Callouts, streams, the scheduler and watermarks are never started by this filter, so Envoy
// never calls these; they only have to exist (Envoy 1.40 refuses a module without them).
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done() {}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers() {}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data() {}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers() {}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete() {}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset() {}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_scheduled() {}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark()
{
}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark()
{
}
