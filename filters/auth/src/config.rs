//! Configuration of the authentication filter.

use serde::Deserialize;
use tollgate_common::route::{RouteMatch, Routed};
use tollgate_common::ConfigError;

/// The filter's configuration (JSON in Envoy's `configuration` field).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Per-route rules; the first match applies.
    #[serde(default)]
    pub routes: Vec<RouteRule>,
}

/// A per-route rule.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteRule {
    /// Which requests the rule applies to.
    #[serde(rename = "match", default)]
    pub route: RouteMatch,
    /// Skip the filter for these requests.
    #[serde(default)]
    pub disabled: bool,
}

impl Routed for RouteRule {
    fn route(&self) -> &RouteMatch {
        &self.route
    }
}

impl Config {
    /// Parse and validate a configuration.
    pub fn parse(bytes: &[u8]) -> Result<Config, ConfigError> {
        tollgate_common::config::parse(bytes)
    }
}
