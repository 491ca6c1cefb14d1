//! Log lines that would repeat on every request (an identity provider down, a backend that
//! refuses every call) let through once per interval, with the count of the ones held back:
//! an outage at 500 requests a second writes one line per interval, not 500 a second.

use std::cell::Cell;
use std::time::Duration;

/// One kind of repeated log line, limited to one per interval (per worker: each VM has its
/// own). Share it through the root (`Rc<LogLimit>`) so every request of the worker counts.
#[derive(Debug)]
pub struct LogLimit {
    interval: f64,
    /// No line before this time (Unix seconds); 0 before the first line.
    next: Cell<f64>,
    held_back: Cell<u64>,
}

impl LogLimit {
    /// At most one line per `interval`.
    pub fn new(interval: Duration) -> Self {
        LogLimit {
            interval: interval.as_secs_f64(),
            next: Cell::new(0.0),
            held_back: Cell::new(0),
        }
    }

    /// May a line be written at `now` (Unix seconds)? `Some(n)`: yes, and `n` lines were held
    /// back since the last one written; `None`: no (counted as held back).
    pub fn admit(&self, now: f64) -> Option<u64> {
        if now < self.next.get() {
            self.held_back.set(self.held_back.get().saturating_add(1));
            return None;
        }
        self.next.set(now + self.interval);
        Some(self.held_back.replace(0))
    }

    /// The text to append to an admitted line: empty, or `" (N more since the last)"`.
    pub fn suffix(held_back: u64) -> String {
        if held_back == 0 {
            String::new()
        } else {
            format!(" ({held_back} more like it since the last)")
        }
    }
}

/// Log a warning through a [`LogLimit`]: `warn_limited!(limit, now, "[{}] ...", ctx)`.
#[macro_export]
macro_rules! warn_limited {
    ($limit:expr, $now:expr, $($arg:tt)+) => {
        if let Some(held_back) = $limit.admit($now) {
            log::warn!(
                "{}{}",
                format_args!($($arg)+),
                $crate::log_limit::LogLimit::suffix(held_back)
            );
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_count_held_back() {
        let l = LogLimit::new(Duration::from_secs(10));
        assert_eq!(l.admit(100.0), Some(0));
        for i in 0..499 {
            assert_eq!(l.admit(100.0 + f64::from(i) * 0.01), None);
        }
        assert_eq!(l.admit(109.99), None);
        assert_eq!(l.admit(110.0), Some(500));
        assert_eq!(l.admit(110.5), None);
        assert_eq!(l.admit(125.0), Some(1));
        assert_eq!(LogLimit::suffix(0), "");
        assert_eq!(LogLimit::suffix(3), " (3 more like it since the last)");
    }
}
