//! RFC 9111 decisions as pure functions on a few numbers: whether a response may be stored
//! ([`facts`]), and whether a stored response may answer a request ([`freshness`],
//! [`stale_if_error`]). The facts are computed once, when a response is stored, and kept with
//! the entry: a hit parses nothing but the request's own `Cache-Control`.

use crate::parse::{age, http_date, AgeValue, CacheControl, Delta};

/// May a response with this status be stored at all? Any final status (negative caching of
/// 4xx and 5xx included, #14.8) but `206` (partial content is not combined) and `304` (it
/// only updates a stored response), given explicit freshness, `public`, or a heuristically
/// cacheable status (RFC 9111 3).
pub fn storable_status(status: u16) -> bool {
    (200..600).contains(&status) && status != 206 && status != 304
}
/// Statuses heuristically cacheable (RFC 9110 15.1).
pub const HEURISTIC_STATUSES: &[u16] =
    &[200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501];
/// Share of the time since `Last-Modified` used as heuristic freshness (RFC 9111 4.2.2).
pub const HEURISTIC_FRACTION: u64 = 10;
/// `immutable` responses without `max-age` / `s-maxage` are fresh at least this long.
pub const IMMUTABLE_MIN_SECS: u64 = 24 * 3600;

/// The response forbids serving it stale (`no-cache`, `must-revalidate`, `proxy-revalidate`,
/// `s-maxage`).
pub const NO_STALE: u8 = 1;
/// `no-cache`: never reused without validation.
pub const NO_CACHE: u8 = 2;

/// What a stored response's reuse depends on, computed when it is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Facts {
    /// Response time (ms since the epoch).
    pub at: u64,
    /// Corrected initial age (s, RFC 9111 4.2.3).
    pub age: u64,
    /// Freshness lifetime (s, RFC 9111 4.2.1), 0 when stale from the start.
    pub life: u64,
    /// [`NO_STALE`], [`NO_CACHE`].
    pub flags: u8,
    /// `stale-while-revalidate` window (s).
    pub swr: Option<u64>,
    /// `stale-if-error` window (s).
    pub sie: Option<u64>,
    /// `Last-Modified`, else `Date` (s since the epoch): what `If-Modified-Since` compares.
    pub modified: Option<u64>,
}

/// What the storing request says.
#[derive(Debug, Clone, Copy, Default)]
pub struct StoringRequest {
    /// It carried `Authorization`.
    pub authorization: bool,
}

/// May a shared cache store this response, and what are its facts? `Err` gives the reason.
/// RFC 9111 3 and 3.5; plus: a response with neither freshness nor validators nor a stale
/// extension is not stored, as it could never be reused (#14.7).
pub fn facts(
    status: u16,
    response: &[(String, String)],
    request: StoringRequest,
    response_time_ms: u64,
) -> Result<Facts, &'static str> {
    let cc = CacheControl::of(response);
    let has = |name: &str| response.iter().any(|(k, _)| k.eq_ignore_ascii_case(name));
    if !storable_status(status) || cc.no_store || cc.private {
        return Err("not-storable");
    }
    if request.authorization && !(cc.public || cc.must_revalidate || cc.s_maxage.is_some()) {
        return Err("not-storable");
    }
    let explicit = cc.max_age.is_some() || cc.s_maxage.is_some() || has("expires");
    if !(explicit || cc.public || HEURISTIC_STATUSES.contains(&status)) {
        return Err("not-storable");
    }
    let date = first(response, "date").and_then(http_date);
    let response_time = response_time_ms / 1000;
    // RFC 9111 5.1: the first member of a list; an invalid value (`abc`, `-7200`, `7200.0`)
    // is ignored as a whole, so the age comes from `Date` alone.
    let age_secs = match age(all(response, "age")) {
        AgeValue::Secs(s) => s,
        AgeValue::Absent | AgeValue::Invalid => 0,
    };
    // RFC 9111 4.2.3, the response delay taken as zero.
    let apparent = date.map_or(0, |d| response_time.saturating_sub(d));
    let initial_age = apparent.max(age_secs);
    let life = lifetime(status, &cc, response, date.unwrap_or(response_time));
    let mut flags = 0;
    if cc.forbids_stale() {
        flags |= NO_STALE;
    }
    if cc.no_cache {
        flags |= NO_CACHE;
    }
    let last_modified = first(response, "last-modified").and_then(http_date);
    let validators = has("etag") || last_modified.is_some();
    let swr = cc.stale_while_revalidate.and_then(Delta::secs);
    let sie = cc.stale_if_error.and_then(Delta::secs);
    let fresh_at_all = life > 0 && flags & NO_CACHE == 0;
    if !fresh_at_all && !validators && swr.is_none() && sie.is_none() {
        return Err("not-reusable");
    }
    Ok(Facts {
        at: response_time_ms,
        age: initial_age,
        life,
        flags,
        swr,
        sie,
        modified: last_modified.or(date),
    })
}

