//! Auto-converge throttling: the guest is slowed, never stopped.
//!
//! At a throttle of P %, each vCPU runs (100 − P) % of every [`PERIOD`] and rests the rest.
//! A kicker thread interrupts throttled vCPUs every [`KICK`] so a run window ends on time;
//! a vCPU that is kicked before its window is over goes straight back into the guest. Kicks
//! that arrive while it rests are dropped when the rest ends, so they cannot cut the next
//! window short (which, at 50 % and above, starved the guest for seconds).
//!
//! The kicker belongs to the control loop, which stops and joins it before it joins any vCPU
//! thread: a kick can never reach a thread that has been joined.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One run-and-rest cycle.
pub const PERIOD: Duration = Duration::from_millis(20);
/// How often a throttled vCPU is interrupted to see whether its run window is over.
pub const KICK: Duration = Duration::from_millis(1);

/// What the migration sets and the vCPUs read.
#[derive(Debug, Default)]
pub struct Throttle {
    percent: AtomicU32,
    /// The longest rest any vCPU took, microseconds, since the last reset.
    longest_rest_us: AtomicU64,
}

impl Throttle {
    pub fn set(&self, percent: u32) {
        self.percent.store(percent.min(99), Ordering::Relaxed);
    }

    pub fn percent(&self) -> u32 {
        self.percent.load(Ordering::Relaxed)
    }

    /// The longest stretch a vCPU rested, since [`reset_longest_rest`](Self::reset_longest_rest).
    pub fn longest_rest(&self) -> Duration {
        Duration::from_micros(self.longest_rest_us.load(Ordering::Relaxed))
    }

    pub fn reset_longest_rest(&self) {
        self.longest_rest_us.store(0, Ordering::Relaxed);
    }

    fn record_rest(&self, rest: Duration) {
        let us = u64::try_from(rest.as_micros()).unwrap_or(u64::MAX);
        self.longest_rest_us.fetch_max(us, Ordering::Relaxed);
    }
}

/// The run and rest of one period at `percent`.
pub fn split(percent: u32) -> (Duration, Duration) {
    let p = percent.min(99);
    let rest = PERIOD * p / 100;
    (PERIOD - rest, rest)
}

/// A vCPU's side: when its run window ends, it rests.
#[derive(Debug)]
pub struct VcpuPacer {
    throttle: Arc<Throttle>,
    window_started: Instant,
}

impl VcpuPacer {
    pub fn new(throttle: Arc<Throttle>) -> VcpuPacer {
        VcpuPacer {
            throttle,
            window_started: Instant::now(),
        }
    }

    /// Called when the vCPU was interrupted. `None`: run on. `Some(rest)`: rest that long
    /// (the caller waits for commands meanwhile), then call [`rested`](Self::rested).
    pub fn due_rest(&mut self) -> Option<Duration> {
        let percent = self.throttle.percent();
        if percent == 0 {
            self.window_started = Instant::now();
            return None;
        }
        let (run, rest) = split(percent);
        (self.window_started.elapsed() >= run).then_some(rest)
    }

    /// The rest is over: a new run window starts now.
    pub fn rested(&mut self, took: Duration) {
        self.throttle.record_rest(took);
        self.window_started = Instant::now();
    }
}

/// Interrupts throttled vCPU threads every [`KICK`]; stopped and joined when dropped.
#[derive(Debug)]
pub struct Kicker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Kicker {
    /// Starts kicking `threads` (vCPU threads of this process, alive until this is dropped:
    /// the owner drops it before joining them) with `signal`.
    pub fn start(
        throttle: Arc<Throttle>,
        threads: Vec<libc::pthread_t>,
        signal: libc::c_int,
    ) -> std::io::Result<Kicker> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("ferry-throttle".into())
            .spawn(move || {
                while !flag.load(Ordering::Acquire) {
                    if throttle.percent() == 0 {
                        std::thread::sleep(PERIOD);
                        continue;
                    }
                    std::thread::sleep(KICK);
                    for &t in &threads {
                        // SAFETY: `t` is a vCPU thread of this process; the owner of this
                        // kicker joins this thread (Drop) before it joins any vCPU thread, so
                        // `t` is alive. The signal's handler only sets immediate_exit.
                        unsafe { libc::pthread_kill(t, signal) };
                    }
                }
            })?;
        Ok(Kicker {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Kicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttled_vcpu_runs_its_share_of_every_period() {
        for (percent, run_ms, rest_ms) in [(20, 16, 4), (50, 10, 10), (90, 2, 18), (99, 0, 19)] {
            let (run, rest) = split(percent);
            assert_eq!(run + rest, PERIOD, "{percent}");
            assert_eq!(rest.as_millis(), rest_ms, "{percent}");
            assert_eq!(run.as_millis(), run_ms, "{percent}");
        }
        // Never a full stop, whatever is asked.
        assert!(split(100).0 > Duration::ZERO);
    }

    #[test]
    fn an_early_kick_does_not_cut_the_run_window_short() {
        let throttle = Arc::new(Throttle::default());
        throttle.set(50);
        let mut pacer = VcpuPacer::new(throttle.clone());
        assert_eq!(pacer.due_rest(), None, "the window has just started");
        std::thread::sleep(split(50).0);
        assert_eq!(pacer.due_rest(), Some(split(50).1));
        pacer.rested(Duration::from_millis(10));
        assert_eq!(pacer.due_rest(), None, "a new window after the rest");
        assert_eq!(throttle.longest_rest(), Duration::from_millis(10));
        throttle.set(0);
        assert_eq!(pacer.due_rest(), None);
    }

    #[test]
    fn the_kicker_is_joined_when_dropped() {
        let throttle = Arc::new(Throttle::default());
        throttle.set(50);
        // No threads to kick: only its own life is tested here.
        let kicker = Kicker::start(throttle, Vec::new(), libc::SIGRTMIN()).expect("start");
        std::thread::sleep(Duration::from_millis(5));
        let started = Instant::now();
        drop(kicker);
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}
