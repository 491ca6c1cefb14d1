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
}
