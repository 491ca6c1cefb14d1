//! Request handling of the cache filter.

use std::rc::Rc;

use tollgate_common::metrics::Metrics;
use tollgate_common::route::{RequestInfo, Rules};
use tollgate_common::{ConfigError, Decision, Host, HttpFilter, RootFilter};

use crate::config::{Config, RouteRule};

/// Per-VM state: the compiled configuration and metrics.
pub struct CacheRoot {
    shared: Rc<Shared>,
}

/// What every request of a VM shares.
pub struct Shared {
    /// Per-route rules.
    pub rules: Rules<RouteRule>,
    /// The filter's metrics.
    pub metrics: Metrics,
}

impl RootFilter for CacheRoot {
    type Filter = CacheFilter;
    const NAME: &'static str = "cache";

    fn new(_context_id: u32) -> Self {
        CacheRoot {
            shared: Rc::new(Shared {
                rules: Rules::default(),
                metrics: Metrics::new("cache"),
            }),
        }
    }

    fn configure(&mut self, _host: &mut dyn Host, configuration: &[u8]) -> Result<(), ConfigError> {
        let config = Config::parse(configuration)?;
        self.shared = Rc::new(Shared {
            rules: Rules(config.routes),
            metrics: Metrics::new("cache"),
        });
        Ok(())
    }

    fn create_filter(&self, context_id: u32) -> CacheFilter {
        CacheFilter {
            context_id,
            shared: self.shared.clone(),
        }
    }
}

/// Per-request state.
pub struct CacheFilter {
    #[allow(dead_code)]
    context_id: u32,
    shared: Rc<Shared>,
}

impl HttpFilter for CacheFilter {
    fn on_request_headers(&mut self, host: &mut dyn Host, _end_of_stream: bool) -> Decision {
        let req = RequestInfo::from_host(host);
        if let Some((rule, _)) = self.shared.rules.find(&req) {
            if rule.disabled {
                self.shared.metrics.count(host, "skipped", 1);
                return Decision::Continue;
            }
        }
        self.shared.metrics.count(host, "requests", 1);
        Decision::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_common::mem_host::MemHost;

    #[test]
    fn passes_traffic_and_counts_it() {
        let mut root = CacheRoot::new(1);
        let mut host = MemHost::new();
        root.configure(
            &mut host,
            br#"{"routes":[{"match":{"prefix":"/health"},"disabled":true}]}"#,
        )
        .unwrap();
        let mut h = host.next_request("GET", "/api/products/1", &[]);
        assert_eq!(
            root.create_filter(2).on_request_headers(&mut h, true),
            Decision::Continue
        );
        let mut h2 = h.next_request("GET", "/health", &[]);
        assert_eq!(
            root.create_filter(3).on_request_headers(&mut h2, true),
            Decision::Continue
        );
        assert_eq!(h2.metric("tollgate.cache.requests"), Some(1));
        assert_eq!(h2.metric("tollgate.cache.skipped"), Some(1));
    }

    #[test]
    fn refuses_unknown_fields_naming_them() {
        let mut root = CacheRoot::new(1);
        let e = root
            .configure(&mut MemHost::new(), br#"{"routes":[{"bogus":1}]}"#)
            .unwrap_err();
        assert_eq!(e.field, "routes[0].bogus");
    }
}
