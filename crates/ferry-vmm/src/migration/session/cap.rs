//! How much a session may have written and not yet acknowledged: enough to keep the path
//! full, not so much that a slow consumer (a destination writing to a slow disk) sits behind
//! a deep queue that the last pass must wait for.
//!
//! The cap follows what the peer consumes, in two phases (the shape of TCP BBR's, at the
//! session's level):
//! - **Growing**: while the cap is what holds the writer back, it doubles every period, as
//!   long as the consumed rate still rises by a quarter within three periods. Growth is driven
//!   by being blocked, not by a rate times a round trip: a cap sized from a rate it limits
//!   only ever confirms itself (a first design stayed at 1 MiB, 30 Mbit/s over 100 ms).
//! - **Settled**: the rate stopped rising, so the path (or the consumer) is full: the cap is
//!   one and a half times the best recent rate times the smallest round trip, plus a floor.
//!   The extra half leaves room for the rate to rise again (a rise of a quarter grows it once
//!   more) without filling a bottleneck's queue of one product.
//!
//! A period is a round trip (at least [`MIN_PERIOD`]). Rates from periods in which the cap
//! did not bind (the writer had less to send) are kept only if higher: an idle moment is not
//! a slower path.

use std::time::{Duration, Instant};

/// The least period over which a rate is measured.
pub const MIN_PERIOD: Duration = Duration::from_millis(5);
/// The cap at the start, before anything was measured.
pub const INITIAL_CAP: u64 = 2 << 20;
/// The cap never goes below this.
pub const FLOOR: u64 = 1 << 20;
/// Periods without a rise of a quarter before growth stops.
const FLAT_PERIODS: u32 = 3;
/// Settled, the cap holds this many bandwidth-delay products (plus [`FLOOR`]): enough to keep
/// the path full through jitter and late acknowledgements, not so much that the rest waits in
/// the bottleneck's queue. Two products kept a one-product queue full at 100 ms and 1 Gbit/s
/// (hundreds of drops a migration, 0.88 of the link); one and a half, 0.92 and few drops.
const SETTLED_PRODUCTS: f64 = 1.5;
/// Rates kept for the best recent one.
const RATES: usize = 8;

#[derive(Debug, Clone)]
pub struct InFlightCap {
    cap: u64,
    max: u64,
    /// The current period: since when, and what was acknowledged then.
    since: Instant,
    acked_then: u64,
    /// The writer was held back by the cap in this period.
    bound: bool,
    /// Recent rates (bytes per second), newest last.
    rates: Vec<f64>,
    /// The rate the last rise was measured against, and periods since it.
    probe_rate: f64,
    flat: u32,
    /// The smallest round trip seen.
    min_rtt: Option<Duration>,
}

impl InFlightCap {
    /// A cap that never exceeds `max` (the memory both sides may hold).
    pub fn new(max: u64, now: Instant) -> InFlightCap {
        InFlightCap {
            cap: INITIAL_CAP.min(max).max(FLOOR.min(max)),
            max,
            since: now,
            acked_then: 0,
            bound: false,
            rates: Vec::with_capacity(RATES),
            probe_rate: 0.0,
            flat: 0,
            min_rtt: None,
        }
    }

    /// Bytes that may be unacknowledged now.
    pub fn get(&self) -> u64 {
        self.cap
    }

    /// The writer could not write because of the cap.
    pub fn bound(&mut self) {
        self.bound = true;
    }

    /// Whether growth has stopped (the path or the consumer is full).
    pub fn settled(&self) -> bool {
        self.flat >= FLAT_PERIODS
    }

