//! Small request helpers: query strings, percent-decoding and cookies.

/// Split `/path?query` into `("/path", "query")`; the query is empty when absent.
pub fn split_query(path_and_query: &str) -> (&str, &str) {
    match path_and_query.split_once('?') {
        Some((p, q)) => (p, q.split('#').next().unwrap_or("")),
        None => (path_and_query.split('#').next().unwrap_or(""), ""),
    }
}

/// Decode `%XX` escapes (and `+` as space when `plus_as_space`). Invalid escapes are kept as
/// written; invalid UTF-8 is replaced.
pub fn percent_decode(s: &str, plus_as_space: bool) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok());
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' if plus_as_space => out.push(b' '),
            _ => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Percent-encode everything but RFC 3986 unreserved characters.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The decoded `name=value` pairs of a query string, in order.
pub fn query_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k, true), percent_decode(v, true))
        })
        .collect()
}

/// The first value of a query parameter.
pub fn query_param(query: &str, name: &str) -> Option<String> {
    query_pairs(query)
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
}

/// The value of a cookie in a `Cookie` header (`a=1; b=2`). Surrounding quotes are removed.
pub fn cookie(header: &str, name: &str) -> Option<String> {
    header.split(';').find_map(|part| {
        let (k, v) = part.trim().split_once('=')?;
        (k.trim() == name).then(|| v.trim().trim_matches('"').to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_and_cookies() {
        assert_eq!(split_query("/a/b?x=1&y=2"), ("/a/b", "x=1&y=2"));
        assert_eq!(split_query("/a"), ("/a", ""));
        assert_eq!(split_query("/a?x#frag"), ("/a", "x"));
        assert_eq!(
            query_param("a=1&key=s%20e+c&key=2", "key").as_deref(),
            Some("s e c")
        );
        assert_eq!(query_param("a=1", "key"), None);
        assert_eq!(query_param("flag", "flag").as_deref(), Some(""));
        assert_eq!(
            cookie("a=1; session=\"xyz\"; b=2", "session").as_deref(),
            Some("xyz")
        );
        assert_eq!(cookie("a=1", "session"), None);
        assert_eq!(percent_decode("%zz%41%", false), "%zzA%");
        assert_eq!(percent_decode("a+b", false), "a+b");
        assert_eq!(percent_encode("a b/é~"), "a%20b%2F%C3%A9~");
    }
}
