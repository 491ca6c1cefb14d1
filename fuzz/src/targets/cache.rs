//! `tollgate_cache`'s header parsers: `Cache-Control`, `Age`, HTTP dates (`Expires`, `Date`,
//! `Last-Modified`, `If-Modified-Since`), `Vary` and `Range`, and the freshness decision built
//! on them. Each gets text made of the tokens that matter to it and checks cheap invariants.

use arbitrary::{Result, Unstructured};
use tollgate_cache::freshness::{
    facts, freshness, stale_if_error, RequestDirectives, StoringRequest,
};
use tollgate_cache::key::{variant_hash, vary_names};
use tollgate_cache::parse::{
    age, byte_range, http_date, AgeValue, ByteRange, CacheControl, Delta, DELTA_MAX,
};
use tollgate_common::http_date::{DAYS, LONG_DAYS, MONTHS};

use crate::gen::text;

const CC_TOKENS: &[&str] = &[
    "max-age",
    "MAX-AGE",
    "s-maxage",
    "no-cache",
    "No-Cache",
    "no-store",
    "private",
    "public",
    "must-revalidate",
    "proxy-revalidate",
    "immutable",
    "stale-while-revalidate",
    "stale-if-error",
    "max-stale",
    "min-fresh",
    "only-if-cached",
    "=",
    ",",
    ", ",
    "\"",
    "\\",
    "0",
    "60",
    "-1",
    "2147483648",
    "99999999999999999999999",
    " ",
    "=\"a,b\"",
];
const AGE_TOKENS: &[&str] = &[
    "0",
    "7200",
    ",",
    ", ",
    "-",
    ".",
    "abc",
    " ",
    "\"",
    "2147483649",
];
const DATE_TOKENS: &[&str] = &[
    "Sun", "Sunday", ", ", ",", " ", "  ", "06", "6", "Nov", "nov", "1994", "94", "08:49:37",
    "GMT", "UTC", "-", ":", "29", "Feb", "2028", "24:00:00", "9999", "1969",
];
const VARY_TOKENS: &[&str] = &[
    "Accept",
    "accept-language",
    "Accept-Encoding",
    "*",
    ",",
    ", ",
    " ",
    "X-Tenant",
    "",
];
const RANGE_TOKENS: &[&str] = &[
    "bytes",
    "Bytes",
    "=",
    "-",
    ",",
    "0",
    "1",
    "5",
    "10",
    " ",
    "items",
    "99999999999999999999",
];

/// One input drives every parser: the bytes choose the texts and the numbers.
pub fn parsers(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let _ = check_cache_control(&mut u);
    let _ = check_age(&mut u);
    let _ = check_dates(&mut u);
    let _ = check_vary(&mut u);
    let _ = check_range(&mut u);
    let _ = check_freshness(&mut u);
}

fn deltas(cc: &CacheControl) -> [Option<Delta>; 6] {
    [
        cc.max_age,
        cc.s_maxage,
        cc.stale_while_revalidate,
        cc.stale_if_error,
        cc.min_fresh,
        cc.max_stale,
    ]
}

fn check_cache_control(u: &mut Unstructured<'_>) -> Result<()> {
    let lines = [text(u, CC_TOKENS, 12)?, text(u, CC_TOKENS, 6)?];
    let cc = CacheControl::parse(lines.iter().map(String::as_str));
    // Names are case-insensitive (and the values that matter are digits).
    let lower: Vec<String> = lines.iter().map(|l| l.to_ascii_lowercase()).collect();
    let upper: Vec<String> = lines.iter().map(|l| l.to_ascii_uppercase()).collect();
    assert_eq!(
        cc,
        CacheControl::parse(lower.iter().map(String::as_str)),
        "{lines:?}"
    );
    assert_eq!(
        cc,
        CacheControl::parse(upper.iter().map(String::as_str)),
        "{lines:?}"
    );
    assert!(cc.present);
    for d in deltas(&cc).into_iter().flatten() {
        assert!(d.secs().is_none_or(|s| s <= DELTA_MAX), "{lines:?}");
    }
    // A directive generated on its own is read back.
    let n: u64 = u.arbitrary()?;
    let one = CacheControl::parse([format!("Max-Age={n}").as_str()]);
    assert_eq!(one.max_age, Some(Delta::Secs(n.min(DELTA_MAX))));
    assert_eq!(
        cc.forbids_stale(),
        cc.no_cache || cc.must_revalidate || cc.proxy_revalidate || cc.s_maxage.is_some()
    );
    Ok(())
}

fn check_age(u: &mut Unstructured<'_>) -> Result<()> {
    let s = text(u, AGE_TOKENS, 6)?;
    let got = age([s.as_str()]);
    if let AgeValue::Secs(n) = got {
        assert!(n <= DELTA_MAX, "{s:?}");
    }
    // The first member decides; later members and lines do not matter.
    if !s.contains(',') {
        assert_eq!(age([format!("{s}, 0").as_str()]), got, "{s:?}");
        assert_eq!(age([s.as_str(), "0"]), got, "{s:?}");
    }
    let n: u64 = u.arbitrary()?;
    assert_eq!(
        age([n.to_string().as_str()]),
        AgeValue::Secs(n.min(DELTA_MAX))
    );
    assert_eq!(age(std::iter::empty::<&str>()), AgeValue::Absent);
    Ok(())
}

