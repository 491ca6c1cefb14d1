//! Pure parsers of the header fields the cache decides on: `Cache-Control` (RFC 9111 5.2),
//! `Age` (5.1) and HTTP dates (RFC 9110 5.6.7, the one parser of `tollgate_common::http_date`).
//! No host calls, no allocation per directive; each has a table test and a property target in
//! `fuzz/`.

/// HTTP dates are read by the one parser in common (the demo service uses it too).
pub use tollgate_common::http_date::http_date;

/// The largest delta-seconds kept: RFC 9111 1.2.2 says a value too large to hold is 2^31.
pub const DELTA_MAX: u64 = 2_147_483_648;

/// A directive's delta-seconds argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delta {
    /// A valid number of seconds (at most [`DELTA_MAX`]).
    Secs(u64),
    /// Present without a value, with a value that is not a non-negative integer, or given twice
    /// with different values (RFC 9111 4.2.1: invalid freshness information).
    Invalid,
}

impl Delta {
    /// The seconds, `None` when invalid.
    pub fn secs(self) -> Option<u64> {
        match self {
            Delta::Secs(s) => Some(s),
            Delta::Invalid => None,
        }
    }
}

/// The directives of one message's `Cache-Control` fields (every line), names compared without
/// regard to case (RFC 9111 5.2). A field-list argument (`no-cache="set-cookie"`,
/// `private="x"`) is read as the unqualified directive: the conservative reading a cache may
/// take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CacheControl {
    /// At least one `Cache-Control` field line was present.
    pub present: bool,
    /// `no-store`.
    pub no_store: bool,
    /// `no-cache`.
    pub no_cache: bool,
    /// `private`.
    pub private: bool,
    /// `public`.
    pub public: bool,
    /// `must-revalidate`.
    pub must_revalidate: bool,
    /// `proxy-revalidate`.
    pub proxy_revalidate: bool,
    /// `immutable` (RFC 8246).
    pub immutable: bool,
    /// `only-if-cached` (request).
    pub only_if_cached: bool,
    /// `max-age`.
    pub max_age: Option<Delta>,
    /// `s-maxage`.
    pub s_maxage: Option<Delta>,
    /// `stale-while-revalidate` (RFC 5861).
    pub stale_while_revalidate: Option<Delta>,
    /// `stale-if-error` (RFC 5861).
    pub stale_if_error: Option<Delta>,
    /// `min-fresh` (request).
    pub min_fresh: Option<Delta>,
    /// `max-stale` (request): `Invalid` also stands for "without a value" (any staleness).
    pub max_stale: Option<Delta>,
}

/// Split a field value on the commas that are not inside a quoted string.
pub fn list_members(value: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(value);
    std::iter::from_fn(move || {
        let s = rest?;
        let mut quoted = false;
        let mut escaped = false;
        for (i, c) in s.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' if quoted => escaped = true,
                '"' => quoted = !quoted,
                ',' if !quoted => {
                    rest = s.get(i + 1..);
                    return s.get(..i);
                }
                _ => {}
            }
        }
        rest = None;
        Some(s)
    })
}

/// Parse delta-seconds (`1*DIGIT`, optionally quoted), saturating at [`DELTA_MAX`].
pub fn delta_seconds(value: &str) -> Delta {
    let v = value.trim();
    let v = v
        .strip_prefix('"')
        .and_then(|x| x.strip_suffix('"'))
        .unwrap_or(v);
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Delta::Invalid;
    }
    let mut n: u64 = 0;
    for b in v.bytes() {
        n = n.saturating_mul(10).saturating_add(u64::from(b - b'0'));
        if n >= DELTA_MAX {
            return Delta::Secs(DELTA_MAX);
        }
    }
    Delta::Secs(n)
}

fn set_delta(slot: &mut Option<Delta>, value: Option<&str>) {
    let d = value.map_or(Delta::Invalid, delta_seconds);
    *slot = match *slot {
        Some(prev) if prev != d => Some(Delta::Invalid),
        _ => Some(d),
    };
}