/// Freshness lifetime (RFC 9111 4.2.1 for a shared cache, 4.2.2 heuristics). `date` is the
/// response's `Date`, or its response time.
fn lifetime(status: u16, cc: &CacheControl, response: &[(String, String)], date: u64) -> u64 {
    if cc.no_cache {
        return 0;
    }
    if let Some(d) = cc.s_maxage.or(cc.max_age) {
        // An invalid value: treated as stale (RFC 9111 4.2.1).
        return d.secs().unwrap_or(0);
    }
    let floor = if cc.immutable { IMMUTABLE_MIN_SECS } else { 0 };
    let expires: Vec<&str> = all(response, "expires").collect();
    if let Some(first) = expires.first() {
        // RFC 9111 5.3: an invalid date (or several different values) means already expired.
        let valid = expires.iter().all(|e| e == first);
        return match http_date(first).filter(|_| valid) {
            Some(e) => floor.max(e.saturating_sub(date)),
            None => 0,
        };
    }
    if !(HEURISTIC_STATUSES.contains(&status) || cc.public) {
        return floor;
    }
    let heuristic = first(response, "last-modified")
        .and_then(http_date)
        .map_or(0, |lm| date.saturating_sub(lm) / HEURISTIC_FRACTION);
    floor.max(heuristic)
}

/// Directives whose value is delta-seconds: in a targeted field it must be an Integer
/// (RFC 9213 2.1), e.g. `max-age="10000"` (a String) makes the field invalid.
const INTEGER_DIRECTIVES: [&str; 4] = [
    "max-age",
    "s-maxage",
    "stale-while-revalidate",
    "stale-if-error",
];

/// Is a targeted field's value valid, i.e. a Structured Fields dictionary (RFC 9213 2.1,
/// RFC 8941 3.2): lower-case keys, values that are integers, tokens or quoted strings, and an
/// Integer for the delta-seconds directives?
pub fn valid_targeted(value: &str) -> bool {
    let mut any = false;
    for member in crate::parse::list_members(value) {
        let member = member.trim_matches(|c| c == ' ' || c == '\t');
        let (key, val) = match member.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (member, None),
        };
        let mut chars = key.chars();
        let first_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '*');
        let rest_ok =
            chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_-.*".contains(c));
        if !first_ok || !rest_ok || !val.is_none_or(sf_bare_item) {
            return false;
        }
        if INTEGER_DIRECTIVES.contains(&key) && !val.is_some_and(sf_integer) {
            return false;
        }
        any = true;
    }
    any
}

fn sf_integer(v: &str) -> bool {
    let digits = v.strip_prefix('-').unwrap_or(v);
    !digits.is_empty() && digits.len() <= 15 && digits.bytes().all(|b| b.is_ascii_digit())
}

