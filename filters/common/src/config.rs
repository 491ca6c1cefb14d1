//! Configuration parsing: JSON into typed structs, with errors that name the field and why.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use std::time::Duration;

/// A refused configuration: which field, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Path of the field, such as `routes[0].match.path`; `(root)` for the whole document.
    pub field: String,
    /// Why the value is refused.
    pub reason: String,
}

impl ConfigError {
    /// An error for a field.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError {
            field: field.into(),
            reason: reason.into(),
        }
    }
    /// The same error with `prefix.` put before its field path (for nested validation).
    pub fn within(self, prefix: &str) -> Self {
        let field = if self.field == ROOT {
            prefix.to_string()
        } else if self.field.starts_with('[') {
            format!("{prefix}{}", self.field)
        } else {
            format!("{prefix}.{}", self.field)
        };
        ConfigError { field, ..self }
    }
}

const ROOT: &str = "(root)";

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "invalid configuration: field `{}`: {}",
            self.field, self.reason
        )
    }
}

impl std::error::Error for ConfigError {}

/// Parse a JSON configuration. Empty input (no `configuration` in Envoy) parses as `{}`.
/// Errors name the field path (`routes[2].limits[0].rate`) and serde's reason, so unknown
/// fields (with `deny_unknown_fields`), wrong types and missing fields are all explained.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ConfigError> {
    let text = if bytes.iter().all(u8::is_ascii_whitespace) {
        &b"{}"[..]
    } else {
        bytes
    };
    if text.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ConfigError::new(
            ROOT,
            "the configuration must be a JSON object",
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(text);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let field = if matches!(path.as_str(), "." | "" | "?") {
            ROOT.to_string()
        } else {
            path
        };
        ConfigError::new(field, e.into_inner().to_string())
    })?;
    de.end()
        .map_err(|e| ConfigError::new(ROOT, e.to_string()))?;
    Ok(value)
}

/// Parse a duration such as `250ms`, `5s`, `1.5s`, `2m`, `1h` or `1d`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| {
        format!("`{text}` is not a duration (use forms like 250ms, 5s, 2m, 1h, 1d)")
    })?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        _ => {
            return Err(format!(
                "`{text}` has no known unit (use ms, s, m, h or d, for example 5s)"
            ))
        }
    };
    if !secs.is_finite() || !(0.0..=1.0e9).contains(&secs) {
        return Err(format!("`{text}` is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// A duration written as a string (`"5s"`) or as a number of milliseconds (`5000`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ConfigDuration(pub Duration);

impl<'de> Deserialize<'de> for ConfigDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Millis(u64),
            Text(String),
        }
        match Raw::deserialize(d) {
            Ok(Raw::Millis(ms)) => Ok(ConfigDuration(Duration::from_millis(ms))),
            Ok(Raw::Text(s)) => parse_duration(&s)
                .map(ConfigDuration)
                .map_err(serde::de::Error::custom),
            Err(_) => Err(serde::de::Error::custom(
                "expected a duration: a string like \"5s\" or a number of milliseconds",
            )),
        }
    }
}

impl serde::Serialize for ConfigDuration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}ms", self.0.as_millis()))
    }
}

/// True when `s` is an RFC 9110 token (`tchar`s only, at least one): the rule for field names.
pub fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// An HTTP field (header) name from a configuration: an RFC 9110 token, so never a
/// pseudo-header; kept in lower case, as Envoy keeps header names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(into = "String")]
pub struct HeaderName(String);

impl HeaderName {
    /// Validate a header name.
    pub fn new(name: &str) -> Result<Self, String> {
        if is_token(name) {
            Ok(HeaderName(name.to_ascii_lowercase()))
        } else {
            Err(format!(
                "`{name}` is not a header name (letters, digits and !#$%&'*+-.^_`|~ only)"
            ))
        }
    }
    /// A name the code knows to be valid (a default): not checked, only lower-cased.
    pub fn from_static(name: &'static str) -> Self {
        debug_assert!(is_token(name), "{name} is not a header name");
        HeaderName(name.to_ascii_lowercase())
    }
    /// The name, in lower case.
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// The name as an owned string.
    pub fn into_string(self) -> String {
        self.0
    }
}

impl TryFrom<String> for HeaderName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        HeaderName::new(&s)
    }
}

impl From<HeaderName> for String {
    fn from(h: HeaderName) -> String {
        h.0
    }
}

impl<'de> Deserialize<'de> for HeaderName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        HeaderName::new(&s).map_err(serde::de::Error::custom)
    }
}