impl CacheControl {
    /// Parse the values of every `Cache-Control` line of a message.
    pub fn parse<'a>(lines: impl IntoIterator<Item = &'a str>) -> CacheControl {
        let mut cc = CacheControl::default();
        for line in lines {
            cc.present = true;
            for member in list_members(line) {
                let (name, value) = match member.split_once('=') {
                    Some((n, v)) => (n.trim(), Some(v)),
                    None => (member.trim(), None),
                };
                cc.apply(name, value);
            }
        }
        cc
    }

    /// Parse the `Cache-Control` lines found in a header list.
    pub fn of(headers: &[(String, String)]) -> CacheControl {
        CacheControl::parse(
            headers
                .iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case("cache-control"))
                .map(|(_, v)| v.as_str()),
        )
    }

    fn apply(&mut self, name: &str, value: Option<&str>) {
        let is = |n: &str| name.eq_ignore_ascii_case(n);
        let flag = if is("no-store") {
            Some(&mut self.no_store)
        } else if is("no-cache") {
            Some(&mut self.no_cache)
        } else if is("private") {
            Some(&mut self.private)
        } else if is("public") {
            Some(&mut self.public)
        } else if is("must-revalidate") {
            Some(&mut self.must_revalidate)
        } else if is("proxy-revalidate") {
            Some(&mut self.proxy_revalidate)
        } else if is("immutable") {
            Some(&mut self.immutable)
        } else if is("only-if-cached") {
            Some(&mut self.only_if_cached)
        } else {
            None
        };
        if let Some(f) = flag {
            *f = true;
            return;
        }
        let slot = if is("max-age") {
            &mut self.max_age
        } else if is("s-maxage") {
            &mut self.s_maxage
        } else if is("stale-while-revalidate") {
            &mut self.stale_while_revalidate
        } else if is("stale-if-error") {
            &mut self.stale_if_error
        } else if is("min-fresh") {
            &mut self.min_fresh
        } else if is("max-stale") {
            &mut self.max_stale
        } else {
            return;
        };
        set_delta(slot, value);
    }

    /// The response forbids serving it stale to a shared cache (RFC 9111 4.2.4, 5.2.2):
    /// `no-cache`, `must-revalidate`, `proxy-revalidate` or `s-maxage`.
    pub fn forbids_stale(&self) -> bool {
        self.no_cache || self.must_revalidate || self.proxy_revalidate || self.s_maxage.is_some()
    }
}

/// The `Age` of a response (RFC 9111 5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgeValue {
    /// No `Age` field.
    Absent,
    /// Seconds (at most [`DELTA_MAX`]).
    Secs(u64),
    /// Not a non-negative integer: the response is to be considered stale.
    Invalid,
}

/// Parse the `Age` lines of a response: a list or a repeated field uses its first member.
pub fn age<'a>(lines: impl IntoIterator<Item = &'a str>) -> AgeValue {
    let Some(first) = lines.into_iter().next() else {
        return AgeValue::Absent;
    };
    let member = first.split(',').next().unwrap_or("").trim();
    match delta_seconds(member) {
        // Quotes are not allowed in `Age`.
        Delta::Secs(s) if !member.starts_with('"') => AgeValue::Secs(s),
        _ => AgeValue::Invalid,
    }
}

/// A `Range` request header read against a stored representation of `len` bytes
/// (RFC 9110 14.1.2, 14.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRange {
    /// One satisfiable range: bytes `first..=last` (`last < len`).
    Range {
        /// First byte.
        first: u64,
        /// Last byte (inclusive).
        last: u64,
    },
    /// Valid, but no byte of it exists: `416` with `Content-Range: bytes */len`.
    Unsatisfiable,
    /// Not a single valid byte range (another unit, several ranges, bad syntax): the whole
    /// representation is sent, as a server may ignore `Range`.
    Ignore,
}

/// Read a `Range` header value for a representation of `len` bytes. Only one range is served
/// from the cache; several ranges are ignored (a `200` with everything).
pub fn byte_range(value: &str, len: u64) -> ByteRange {
    let Some((unit, set)) = value.trim().split_once('=') else {
        return ByteRange::Ignore;
    };
    if !unit.trim().eq_ignore_ascii_case("bytes") || set.contains(',') {
        return ByteRange::Ignore;
    }
    let Some((a, b)) = set.trim().split_once('-') else {
        return ByteRange::Ignore;
    };
    let num = |s: &str| delta_seconds_exact(s).ok_or(());
    match (a.is_empty(), b.is_empty()) {
        // `bytes=-N`: the last N bytes
        (true, false) => match num(b) {
            Err(()) => ByteRange::Ignore,
            Ok(0) => ByteRange::Unsatisfiable,
            Ok(_) if len == 0 => ByteRange::Unsatisfiable,
            Ok(n) => ByteRange::Range {
                first: len.saturating_sub(n),
                last: len - 1,
            },
        },
        // `bytes=F-`: from F to the end
        (false, true) => match num(a) {
            Err(()) => ByteRange::Ignore,
            Ok(f) if f >= len => ByteRange::Unsatisfiable,
            Ok(f) => ByteRange::Range {
                first: f,
                last: len - 1,
            },
        },
        (false, false) => match (num(a), num(b)) {
            (Ok(f), Ok(l)) if f <= l => {
                if f >= len {
                    ByteRange::Unsatisfiable
                } else {
                    ByteRange::Range {
                        first: f,
                        last: l.min(len - 1),
                    }
                }
            }
            _ => ByteRange::Ignore,
        },
        (true, true) => ByteRange::Ignore,
    }
}

