//! A counter-based limit for log lines a guest can trigger at will.

use std::sync::atomic::{AtomicU64, Ordering};

/// How many events are always logged before the limiter starts thinning them out.
const BURST: u64 = 10;

/// Lets the first [`BURST`] events through, then only the 2^k-th ones (16th, 32nd, 64th, ...),
/// so a guest that repeats a mistake a million times produces about thirty log lines. Callers
/// include [`LogLimiter::seen`] in the message so the log still says how often it happened.
#[derive(Debug, Default)]
pub(crate) struct LogLimiter {
    seen: AtomicU64,
}

impl LogLimiter {
    pub(crate) const fn new() -> Self {
        LogLimiter {
            seen: AtomicU64::new(0),
        }
    }

    /// Counts one event and says whether to log it.
    pub(crate) fn allow(&self) -> bool {
        let n = self.seen.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
        n <= BURST || n.is_power_of_two()
    }

    /// Events counted so far, logged or not.
    pub(crate) fn seen(&self) -> u64 {
        self.seen.load(Ordering::Relaxed)
    }
}

/// Logs with `tracing` at `$level` if `$limiter` allows it, appending the running count.
macro_rules! log_limited {
    ($limiter:expr, $level:ident, $($arg:tt)+) => {
        if $limiter.allow() {
            tracing::$level!(occurrences = $limiter.seen(), $($arg)+);
        }
    };
}
pub(crate) use log_limited;

/// An error and its sources on one line ("a: b: c"), for logs.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        line.push_str(": ");
        line.push_str(&e.to_string());
        source = e.source();
    }
    line
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A failed unwrap is a failed test.
mod tests {
    use super::*;

    #[test]
    fn burst_then_powers_of_two() {
        let limiter = LogLimiter::new();
        let allowed: Vec<u64> = (1..=1000).filter(|_| limiter.allow()).collect();
        assert_eq!(
            allowed,
            vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 16, 32, 64, 128, 256, 512]
        );
        assert_eq!(limiter.seen(), 1000);
    }

    #[test]
    fn error_chain_joins_sources() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(error_chain(&e), "outer: inner");
    }
}
