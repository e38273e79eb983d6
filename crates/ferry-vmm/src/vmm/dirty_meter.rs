//! `PUT /vm/dirty-rate`: how fast the guest writes its memory while no migration runs, so a
//! cluster controller can prefer VMs that are cheap to move before it moves any.
//!
//! KVM's dirty log is on for one window only: logging makes every first write to a page fault
//! once, which a guest should not pay for all the time. The control loop owns the
//! measurement (as it owns the migration's): a timer thread only tells it when the window has
//! passed. Requests that come while a window is open share its answer. A migration that
//! starts ends the window early, since the migration takes the dirty log over.

use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use ferry_api::{DirtyRate, DirtyRateRequest};
use tokio::sync::oneshot;

use crate::event::{ApiFailure, ApiReply, VmmEvent};
use crate::migration::dirty::{DirtyTracker, RegionDirty};

type Waiter = oneshot::Sender<Result<ApiReply, ApiFailure>>;

const PAGE: u64 = 4096;

/// One open measurement window.
pub(super) struct DirtyMeter<'a> {
    id: u64,
    tracker: DirtyTracker<'a>,
    started: Instant,
    waiters: Vec<Waiter>,
}

/// The control loop's dirty-rate measurements: at most one window at a time.
#[derive(Default)]
pub(super) struct DirtyMeters<'a> {
    open: Option<DirtyMeter<'a>>,
    next_id: u64,
}

/// Checks a request's window.
pub(super) fn window(request: &DirtyRateRequest) -> Result<Duration, ApiFailure> {
    let ms = request.window_ms;
    if !(DirtyRateRequest::MIN_WINDOW_MS..=DirtyRateRequest::MAX_WINDOW_MS).contains(&ms) {
        return Err(ApiFailure {
            status: 400,
            message: format!(
                "a dirty-rate window of {ms} ms is outside {} to {} ms",
                DirtyRateRequest::MIN_WINDOW_MS,
                DirtyRateRequest::MAX_WINDOW_MS
            ),
        });
    }
    Ok(Duration::from_millis(ms))
}

/// The rate of `dirty` pages written over `elapsed`.
pub(super) fn rate(dirty: &[RegionDirty], elapsed: Duration) -> DirtyRate {
    let dirty_pages: u64 = dirty.iter().map(RegionDirty::count).sum();
    let secs = elapsed.as_secs_f64().max(1e-3);
    DirtyRate {
        bytes_per_sec: (dirty_pages * PAGE) as f64 / secs,
        dirty_pages,
        window_ms: elapsed.as_secs_f64() * 1e3,
    }
}

impl<'a> DirtyMeters<'a> {
    /// Opens a window (or joins the open one): `waiter` is answered when it ends.
    /// `start` turns the dirty log on; `events` hears when the window has passed.
    pub(super) fn measure(
        &mut self,
        window: Duration,
        waiter: Waiter,
        start: impl FnOnce() -> Result<DirtyTracker<'a>, String>,
        events: &Sender<VmmEvent>,
    ) {
        if let Some(open) = &mut self.open {
            open.waiters.push(waiter);
            return;
        }
        let tracker = match start() {
            Ok(t) => t,
            Err(message) => {
                let _ = waiter.send(Err(ApiFailure {
                    status: 500,
                    message: format!("cannot turn the dirty log on: {message}"),
                }));
                return;
            }
        };
        self.next_id += 1;
        let id = self.next_id;
        self.open = Some(DirtyMeter {
            id,
            tracker,
            started: Instant::now(),
            waiters: vec![waiter],
        });
        let events = events.clone();
        let timer = std::thread::Builder::new()
            .name("dirty-window".into())
            .spawn(move || {
                std::thread::sleep(window);
                let _ = events.send(VmmEvent::DirtyWindowEnded { id });
            });
        if let Err(e) = timer {
            self.finish(Some(format!("cannot start the window's timer: {e}")));
        }
    }

    /// The timer of window `id` rang; a window already ended early is left alone.
    pub(super) fn window_ended(&mut self, id: u64) {
        if self.open.as_ref().is_some_and(|m| m.id == id) {
            self.finish(None);
        }
    }

    /// Ends the open window now, if any, and answers its waiters; the dirty log goes off.
    /// `failure` answers them with an error instead.
    pub(super) fn finish(&mut self, failure: Option<String>) {
        let Some(meter) = self.open.take() else {
            return;
        };
        let answer = match failure {
            Some(message) => Err(message),
            None => meter
                .tracker
                .collect()
                .map(|dirty| rate(&dirty, meter.started.elapsed()))
                .map_err(|e| crate::error_chain(&e)),
        };
        drop(meter.tracker);
        for w in meter.waiters {
            let _ = w.send(
                answer
                    .clone()
                    .map(ApiReply::DirtyRate)
                    .map_err(|message| ApiFailure {
                        status: 500,
                        message,
                    }),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_outside_the_bounds_are_refused() {
        for (ms, ok) in [
            (0, false),
            (99, false),
            (100, true),
            (10_000, true),
            (10_001, false),
        ] {
            let r = window(&DirtyRateRequest { window_ms: ms });
            assert_eq!(r.is_ok(), ok, "{ms} ms");
            if let Err(e) = r {
                assert_eq!(e.status, 400);
                assert!(e.message.contains(&ms.to_string()), "{}", e.message);
            }
        }
    }

    #[test]
    fn the_rate_counts_distinct_pages_over_the_window() {
        let dirty = vec![
            RegionDirty {
                guest_addr: 0,
                bits: vec![0b1011, 0],
                pages: 128,
            },
            RegionDirty {
                guest_addr: 1 << 32,
                bits: vec![u64::MAX],
                pages: 10, // bits past the region's end do not count
            },
        ];
        let r = rate(&dirty, Duration::from_millis(500));
        assert_eq!(r.dirty_pages, 13);
        assert_eq!(r.bytes_per_sec, 13.0 * 4096.0 * 2.0);
        assert_eq!(r.window_ms, 500.0);
    }
}
