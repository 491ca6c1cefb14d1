//! HTTP dates (RFC 9110 5.6.7): the three formats read to seconds since the epoch. One parser
//! for the cache filter (`Date`, `Expires`, `Last-Modified`, `If-Modified-Since`) and the demo
//! service (`If-Modified-Since` against its `Last-Modified`). Pure: no host calls, no allocation
//! beyond splitting one value.

/// Day names of IMF-fixdate and asctime, Monday first.
pub const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
/// Day names of RFC 850 dates, Monday first.
pub const LONG_DAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];
/// Month names, January first.
pub const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

fn digits(s: &str, n: usize) -> Option<u64> {
    if s.len() != n || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn month(s: &str) -> Option<u64> {
    MONTHS.iter().position(|m| *m == s).map(|i| i as u64 + 1)
}

/// `HH:MM:SS` to seconds of the day.
fn time_of_day(s: &str) -> Option<u64> {
    let mut it = s.split(':');
    let h = digits(it.next()?, 2)?;
    let m = digits(it.next()?, 2)?;
    let sec = digits(it.next()?, 2)?;
    if it.next().is_some() || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    Some(h * 3600 + m * 60 + sec)
}

/// Seconds since the epoch of a civil date (proleptic Gregorian, 1970..=9999).
fn epoch_secs(year: u64, month: u64, day: u64, secs_of_day: u64) -> Option<u64> {
    const DAYS_IN: [u64; 12] = [31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let max_day = match month {
        2 if !leap => 28,
        m => *DAYS_IN.get(usize::try_from(m.checked_sub(1)?).ok()?)?,
    };
    if !(1970..=9999).contains(&year) || day == 0 || day > max_day {
        return None;
    }
    let (y, mm) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let era = y / 400;
    let yoe = y - era * 400;
    let doy = (153 * mm + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = (era * 146_097 + doe).checked_sub(719_468)?;
    Some(days * 86400 + secs_of_day)
}

/// Parse an HTTP date in any of the three formats of RFC 9110 5.6.7 (IMF-fixdate
/// `Sun, 06 Nov 1994 08:49:37 GMT`, RFC 850 `Sunday, 06-Nov-94 08:49:37 GMT`, asctime
/// `Sun Nov  6 08:49:37 1994`) to seconds since the epoch. Anything else (doubled spaces, a
/// zone other than GMT, `0`) is `None`: an invalid `Expires` means already expired.
/// RFC 850's two-digit years: 70-99 are 19xx, 00-69 20xx.
pub fn http_date(s: &str) -> Option<u64> {
    imf_fixdate(s)
        .or_else(|| rfc850_date(s))
        .or_else(|| asctime_date(s))
}

fn imf_fixdate(s: &str) -> Option<u64> {
    // `Sun, 06 Nov 1994 08:49:37 GMT`
    let (day_name, rest) = s.split_once(", ")?;
    if !DAYS.contains(&day_name) {
        return None;
    }
    let p: Vec<&str> = rest.split(' ').collect();
    let [day, mon, year, time, zone] = p.as_slice() else {
        return None;
    };
    if *zone != "GMT" {
        return None;
    }
    epoch_secs(
        digits(year, 4)?,
        month(mon)?,
        digits(day, 2)?,
        time_of_day(time)?,
    )
}

fn rfc850_date(s: &str) -> Option<u64> {
    // `Sunday, 06-Nov-94 08:49:37 GMT`
    let (day_name, rest) = s.split_once(", ")?;
    if !LONG_DAYS.contains(&day_name) {
        return None;
    }
    let p: Vec<&str> = rest.split(' ').collect();
    let [date, time, zone] = p.as_slice() else {
        return None;
    };
    if *zone != "GMT" {
        return None;
    }
    let d: Vec<&str> = date.split('-').collect();
    let [day, mon, yy] = d.as_slice() else {
        return None;
    };
    let yy = digits(yy, 2)?;
    let year = if yy >= 70 { 1900 + yy } else { 2000 + yy };
    epoch_secs(year, month(mon)?, digits(day, 2)?, time_of_day(time)?)
}

fn asctime_date(s: &str) -> Option<u64> {
    // `Sun Nov  6 08:49:37 1994` (the day is two digits or a space and a digit)
    let day_name = s.get(..3)?;
    let mon = s.get(4..7)?;
    if !DAYS.contains(&day_name) || s.get(3..4)? != " " || s.get(7..8)? != " " {
        return None;
    }
    let day_part = s.get(8..10)?;
    let day = match day_part.strip_prefix(' ') {
        Some(d) => digits(d, 1)?,
        None => digits(day_part, 2)?,
    };
    if s.get(10..11)? != " " || s.get(19..20)? != " " || s.len() != 24 {
        return None;
    }
    epoch_secs(
        digits(s.get(20..24)?, 4)?,
        month(mon)?,
        day,
        time_of_day(s.get(11..19)?)?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_date_table() {
        const T: Option<u64> = Some(784_111_777); // 1994-11-06T08:49:37Z
        let cases = [
            ("Sun, 06 Nov 1994 08:49:37 GMT", T),
            ("Sunday, 06-Nov-94 08:49:37 GMT", T),
            ("Sun Nov  6 08:49:37 1994", T),
            ("Thu, 01 Jan 2026 00:00:00 GMT", Some(1_767_225_600)),
            ("Thursday, 01-Jan-26 00:00:00 GMT", Some(1_767_225_600)),
            ("Thu Jan  1 00:00:00 2026", Some(1_767_225_600)),
            ("Sat, 29 Feb 2028 12:00:00 GMT", Some(1_835_438_400)),
            ("Sun, 06 Nov 1994  08:49:37 GMT", None),
            ("Sun,  06 Nov 1994 08:49:37 GMT", None),
            ("Sun, 06 Nov 1994 08:49:37 UTC", None),
            ("Sun, 6 Nov 1994 08:49:37 GMT", None),
            ("Sun, 06 Nov 94 08:49:37 GMT", None),
            ("Sun, 31 Feb 1994 08:49:37 GMT", None),
            ("Sun, 29 Feb 2027 08:49:37 GMT", None),
            ("Sun, 06 Nov 1994 24:00:00 GMT", None),
            ("Sun, 06 Nov 1969 08:49:37 GMT", None),
            ("Xyz, 06 Nov 1994 08:49:37 GMT", None),
            ("Sun Nov 06 08:49:37 1994", T),
            ("Sun Nov 6 08:49:37 1994", None),
            ("Sun Nov  6 08:49:37 1994 ", None),
            ("0", None),
            ("", None),
            ("garbage", None),
        ];
        for (s, want) in cases {
            assert_eq!(http_date(s), want, "{s:?}");
        }
    }
}