fn sf_bare_item(v: &str) -> bool {
    if let Some(inner) = v.strip_prefix('"').and_then(|x| x.strip_suffix('"')) {
        return inner.chars().all(|c| (' '..='~').contains(&c));
    }
    if sf_integer(v) {
        return true;
    }
    let mut chars = v.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '*' || c == '?')
        && chars.all(|c| c.is_ascii_graphic() && !"\"(),;<=>@[]{}\\".contains(c))
}

/// The header fields the freshness decision reads (RFC 9213 2.2): with a valid targeted field
/// (the first of `targeted`, in order, that is present and valid), that field's value stands
/// in for `Cache-Control`, and `Expires` is ignored; otherwise the headers as they are.
pub fn targeted_view<'a>(
    headers: &'a [(String, String)],
    targeted: &[String],
) -> std::borrow::Cow<'a, [(String, String)]> {
    let chosen = targeted.iter().find_map(|t| {
        let lines: Vec<&str> = all(headers, t).collect();
        let joined = lines.join(", ");
        (!lines.is_empty() && valid_targeted(&joined)).then_some(joined)
    });
    let Some(value) = chosen else {
        return std::borrow::Cow::Borrowed(headers);
    };
    let mut out: Vec<(String, String)> = headers
        .iter()
        .filter(|(k, _)| {
            !k.eq_ignore_ascii_case("cache-control") && !k.eq_ignore_ascii_case("expires")
        })
        .cloned()
        .collect();
    out.push(("cache-control".to_string(), value));
    std::borrow::Cow::Owned(out)
}

