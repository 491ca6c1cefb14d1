//! `tollgate_common`: the request helpers (query strings, percent-decoding, cookies), the
//! configuration scalars (durations, sizes, header names, names, SHA-256 digests) and the
//! proxy-wasm map format.

use arbitrary::{Result, Unstructured};
use tollgate_common::config::{parse_duration, parse_size, HeaderName, Name, Sha256Hex};
use tollgate_common::request::{
    cookie, percent_decode, percent_encode, query_pairs, query_param, split_query,
};

use crate::gen::text;

const QUERY_TOKENS: &[&str] = &[
    "api_key", "key", "=", "&", "+", "%20", "%2B", "%3D", "%26", "?", "#", "a=1", "%", "%4", "%G0",
];
const COOKIE_TOKENS: &[&str] = &["session", "=", ";", "; ", "\"", "\"\"", "a=1", " ", "=;"];
const SCALAR_TOKENS: &[&str] = &[
    "ms",
    "s",
    "m",
    "h",
    "d",
    "B",
    "KB",
    "KiB",
    "MB",
    "MiB",
    "GB",
    "GiB",
    ".",
    "1",
    "0",
    "9",
    "e",
    "1e309",
    "-",
    "18446744073709551615",
    "NaN",
    "inf",
    " ",
];

/// Query strings, percent-encoding and cookies. The bytes are used twice: as a
/// `path?query` or `Cookie` header, and to build such text from tokens.
pub fn request(data: &[u8]) {
    if let Ok(s) = std::str::from_utf8(data) {
        check_text(s);
        let _ = cookie(s, "session");
    }
    let mut u = Unstructured::new(data);
    let _ = check_request(&mut u);
}

fn check_text(s: &str) {
    // Encoding round-trips, and the encoded form is unreserved characters and escapes only.
    let enc = percent_encode(s);
    assert!(
        enc.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~%".contains(&b)),
        "{enc:?}"
    );
    assert_eq!(percent_decode(&enc, false), s);
    assert_eq!(percent_decode(&enc, true), s);
    let _ = percent_decode(s, false);
    let _ = percent_decode(s, true);
    // Splitting: the path has no `?`, the query no `#`, both are pieces of the input.
    let (p, q) = split_query(s);
    assert!(
        !p.contains('?') && !q.contains('#') && s.starts_with(p),
        "{s:?}"
    );
    let pairs = query_pairs(s);
    assert!(pairs.len() <= s.split('&').count());
    if let Some((k, v)) = pairs.first() {
        assert_eq!(query_param(s, k).as_ref(), Some(v));
    }
}

fn check_request(u: &mut Unstructured<'_>) -> Result<()> {
    let s = text(u, QUERY_TOKENS, 16)?;
    check_text(&s);
    let name = text(u, QUERY_TOKENS, 3)?;
    let _ = query_param(&s, &name);
    // Pairs written with percent_encode come back as written.
    let mut written = Vec::new();
    for _ in 0..u.int_in_range(0..=4)? {
        written.push((text(u, QUERY_TOKENS, 3)?, text(u, QUERY_TOKENS, 4)?));
    }
    let query = written
        .iter()
        .map(|(k, v)| format!("{}={}", percent_encode(k), percent_encode(v)))
        .collect::<Vec<_>>()
        .join("&");
    let back = query_pairs(&query);
    assert_eq!(back, written, "{query:?}");
    if let Some((k, v)) = written.first() {
        assert_eq!(query_param(&query, k).as_deref(), Some(v.as_str()));
    }
    // Cookies: arbitrary headers, and a cookie written plainly is found.
    let header = text(u, COOKIE_TOKENS, 12)?;
    let _ = cookie(&header, &name);
    let cname = text(u, &["session", "id", "a"], 2)?;
    let cvalue = text(u, &["v", "x", "1"], 3)?;
    let plain = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric());
    if plain(&cname) && cvalue.chars().all(|c| c.is_ascii_alphanumeric()) {
        let h = format!("other=1; {cname}={cvalue}; {cname}=second");
        let want = if cname == "other" {
            "1"
        } else {
            cvalue.as_str()
        };
        assert_eq!(cookie(&h, &cname).as_deref(), Some(want), "{h:?}");
    }
    Ok(())
}

/// Durations, sizes, header names, names and SHA-256 digests as configurations write them.
/// The bytes are used twice: as the text, and to build text from tokens.
pub fn scalars(data: &[u8]) {
    if let Ok(s) = std::str::from_utf8(data) {
        check_scalar_text(s);
    }
    let mut u = Unstructured::new(data);
    let _ = check_scalars(&mut u);
}

fn check_scalars(u: &mut Unstructured<'_>) -> Result<()> {
    let s = text(u, SCALAR_TOKENS, 8)?;
    check_scalar_text(&s);
    // A digest written as hex parses back to itself, in either case.
    let bytes: [u8; 32] = u.arbitrary()?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let upper = hex.to_ascii_uppercase();
    assert!(Sha256Hex::parse(&hex).is_ok_and(|d| d.0 == bytes));
    assert!(Sha256Hex::parse(&upper).is_ok_and(|d| d.0 == bytes));
    Ok(())
}

fn check_scalar_text(s: &str) {
    if let Ok(d) = parse_duration(s) {
        assert!(d.as_secs_f64() <= 1.0e9, "{s:?} gave {d:?}");
    }
    if let Ok(n) = parse_size(s) {
        let digits: String = s.trim().chars().take_while(char::is_ascii_digit).collect();
        assert!(n >= digits.parse::<u64>().unwrap_or(0), "{s:?} gave {n}");
    }
    match HeaderName::new(s) {
        Ok(h) => {
            assert_eq!(h.as_str(), s.to_ascii_lowercase());
            assert!(tollgate_common::config::is_token(s));
        }
        Err(e) => assert!(!e.is_empty()),
    }
    if Name::new(s).is_ok() {
        assert!(Name::valid(s) && !s.is_empty());
    }
    if let Ok(d) = Sha256Hex::parse(s) {
        let again: String = d.0.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(again, s.to_ascii_lowercase());
    }
}

/// The proxy-wasm map format: arbitrary bytes never panic and never yield more pairs than
/// the bytes can hold; a serialized map comes back whole, and a truncated one as a prefix.
pub fn abi_map(data: &[u8]) {
    let pairs = tollgate_common::deserialize_map(data);
    // Each pair takes 8 bytes of lengths and at least one terminator.
    assert!(pairs.len() <= data.len() / 9 + 1, "{} pairs", pairs.len());
    let mut u = Unstructured::new(data);
    let _ = check_map(&mut u);
}

fn check_map(u: &mut Unstructured<'_>) -> Result<()> {
    let mut owned = Vec::new();
    for _ in 0..u.int_in_range(0..=6)? {
        owned.push((text(u, &[":path", "x-a"], 3)?, text(u, &["v", ""], 4)?));
    }
    let map: Vec<(&str, &str)> = owned
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let bytes = tollgate_common::serialize_map(&map);
    let back = tollgate_common::deserialize_map(&bytes);
    let want: Vec<(String, Vec<u8>)> = owned
        .iter()
        .map(|(k, v)| (k.clone(), v.as_bytes().to_vec()))
        .collect();
    assert_eq!(back, want);
    let cut = u.int_in_range(0..=bytes.len())?;
    let partial = tollgate_common::deserialize_map(bytes.get(..cut).unwrap_or(&[]));
    assert!(partial.len() <= want.len());
    assert_eq!(partial[..], want[..partial.len()], "cut at {cut}");
    Ok(())
}