    /// Whether a period ended by `now` (then [`InFlightCap::on_ack`] wants a round trip).
    pub fn due(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.since) >= self.period()
    }

    fn period(&self) -> Duration {
        self.min_rtt.unwrap_or(MIN_PERIOD).max(MIN_PERIOD)
    }

    /// The peer has consumed `acked` bytes in all; `rtt` is a round trip measured now.
    pub fn on_ack(&mut self, acked: u64, rtt: Option<Duration>, now: Instant) {
        if let Some(rtt) = rtt.filter(|r| !r.is_zero()) {
            self.min_rtt = Some(self.min_rtt.map_or(rtt, |m| m.min(rtt)));
        }
        let elapsed = now.saturating_duration_since(self.since);
        if elapsed < self.period() {
            return;
        }
        let rate = acked.saturating_sub(self.acked_then) as f64 / elapsed.as_secs_f64();
        let best = self.best_rate();
        if self.bound || rate > best {
            if self.rates.len() == RATES {
                self.rates.remove(0);
            }
            self.rates.push(rate);
        }
        if self.bound {
            let best = self.best_rate();
            if best >= 1.25 * self.probe_rate {
                self.probe_rate = best;
                self.flat = 0;
            } else {
                self.flat = self.flat.saturating_add(1);
            }
            self.cap = if self.settled() {
                let rtt = self.min_rtt.unwrap_or(MIN_PERIOD).as_secs_f64();
                (SETTLED_PRODUCTS * best * rtt) as u64 + FLOOR
            } else {
                self.cap.saturating_mul(2)
            }
            .clamp(FLOOR.min(self.max), self.max);
        }
        self.since = now;
        self.acked_then = acked;
        self.bound = false;
    }

    fn best_rate(&self) -> f64 {
        self.rates.iter().copied().fold(0.0, f64::max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: u64 = 64 << 20;

    /// A path that delivers at most `rate` bytes/s and at most the cap per round trip `rtt`,
    /// with a writer that always has more to send.
    struct Path {
        t: Instant,
        acked: u64,
    }

    impl Path {
        fn new() -> Path {
            Path {
                t: Instant::now(),
                acked: 0,
            }
        }

        fn drive(&mut self, cap: &mut InFlightCap, rtt: Duration, rate: f64, periods: u32) {
            let step = rtt.max(MIN_PERIOD);
            for _ in 0..periods {
                let per_step = (rate * step.as_secs_f64())
                    .min(cap.get() as f64 * step.as_secs_f64() / rtt.as_secs_f64());
                self.acked += per_step as u64;
                self.t += step;
                cap.bound();
                cap.on_ack(self.acked, Some(rtt), self.t);
            }
        }
    }

    #[test]
    fn it_grows_to_fill_a_long_fast_path_and_settles_at_one_and_a_half_products() {
        let mut path = Path::new();
        let mut cap = InFlightCap::new(MAX, path.t);
        let rtt = Duration::from_millis(100);
        path.drive(&mut cap, rtt, 125e6, 30);
        assert!(cap.settled());
        // 1 Gbit/s × 100 ms = 12.5 MB: the cap holds one and a half of it, plus the floor.
        assert_eq!(cap.get(), 18_750_000 + FLOOR);
    }

    #[test]
    fn a_slow_consumer_keeps_it_small() {
        let mut path = Path::new();
        let mut cap = InFlightCap::new(MAX, path.t);
        // A LAN, and a destination that applies 4 MiB/s.
        path.drive(&mut cap, Duration::from_micros(200), 4.0 * 1048576.0, 20);
        assert!(cap.settled());
        assert!(cap.get() < 2 * FLOOR, "{}", cap.get());
    }

    #[test]
    fn a_faster_path_later_grows_it_again() {
        let mut path = Path::new();
        let mut cap = InFlightCap::new(MAX, path.t);
        let rtt = Duration::from_millis(20);
        path.drive(&mut cap, rtt, 12.5e6, 20);
        let small = cap.get();
        path.drive(&mut cap, rtt, 125e6, 30);
        // Settled again at one and a half of the new product: 3.75 MB and the floor.
        assert_eq!(cap.get(), 3_750_000 + FLOOR, "{small} then {}", cap.get());
        assert!(cap.get() > 3 * small, "{} then {}", small, cap.get());
        assert!(cap.get() <= MAX);
    }

    #[test]
    fn an_idle_moment_is_not_a_slower_path() {
        let mut path = Path::new();
        let mut cap = InFlightCap::new(MAX, path.t);
        let rtt = Duration::from_millis(100);
        path.drive(&mut cap, rtt, 125e6, 30);
        let settled = cap.get();
        // Nothing to send for a while: the cap did not bind, the low rates do not count.
        cap.on_ack(path.acked, Some(rtt), path.t + rtt);
        cap.on_ack(path.acked, Some(rtt), path.t + rtt * 2);
        assert_eq!(cap.get(), settled);
        path.t += rtt * 2;
        path.drive(&mut cap, rtt, 125e6, 5);
        assert_eq!(cap.get(), settled);
    }

    #[test]
    fn it_stays_within_its_bounds() {
        let mut path = Path::new();
        let mut cap = InFlightCap::new(4 << 20, path.t);
        path.drive(&mut cap, Duration::from_millis(200), 10e9, 40);
        assert_eq!(cap.get(), 4 << 20);
        let mut path = Path::new();
        let mut tiny = InFlightCap::new(256 << 10, path.t);
        assert_eq!(tiny.get(), 256 << 10);
        path.drive(&mut tiny, Duration::from_millis(1), 1.0, 10);
        assert_eq!(tiny.get(), 256 << 10);
    }
}