/// Civil date of a day count since 1970-01-01 (H. Hinnant's algorithm).
fn civil(days: u64) -> (u64, usize, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, usize::try_from(m - 1).unwrap_or(0), d)
}

fn check_dates(u: &mut Unstructured<'_>) -> Result<()> {
    let s = text(u, DATE_TOKENS, 10)?;
    if let Some(t) = http_date(&s) {
        assert!(t < 253_402_300_800, "{s:?}"); // before year 10000
    }
    // Every instant from 1970 to 9999 round-trips through the three formats.
    let t = u.int_in_range(0..=253_402_300_799u64)?;
    let (y, m, d) = civil(t / 86_400);
    // 1970-01-01 was a Thursday (index 3, Monday first).
    let wd = usize::try_from((t / 86_400 + 3) % 7).unwrap_or(0);
    let hms = format!("{:02}:{:02}:{:02}", (t / 3600) % 24, (t / 60) % 60, t % 60);
    let (day, long, mon) = (DAYS[wd], LONG_DAYS[wd], MONTHS[m]);
    let imf = format!("{day}, {d:02} {mon} {y} {hms} GMT");
    assert_eq!(http_date(&imf), Some(t), "{imf}");
    let asctime = format!("{day} {mon} {d:>2} {hms} {y}");
    assert_eq!(http_date(&asctime), Some(t), "{asctime}");
    if (1970..2070).contains(&y) {
        let rfc850 = format!("{long}, {d:02}-{mon}-{:02} {hms} GMT", y % 100);
        assert_eq!(http_date(&rfc850), Some(t), "{rfc850}");
    }
    // Doubled spaces are never a date (an invalid `Expires` is already expired).
    assert_eq!(http_date(&imf.replacen(' ', "  ", 1)), None, "{imf}");
    Ok(())
}

fn check_vary(u: &mut Unstructured<'_>) -> Result<()> {
    let lines = [text(u, VARY_TOKENS, 8)?, text(u, VARY_TOKENS, 4)?];
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    let star = refs
        .iter()
        .flat_map(|l| l.split(','))
        .any(|n| n.trim() == "*");
    match vary_names(&refs) {
        None => assert!(star, "{lines:?}"),
        Some(names) => {
            assert!(!star, "{lines:?}");
            let mut sorted = names.clone();
            sorted.sort();
            sorted.dedup();
            assert_eq!(names, sorted, "{lines:?}");
            assert!(names
                .iter()
                .all(|n| !n.is_empty() && *n == n.to_ascii_lowercase()));
            // The variant does not depend on the case of the request's header names.
            let value = text(u, VARY_TOKENS, 3)?;
            let req: Vec<(String, String)> =
                names.iter().map(|n| (n.clone(), value.clone())).collect();
            let upper: Vec<(String, String)> = names
                .iter()
                .map(|n| (n.to_ascii_uppercase(), value.clone()))
                .collect();
            assert_eq!(
                variant_hash(&req, &[], &names),
                variant_hash(&upper, &[], &names)
            );
        }
    }
    Ok(())
}

fn check_range(u: &mut Unstructured<'_>) -> Result<()> {
    let s = text(u, RANGE_TOKENS, 8)?;
    let len = u.int_in_range(0..=1u64 << 20)?;
    match byte_range(&s, len) {
        ByteRange::Range { first, last } => assert!(first <= last && last < len, "{s:?} {len}"),
        ByteRange::Unsatisfiable | ByteRange::Ignore => {}
    }
    let (a, b): (u32, u32) = (u.arbitrary()?, u.arbitrary()?);
    let (a, b) = (u64::from(a.min(b)), u64::from(a.max(b)));
    let want = if a < len {
        ByteRange::Range {
            first: a,
            last: b.min(len - 1),
        }
    } else {
        ByteRange::Unsatisfiable
    };
    assert_eq!(byte_range(&format!("bytes={a}-{b}"), len), want);
    Ok(())
}

fn check_freshness(u: &mut Unstructured<'_>) -> Result<()> {
    let mut response = vec![("cache-control".to_string(), text(u, CC_TOKENS, 10)?)];
    for name in ["age", "expires", "date", "last-modified", "etag"] {
        if u.arbitrary()? {
            let dict = if name == "age" {
                AGE_TOKENS
            } else {
                DATE_TOKENS
            };
            response.push((name.to_string(), text(u, dict, 8)?));
        }
    }
    let request = vec![("cache-control".to_string(), text(u, CC_TOKENS, 8)?)];
    let status = *u.choose(&[200u16, 203, 204, 301, 404, 410, 500, 503])?;
    let at: u64 = u.int_in_range(0..=1u64 << 45)?;
    let Ok(f) = facts(
        status,
        &response,
        StoringRequest {
            authorization: u.arbitrary()?,
        },
        at,
    ) else {
        return Ok(());
    };
    let now: u64 = u.arbitrary()?;
    let req = RequestDirectives::of(&request);
    let _ = freshness(&f, &req, now, u.arbitrary()?);
    if f.no_stale() {
        assert_eq!(
            stale_if_error(&f, now, Some(u64::MAX)),
            None,
            "{response:?}"
        );
    }
    Ok(())
}