fn all<'a>(headers: &'a [(String, String)], name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    headers
        .iter()
        .filter(move |(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn first<'a>(headers: &'a [(String, String)], name: &'a str) -> Option<&'a str> {
    all(headers, name).next()
}

impl Facts {
    /// Current age in seconds at `now_ms` (RFC 9111 4.2.3).
    pub fn age_at(&self, now_ms: u64) -> u64 {
        self.age
            .saturating_add(now_ms.saturating_sub(self.at) / 1000)
    }

    /// The response forbids serving it stale.
    pub fn no_stale(&self) -> bool {
        self.flags & NO_STALE != 0
    }
}

/// The request's side of reuse: its `Cache-Control` (and `Pragma: no-cache` without one).
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestDirectives {
    /// Parsed `Cache-Control`.
    pub cc: CacheControl,
    /// `no-cache` or `Pragma: no-cache` without `Cache-Control`.
    pub no_cache: bool,
}

impl RequestDirectives {
    /// Read them from request headers.
    pub fn of(request: &[(String, String)]) -> RequestDirectives {
        let cc = CacheControl::of(request);
        let pragma = !cc.present
            && request
                .iter()
                .any(|(k, v)| k.eq_ignore_ascii_case("pragma") && v.contains("no-cache"));
        RequestDirectives {
            cc,
            no_cache: cc.no_cache || pragma,
        }
    }
}

/// May a stored response answer a request?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Yes: fresh, or stale within the request's `max-stale`. `ttl` is negative when stale.
    Fresh {
        /// Current age (s).
        age: u64,
        /// Remaining freshness (s).
        ttl: i64,
    },
    /// Stale within `stale-while-revalidate`: serve it and refresh in the background.
    StaleWhileRevalidate {
        /// Current age (s).
        age: u64,
        /// Seconds past its lifetime.
        stale_by: u64,
    },
    /// No: ask the origin (with the entry's validators).
    Revalidate,
}

fn signed(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The reuse decision (RFC 9111 4, 4.2.4, 5.2.1; RFC 5861 3). `background_refresh`: this
/// rule can refresh in the background (else a `stale-while-revalidate` entry is revalidated
/// in line).
pub fn freshness(
    f: &Facts,
    req: &RequestDirectives,
    now_ms: u64,
    background_refresh: bool,
) -> Verdict {
    if req.no_cache || f.flags & NO_CACHE != 0 {
        return Verdict::Revalidate;
    }
    let age = f.age_at(now_ms);
    if req
        .cc
        .max_age
        .and_then(Delta::secs)
        .is_some_and(|m| age > m)
    {
        return Verdict::Revalidate;
    }
    let ttl = signed(f.life).saturating_sub(signed(age));
    if req
        .cc
        .min_fresh
        .and_then(Delta::secs)
        .is_some_and(|m| ttl < signed(m))
    {
        return Verdict::Revalidate;
    }
    if f.life > age {
        return Verdict::Fresh { age, ttl };
    }
    if f.no_stale() {
        return Verdict::Revalidate;
    }
    let stale_by = age - f.life;
    match req.cc.max_stale {
        Some(Delta::Secs(m)) if m > stale_by => return Verdict::Fresh { age, ttl },
        // `max-stale` without a (valid) value: any staleness.
        Some(Delta::Invalid) => return Verdict::Fresh { age, ttl },
        _ => {}
    }
    match f.swr {
        Some(w) if background_refresh && stale_by < w => {
            Verdict::StaleWhileRevalidate { age, stale_by }
        }
        _ => Verdict::Revalidate,
    }
}

/// May a stale entry answer instead of an origin error (RFC 5861 4, RFC 9111 4.2.4)? Its own
/// `stale-if-error` window, else the rule's; never when the response forbids stale use.
/// Returns the entry's current age.
pub fn stale_if_error(f: &Facts, now_ms: u64, rule_window_secs: Option<u64>) -> Option<u64> {
    if f.no_stale() {
        return None;
    }
    let age = f.age_at(now_ms);
    let stale_by = age.saturating_sub(f.life);
    let window = f.sie.or(rule_window_secs)?;
    (stale_by <= window).then_some(age)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    type Fields<'a> = &'a [(&'a str, &'a str)];

    const T0: u64 = 1_767_225_600; // Thu, 01 Jan 2026 00:00:00 GMT
    const ANON: StoringRequest = StoringRequest {
        authorization: false,
    };
    const AUTH: StoringRequest = StoringRequest {
        authorization: true,
    };

    fn at(secs: u64) -> u64 {
        (T0 + secs) * 1000
    }

    fn f(status: u16, res: &[(&str, &str)]) -> Result<Facts, &'static str> {
        facts(status, &h(res), ANON, at(0))
    }

    #[test]
    fn storability_table() {
        let cases: &[(StoringRequest, u16, Fields, bool)] = &[
            (ANON, 200, &[("cache-control", "max-age=60")], true),
            (ANON, 200, &[("cache-control", "public, max-age=60")], true),
            (
                ANON,
                200,
                &[("cache-control", "private, max-age=60")],
                false,
            ),
            (
                ANON,
                200,
                &[("cache-control", "PRIVATE, max-age=60")],
                false,
            ),
            (ANON, 200, &[("cache-control", "no-store")], false),
            (
                ANON,
                200,
                &[("cache-control", "No-Store, max-age=60")],
                false,
            ),
            (AUTH, 200, &[("cache-control", "max-age=60")], false),
            (AUTH, 200, &[("cache-control", "public, max-age=60")], true),
            (AUTH, 200, &[("cache-control", "s-maxage=60")], true),
            (
                AUTH,
                200,
                &[("cache-control", "must-revalidate, max-age=60")],
                true,
            ),
            // #14.8: any final status with explicit freshness; heuristics only where allowed
            (ANON, 500, &[("cache-control", "max-age=60")], true),
            (
                ANON,
                503,
                &[("expires", "Thu, 01 Jan 2026 00:10:00 GMT")],
                true,
            ),
            (
                ANON,
                404,
                &[("last-modified", "Wed, 31 Dec 2025 00:00:00 GMT")],
                true,
            ),
            (
                ANON,
                500,
                &[("last-modified", "Wed, 31 Dec 2025 00:00:00 GMT")],
                false,
            ),
            (
                ANON,
                302,
                &[("cache-control", "public"), ("etag", "\"a\"")],
                true,
            ),
            (ANON, 206, &[("cache-control", "max-age=60")], false),
            (ANON, 304, &[("cache-control", "max-age=60")], false),
            (ANON, 101, &[("cache-control", "max-age=60")], false),
            (
                ANON,
                200,
                &[("expires", "Thu, 01 Jan 2026 00:10:00 GMT")],
                true,
            ),
            // #14.7: neither freshness nor validators
            (ANON, 200, &[("cache-control", "max-age=0")], false),
            (
                ANON,
                200,
                &[("cache-control", "no-cache, max-age=60")],
                false,
            ),
            (
                ANON,
                200,
                &[("cache-control", "no-cache"), ("etag", "\"a\"")],
                true,
            ),
            (
                ANON,
                200,
                &[("cache-control", "max-age=0, stale-if-error=60")],
                true,
            ),
            (ANON, 200, &[("expires", "0")], false),
            (ANON, 200, &[("x", "y")], false),
            (
                ANON,
                200,
                &[("last-modified", "Wed, 31 Dec 2025 00:00:00 GMT")],
                true,
            ),
        ];
        for (req, status, res, want) in cases {
            let got = facts(*status, &h(res), *req, at(0));
            assert_eq!(got.is_ok(), *want, "{req:?} {status} {res:?}: {got:?}");
        }
    }

    #[test]
    fn lifetime_and_age_table() {
        let lm = ("last-modified", "Wed, 31 Dec 2025 00:00:00 GMT");
        let date = ("date", "Thu, 01 Jan 2026 00:00:00 GMT");
        let cases: &[(Fields, u64, u64)] = &[
            (&[("cache-control", "max-age=60")], 60, 0),
            (&[("cache-control", "MAX-AGE=60")], 60, 0),
            (&[("cache-control", "max-age=0, s-maxage=60")], 60, 0),
            (&[("cache-control", "max-age=60"), ("expires", "0")], 60, 0),
            (&[("cache-control", "max-age=abc"), lm], 0, 0),
            (
                &[("expires", "Thu, 01 Jan 2026 00:10:00 GMT"), date],
                600,
                0,
            ),
            (
                &[("expires", "Thursday, 01-Jan-26 00:10:00 GMT"), date],
                600,
                0,
            ),
            (&[("expires", "Thu Jan  1 00:10:00 2026"), date], 600, 0),
            // doubled space: invalid, already expired
            (
                &[("expires", "Thu, 01 Jan 2026  00:10:00 GMT"), date, lm],
                0,
                0,
            ),
            (&[lm, date], 8640, 0),
            (
                &[("cache-control", "immutable"), lm, date],
                IMMUTABLE_MIN_SECS,
                0,
            ),
            (
                &[("cache-control", "max-age=3600"), ("age", "7200, 0")],
                3600,
                7200,
            ),
            (
                &[
                    ("cache-control", "max-age=3600"),
                    ("age", "0"),
                    ("age", "7200"),
                ],
                3600,
                0,
            ),
            // an invalid Age is ignored (RFC 9111 5.1): the age comes from Date alone
            (
                &[("cache-control", "max-age=3600"), ("age", "abc"), lm],
                3600,
                0,
            ),
            (
                &[("cache-control", "max-age=3600"), ("age", "-7200"), lm],
                3600,
                0,
            ),
            (
                &[
                    ("cache-control", "max-age=3600"),
                    ("age", "7200.0"),
                    ("date", "Wed, 31 Dec 2025 23:00:00 GMT"),
                ],
                3600,
                3600,
            ),
            // apparent age from Date
            (
                &[
                    ("cache-control", "max-age=3600"),
                    ("date", "Wed, 31 Dec 2025 23:00:00 GMT"),
                ],
                3600,
                3600,
            ),
            (
                &[("cache-control", "max-age=3600"), ("age", "99999999999999")],
                3600,
                2_147_483_648,
            ),
        ];
        for (res, life, age) in cases {
            let got = f(200, res).unwrap_or_else(|e| panic!("{res:?}: {e}"));
            assert_eq!((got.life, got.age), (*life, *age), "{res:?}");
        }
    }

    fn verdict(res: &str, req: Option<&str>, secs: u64, bg: bool) -> Verdict {
        let facts = f(200, &[("cache-control", res), ("etag", "\"a\"")]).unwrap();
        let mut r = h(&[("host", "x")]);
        if let Some(cc) = req {
            r.push(("cache-control".into(), cc.into()));
        }
        freshness(&facts, &RequestDirectives::of(&r), at(secs), bg)
    }

    #[test]
    fn freshness_table() {
        use Verdict::*;
        let fresh = |age, ttl| Fresh { age, ttl };
        let cases: &[(&str, Option<&str>, u64, Verdict)] = &[
            ("max-age=60", None, 10, fresh(10, 50)),
            ("max-age=60", None, 60, Revalidate),
            ("max-age=60", Some("no-cache"), 10, Revalidate),
            ("max-age=60", Some("No-Cache"), 10, Revalidate),
            ("max-age=60", Some("max-age=5"), 10, Revalidate),
            ("max-age=60", Some("max-age=50"), 10, fresh(10, 50)),
            ("max-age=60", Some("max-age=x"), 10, fresh(10, 50)),
            ("max-age=60", Some("min-fresh=55"), 10, Revalidate),
            ("max-age=60", Some("max-stale=30"), 80, fresh(80, -20)),
            ("max-age=60", Some("max-stale=10"), 80, Revalidate),
            ("max-age=60", Some("max-stale"), 5000, fresh(5000, -4940)),
            (
                "max-age=60, must-revalidate",
                Some("max-stale"),
                80,
                Revalidate,
            ),
            ("max-age=60, proxy-revalidate", None, 10, fresh(10, 50)),
            (
                "max-age=60, proxy-revalidate",
                Some("max-stale"),
                80,
                Revalidate,
            ),
            ("s-maxage=60", Some("max-stale"), 80, Revalidate),
            ("no-cache, max-age=60", None, 0, Revalidate),
            ("no-cache, max-age=60", Some("max-stale"), 0, Revalidate),
            (
                "max-age=10, stale-while-revalidate=30",
                None,
                20,
                StaleWhileRevalidate {
                    age: 20,
                    stale_by: 10,
                },
            ),
            (
                "max-age=10, stale-while-revalidate=30",
                None,
                20,
                StaleWhileRevalidate {
                    age: 20,
                    stale_by: 10,
                },
            ),
            (
                "max-age=10, stale-while-revalidate=30",
                None,
                45,
                Revalidate,
            ),
            (
                "max-age=10, stale-while-revalidate=30",
                Some("no-cache"),
                20,
                Revalidate,
            ),
            (
                "max-age=10, must-revalidate, stale-while-revalidate=30",
                None,
                20,
                Revalidate,
            ),
            (
                "s-maxage=10, stale-while-revalidate=30",
                None,
                20,
                Revalidate,
            ),
        ];
        for (res, req, secs, want) in cases {
            assert_eq!(
                verdict(res, *req, *secs, true),
                *want,
                "{res} / {req:?} at +{secs}"
            );
        }
        assert_eq!(
            verdict("max-age=10, stale-while-revalidate=30", None, 20, false),
            Revalidate
        );
        let pragma = h(&[("pragma", "no-cache")]);
        let facts = f(200, &[("cache-control", "max-age=60")]).unwrap();
        assert_eq!(
            freshness(&facts, &RequestDirectives::of(&pragma), at(1), true),
            Revalidate
        );
    }

    #[test]
    fn targeted_fields_take_precedence() {
        let t = vec![
            "tollgate-cache-control".to_string(),
            "cdn-cache-control".to_string(),
        ];
        let life = |res: &[(&str, &str)]| {
            let hs = h(res);
            f(
                200,
                &targeted_view(&hs, &t)
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect::<Vec<_>>(),
            )
            .map(|x| x.life)
        };
        let cc = ("cache-control", "max-age=60");
        assert_eq!(life(&[cc, ("cdn-cache-control", "max-age=600")]), Ok(600));
        assert_eq!(
            life(&[
                cc,
                ("cdn-cache-control", "max-age=600"),
                ("tollgate-cache-control", "max-age=6")
            ]),
            Ok(6)
        );
        // an invalid targeted field is ignored (upper case keys are not a dictionary)
        assert_eq!(life(&[cc, ("cdn-cache-control", "Max-Age=600")]), Ok(60));
        assert_eq!(life(&[cc, ("cdn-cache-control", "max-age=6x0")]), Ok(60));
        // a valid one replaces Cache-Control and Expires entirely
        assert_eq!(
            life(&[
                ("cache-control", "private"),
                ("cdn-cache-control", "max-age=60")
            ]),
            Ok(60)
        );
        assert_eq!(
            life(&[
                ("cache-control", "max-age=60"),
                ("cdn-cache-control", "no-store")
            ]),
            Err("not-storable")
        );
        for (v, ok) in [
            ("max-age=60", true),
            (
                "max-age=60, stale-while-revalidate=30, must-revalidate",
                true,
            ),
            ("no-cache=\"set-cookie\"", true),
            ("", false),
            ("MAX-AGE=1", false),
            ("max-age=1.5x", false),
            ("a=(b)", false),
            // the cache-tests suite's cdn-cc-invalid-sh-type-wrong: a String, not an Integer
            ("max-age=\"10000\"", false),
            ("s-maxage=abc", false),
            ("stale-if-error", false),
            ("max-age=60, stale-while-revalidate=\"30\"", false),
            ("private=\"x-a\", max-age=60", true),
        ] {
            assert_eq!(valid_targeted(v), ok, "{v}");
        }
    }

    #[test]
    fn stale_if_error_table() {
        let cases: &[(&str, Option<u64>, u64, Option<u64>)] = &[
            ("max-age=1, stale-if-error=60", None, 30, Some(30)),
            ("max-age=1, stale-if-error=60", None, 62, None),
            ("max-age=1", Some(3600), 30, Some(30)),
            ("max-age=1", None, 30, None),
            // #14.1: never where the response forbids stale
            (
                "max-age=1, must-revalidate, stale-if-error=60",
                None,
                30,
                None,
            ),
            (
                "max-age=1, proxy-revalidate, stale-if-error=60",
                None,
                30,
                None,
            ),
            ("no-cache, stale-if-error=60", Some(3600), 30, None),
            ("s-maxage=1, stale-if-error=60", Some(3600), 30, None),
            ("max-age=1, Must-Revalidate", Some(3600), 30, None),
        ];
        for (res, rule, secs, want) in cases {
            let facts = f(200, &[("cache-control", res), ("etag", "\"a\"")]).unwrap();
            assert_eq!(
                stale_if_error(&facts, at(*secs), *rule),
                *want,
                "{res} {rule:?} +{secs}"
            );
        }
    }

    #[test]
    fn absurd_values_do_not_overflow() {
        let res = [
            (
                "cache-control",
                "max-age=18446744073709551615, stale-if-error=99999999999999999999",
            ),
            ("age", "18446744073709551615"),
            ("expires", "Fri, 31 Dec 9999 23:59:59 GMT"),
            ("last-modified", "Mon, 01 Jan 0001 00:00:00 GMT"),
        ];
        let facts = f(200, &res).unwrap();
        let r = h(&[("cache-control", "max-stale=18446744073709551615, min-fresh=18446744073709551615, max-age=18446744073709551615")]);
        for now in [0, u64::MAX, at(1 << 28)] {
            let _ = freshness(&facts, &RequestDirectives::of(&r), now, true);
            let _ = stale_if_error(&facts, now, Some(u64::MAX));
            let _ = facts.age_at(now);
        }
    }
}