/// `1*DIGIT` as a number; `None` for anything else or an overflow.
fn delta_seconds_exact(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_control_table() {
        let s = |v| Some(Delta::Secs(v));
        let cases: &[(&[&str], CacheControl)] = &[
            (&[], CacheControl::default()),
            (
                &["No-CaChE, MaX-AgE=60"],
                CacheControl {
                    present: true,
                    no_cache: true,
                    max_age: s(60),
                    ..Default::default()
                },
            ),
            (
                &[
                    "max-age=1, stale-while-revalidate=30",
                    "stale-if-error=\"60\"",
                ],
                CacheControl {
                    present: true,
                    max_age: s(1),
                    stale_while_revalidate: s(30),
                    stale_if_error: s(60),
                    ..Default::default()
                },
            ),
            (
                &["private=\"set-cookie, x-a\", S-MAXAGE=99999999999999999999"],
                CacheControl {
                    present: true,
                    private: true,
                    s_maxage: s(DELTA_MAX),
                    ..Default::default()
                },
            ),
            (
                &["max-age=60", "max-age=30"],
                CacheControl {
                    present: true,
                    max_age: Some(Delta::Invalid),
                    ..Default::default()
                },
            ),
            (
                &["max-age=60, max-age=60, max-age=-1x"],
                CacheControl {
                    present: true,
                    max_age: Some(Delta::Invalid),
                    ..Default::default()
                },
            ),
            (
                &["max-stale, min-fresh=5, only-if-cached, no-store"],
                CacheControl {
                    present: true,
                    max_stale: Some(Delta::Invalid),
                    min_fresh: s(5),
                    only_if_cached: true,
                    no_store: true,
                    ..Default::default()
                },
            ),
            (
                &["PUBLIC,Must-Revalidate ,proxy-revalidate, immutable,,=, x=\"a,b\""],
                CacheControl {
                    present: true,
                    public: true,
                    must_revalidate: true,
                    proxy_revalidate: true,
                    immutable: true,
                    ..Default::default()
                },
            ),
        ];
        for (lines, want) in cases {
            assert_eq!(
                CacheControl::parse(lines.iter().copied()),
                *want,
                "{lines:?}"
            );
        }
    }

    #[test]
    fn forbids_stale_table() {
        for (v, want) in [
            ("max-age=1", false),
            ("max-age=1, must-revalidate", true),
            ("max-age=1, Proxy-Revalidate", true),
            ("no-cache", true),
            ("s-maxage=5", true),
            ("max-age=1, stale-if-error=60", false),
        ] {
            assert_eq!(CacheControl::parse([v]).forbids_stale(), want, "{v}");
        }
    }

    #[test]
    fn age_table() {
        let cases: &[(&[&str], AgeValue)] = &[
            (&[], AgeValue::Absent),
            (&["0"], AgeValue::Secs(0)),
            (&[" 7200 "], AgeValue::Secs(7200)),
            (&["7200, 0"], AgeValue::Secs(7200)),
            (&["7200,0"], AgeValue::Secs(7200)),
            (&["0,7200"], AgeValue::Secs(0)),
            (&["7200", "0"], AgeValue::Secs(7200)),
            (&["0", "7200"], AgeValue::Secs(0)),
            (&["18446744073709551616"], AgeValue::Secs(DELTA_MAX)),
            (&["abc"], AgeValue::Invalid),
            (&["-7200"], AgeValue::Invalid),
            (&["7200.0"], AgeValue::Invalid),
            (&["\"5\""], AgeValue::Invalid),
            (&[""], AgeValue::Invalid),
        ];
        for (lines, want) in cases {
            assert_eq!(age(lines.iter().copied()), *want, "{lines:?}");
        }
    }

    #[test]
    fn byte_range_table() {
        use ByteRange::*;
        let r = |first, last| Range { first, last };
        let cases = [
            ("bytes=0-4", 10, r(0, 4)),
            ("bytes=5-", 10, r(5, 9)),
            ("bytes=-3", 10, r(7, 9)),
            ("bytes=-30", 10, r(0, 9)),
            ("bytes=8-100", 10, r(8, 9)),
            ("Bytes = 0-0", 10, r(0, 0)),
            ("bytes=10-", 10, Unsatisfiable),
            ("bytes=10-20", 10, Unsatisfiable),
            ("bytes=-0", 10, Unsatisfiable),
            ("bytes=-5", 0, Unsatisfiable),
            ("bytes=0-", 0, Unsatisfiable),
            ("bytes=5-4", 10, Ignore),
            ("bytes=0-1,3-4", 10, Ignore),
            ("items=0-1", 10, Ignore),
            ("bytes=-", 10, Ignore),
            ("bytes=a-1", 10, Ignore),
            ("bytes=1-a", 10, Ignore),
            ("bytes=+1-2", 10, Ignore),
            ("bytes=99999999999999999999999-", 10, Ignore),
            ("bytes", 10, Ignore),
            ("", 10, Ignore),
        ];
        for (v, len, want) in cases {
            assert_eq!(byte_range(v, len), want, "{v:?} of {len}");
        }
    }

    #[test]
    fn list_members_respect_quotes() {
        let got: Vec<&str> = list_members(r#"a, b="x,\"y", c"#).collect();
        assert_eq!(got, vec!["a", r#" b="x,\"y""#, " c"]);
        assert_eq!(list_members("").collect::<Vec<_>>(), vec![""]);
    }
}