impl std::ops::Deref for HeaderName {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for HeaderName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for HeaderName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A SHA-256 digest written as 64 hexadecimal characters (either case), as `sha256sum` prints
/// it. Used for secrets that the configuration must not hold in plain text.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sha256Hex(pub [u8; 32]);

impl Sha256Hex {
    /// Parse 64 hexadecimal characters.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bytes = text.as_bytes();
        let mut out = [0u8; 32];
        // `from_str_radix` alone would take a sign (`+5`) as part of a number.
        if bytes.len() != 64 || !bytes.iter().all(u8::is_ascii_hexdigit) {
            return Err(Self::REASON.to_string());
        }
        for (o, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
            let hex = std::str::from_utf8(pair).map_err(|_| Self::REASON.to_string())?;
            *o = u8::from_str_radix(hex, 16).map_err(|_| Self::REASON.to_string())?;
        }
        Ok(Sha256Hex(out))
    }
    const REASON: &'static str = "must be 64 hexadecimal characters (a SHA-256 digest)";
}

impl std::fmt::Debug for Sha256Hex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A digest of a secret: show only its start.
        write!(f, "Sha256Hex({:02x}{:02x}..)", self.0[0], self.0[1])
    }
}

impl<'de> Deserialize<'de> for Sha256Hex {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Sha256Hex::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A name that configurations use to refer to things (a limit, a call, a profile): ASCII
/// letters, digits, `_` and `-`, at least one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(into = "String")]
pub struct Name(String);

impl Name {
    /// Validate a name.
    pub fn new(name: &str) -> Result<Self, String> {
        if Self::valid(name) {
            Ok(Name(name.to_string()))
        } else {
            Err(format!(
                "`{name}` is not a valid name (letters, digits, `_` and `-` only)"
            ))
        }
    }
    /// True when `name` follows the rule.
    pub fn valid(name: &str) -> bool {
        !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    }
    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<Name> for String {
    fn from(n: Name) -> String {
        n.0
    }
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Name::new(&s).map_err(serde::de::Error::custom)
    }
}

impl std::ops::Deref for Name {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

macro_rules! str_eq {
    ($t:ty) => {
        impl PartialEq<str> for $t {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }
        impl PartialEq<&str> for $t {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }
        impl PartialEq<$t> for &str {
            fn eq(&self, other: &$t) -> bool {
                *self == other.0
            }
        }
    };
}
str_eq!(HeaderName);
str_eq!(Name);

/// A size in bytes, written as a number of bytes (`65536`) or with a unit (`64KiB`, `16MiB`,
/// `1GiB`, `500KB`, `2MB`; `B` for bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// The size as a `usize` (saturating on 32-bit targets such as wasm32).
    pub fn usize(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

/// Parse a size such as `65536`, `64KiB`, `16MiB` or `2MB`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{text}` is not a size (use forms like 65536, 64KiB, 16MiB)"))?;
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" => 1_000,
        "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        _ => {
            return Err(format!(
                "`{text}` has no known unit (use B, KB, KiB, MB, MiB, GB or GiB)"
            ))
        }
    };
    n.checked_mul(factor)
        .ok_or_else(|| format!("`{text}` is out of range"))
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d) {
            Ok(Raw::Bytes(n)) => Ok(ByteSize(n)),
            Ok(Raw::Text(s)) => parse_size(&s)
                .map(ByteSize)
                .map_err(serde::de::Error::custom),
            Err(_) => Err(serde::de::Error::custom(
                "expected a size: a number of bytes or a string like \"16MiB\"",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        rate: u32,
        #[serde(default)]
        timeout: Option<ConfigDuration>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Outer {
        #[serde(default)]
        name: String,
        #[serde(default)]
        rules: Vec<Inner>,
    }

    #[test]
    fn empty_configuration_is_an_empty_object() {
        let c: Outer = parse(b"").unwrap();
        assert_eq!(c.name, "");
        assert!(c.rules.is_empty());
        let c: Outer = parse(b"  \n").unwrap();
        assert!(c.rules.is_empty());
    }

    #[test]
    fn unknown_field_is_named_with_its_path() {
        let e = parse::<Outer>(br#"{"rules":[{"rate":1},{"rate":2,"burst":3}]}"#).unwrap_err();
        assert_eq!(e.field, "rules[1].burst");
        assert!(e.reason.contains("unknown field `burst`"), "{}", e.reason);
        assert!(e
            .to_string()
            .starts_with("invalid configuration: field `rules[1].burst`"));
    }

    #[test]
    fn wrong_type_and_missing_field_are_named() {
        let e = parse::<Outer>(br#"{"rules":[{"rate":"ten"}]}"#).unwrap_err();
        assert_eq!(e.field, "rules[0].rate");
        assert!(e.reason.contains("invalid type"), "{}", e.reason);
        let e = parse::<Outer>(br#"{"rules":[{}]}"#).unwrap_err();
        assert_eq!(e.field, "rules[0]");
        assert!(e.reason.contains("missing field `rate`"), "{}", e.reason);
    }

    #[test]
    fn syntax_errors_and_trailing_garbage_are_refused() {
        let e = parse::<Outer>(b"{\"name\": ").unwrap_err();
        assert!(e.reason.contains("EOF"), "{}", e.reason);
        let e = parse::<Outer>(b"{} x").unwrap_err();
        assert_eq!(e.field, "(root)");
        assert!(e.reason.contains("trailing"), "{}", e.reason);
        let e = parse::<Outer>(b"[]").unwrap_err();
        assert_eq!(e.field, "(root)");
    }

    #[test]
    fn durations_in_both_forms() {
        let c: Outer =
            parse(br#"{"rules":[{"rate":1,"timeout":"1.5s"},{"rate":1,"timeout":250}]}"#).unwrap();
        assert_eq!(c.rules[0].rate, 1);
        assert_eq!(
            c.rules[0].timeout,
            Some(ConfigDuration(Duration::from_millis(1500)))
        );
        assert_eq!(
            c.rules[1].timeout,
            Some(ConfigDuration(Duration::from_millis(250)))
        );
        let e = parse::<Outer>(br#"{"rules":[{"rate":1,"timeout":"5 parsecs"}]}"#).unwrap_err();
        assert_eq!(e.field, "rules[0].timeout");
        for (text, ms) in [
            ("250ms", 250),
            ("2m", 120_000),
            ("1h", 3_600_000),
            ("1d", 86_400_000),
        ] {
            assert_eq!(
                parse_duration(text).unwrap(),
                Duration::from_millis(ms),
                "{text}"
            );
        }
        assert!(parse_duration("").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("5").is_err());
    }

    #[test]
    fn within_prefixes_paths() {
        assert_eq!(
            ConfigError::new("rate", "x").within("rules[0]").field,
            "rules[0].rate"
        );
        assert_eq!(
            ConfigError::new("[1]", "x").within("rules").field,
            "rules[1]"
        );
        assert_eq!(ConfigError::new(ROOT, "x").within("rules").field, "rules");
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Typed {
        #[serde(default)]
        header: Option<HeaderName>,
        #[serde(default)]
        digest: Option<Sha256Hex>,
        #[serde(default)]
        name: Option<Name>,
        #[serde(default)]
        size: Option<ByteSize>,
    }

    #[test]
    fn header_names_follow_one_rule_and_are_lower_cased() {
        let c: Typed = parse(br#"{"header":"X-Tenant.Id"}"#).unwrap();
        assert_eq!(c.header.unwrap().as_str(), "x-tenant.id");
        for bad in ["", ":path", "x tenant", "x\\u0000y", "ä"] {
            let json = format!(r#"{{"header":"{bad}"}}"#);
            let e = parse::<Typed>(json.as_bytes()).unwrap_err();
            assert_eq!(e.field, "header", "{bad}");
            assert!(
                e.reason.contains("not a header name"),
                "{bad}: {}",
                e.reason
            );
        }
        assert!(is_token("x-a!#$%&'*+.^_`|~9"));
        assert!(!is_token("x(a)"));
    }

    #[test]
    fn sha256_digests_names_and_sizes() {
        let hex = "9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08";
        let c: Typed = parse(format!(r#"{{"digest":"{hex}"}}"#).as_bytes()).unwrap();
        assert_eq!(c.digest.unwrap().0[0], 0x9f);
        // `+5...` was accepted as hex (found by the `scalars` fuzz target).
        for bad in [
            "abc",
            &hex[1..],
            &format!("{}g", &hex[1..]),
            &format!("+5{}", &hex[2..]),
        ] {
            let e = parse::<Typed>(format!(r#"{{"digest":"{bad}"}}"#).as_bytes()).unwrap_err();
            assert_eq!(e.field, "digest");
            assert!(e.reason.contains("64 hexadecimal"), "{}", e.reason);
        }
        let c: Typed = parse(br#"{"name":"per-user_1"}"#).unwrap();
        assert_eq!(c.name.unwrap().as_str(), "per-user_1");
        let e = parse::<Typed>(br#"{"name":"a.b"}"#).unwrap_err();
        assert_eq!(e.field, "name");
        for (text, n) in [
            ("65536", 65536),
            ("64KiB", 65536),
            ("16MiB", 16 << 20),
            ("2MB", 2_000_000),
            ("10B", 10),
        ] {
            assert_eq!(parse_size(text).unwrap(), n, "{text}");
        }
        let c: Typed = parse(br#"{"size":1024}"#).unwrap();
        assert_eq!(c.size, Some(ByteSize(1024)));
        let c: Typed = parse(br#"{"size":"1KiB"}"#).unwrap();
        assert_eq!(c.size, Some(ByteSize(1024)));
        for bad in [
            r#""1 parsec""#,
            r#""-1""#,
            r#""99999999999999999999GiB""#,
            "-5",
        ] {
            let e = parse::<Typed>(format!(r#"{{"size":{bad}}}"#).as_bytes()).unwrap_err();
            assert_eq!(e.field, "size", "{bad}");
        }
    }
}
