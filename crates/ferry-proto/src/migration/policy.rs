//! The convergence policy: one pure function that decides, after each look at what is dirty,
//! whether the source sends another pass, throttles the guest, switches over or gives up.
//!
//! It knows nothing of KVM or sockets. Its input is a list of dirty sources (guest memory
//! today; disks join the same list) and the rates the source measured; the whole prediction of
//! the downtime lives here, so what the status reports and what the switchover does agree.
//!
//! ```text
//! predicted downtime = floor                        pausing, device state, the handover's
//!                                                   round trips (measured RTT)
//!                    + Σ remaining bytes / send rate   what is dirty now, sent while paused
//!                    + queued backlog / apply rate     what the destination has yet to apply,
//!                                                   less the round trip's worth on its way
//! ```
//!
//! Of the backlog (sent, not yet reported applied), one round trip's worth at the apply rate
//! is merely on its way: it left the source's queues and the final data follows right behind
//! it, as fast as the link goes. Only the rest is a queue the paused guest would wait for.
//!
//! Rules, in order:
//! 1. Time is up: switch over if the operator said `force`, else give up (timed out).
//! 2. The destination is behind (its backlog exceeds what it applies in a millisecond) and
//!    catching up: wait for it. A backlog that holds steady is data in flight on a link no
//!    faster than the guest dirties; it counts in the prediction instead.
//! 3. The prediction fits the target: switch over, unless another pass still shrinks the dirty
//!    set by a quarter and the memory part is above its floor (a shorter downtime for free).
//! 4. The target is below the floor (nothing left to gain, the prediction is the floor): switch
//!    over at the floor and say so, instead of iterating for ever.
//! 5. The guest dirties faster than half the send rate: throttle one step more.
//! 6. Throttled all the way and passes no longer shrink: give up, saying why.
//! 7. Otherwise: another pass.
//!
//! A switchover (3 or 4) with data still in flight drains first: the source sends nothing new
//! until the destination applied what it has, and the next look switches over whatever the
//! dirty set grew to meanwhile. On a long link the in flight is a bandwidth-delay product,
//! which a paused guest would otherwise wait for in full; running, it dirties less than that
//! (it dirties slower than the link carries), so draining only shortens the downtime.
//!
//! The memory part's floor is [`MEMORY_FLOOR_MS`] or [`MEMORY_FLOOR_SHARE`] of the fixed part,
//! whichever is larger: next to a 100 ms round trip, a last pass of 10 ms is as short as it
//! usefully gets.

use std::time::Duration;

/// How much of a pass's dirty data one source has, and how fast it dirties.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DirtySource {
    /// What it is, for notes: "memory", "disk 0".
    pub name: &'static str,
    /// Bytes dirty now: what the last pass in the downtime would send.
    pub dirty_bytes: u64,
    /// Bytes per second the guest dirtied since the last look.
    pub dirty_rate: f64,
}

/// What the operator asked for when time runs out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenTimeIsUp {
    GiveUp,
    Force,
}

/// Everything the policy decides on: the measurements of this look and the history it needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Inputs<'a> {
    pub sources: &'a [DirtySource],
    /// Bytes per second whole passes achieved (reading, encoding and sending), or the raw link
    /// rate before a pass was measured. 0 means unknown.
    pub send_rate: f64,
    /// Bytes sent but not yet applied by the destination.
    pub backlog_bytes: u64,
    /// The backlog at the previous look.
    pub previous_backlog: Option<u64>,
    /// Bytes per second the destination applies. 0 means unknown.
    pub apply_rate: f64,
    /// The link's round trip: this long of the apply rate is in flight, not queued.
    pub rtt: Duration,
    pub target_ms: f64,
    /// The fixed part of the switchover: pause, device state, round trips.
    pub floor_ms: f64,
    /// Time left before `max_time`, if one was given.
    pub time_left: Option<Duration>,
    pub when_time_is_up: WhenTimeIsUp,
    /// Throttle steps (percent of vCPU time held back), in order, and how many are taken.
    pub throttle_steps: &'a [u32],
    pub throttle_taken: usize,
    /// Passes sent so far (0 before the first dirty pass).
    pub iteration: u32,
    /// Total dirty bytes at the previous look.
    pub previous_dirty: Option<u64>,
    /// Passes taken only for a shorter downtime so far.
    pub extra_passes: u32,
    /// Passes at the last throttle step that did not shrink the dirty set.
    pub stalled_passes: u32,
    /// The last look decided to switch over (for this reason) and drained the link first.
    pub drained: Option<SwitchReason>,
    /// A throttle step was taken too recently for its effect to show (looks can be
    /// milliseconds apart): no other step yet.
    pub throttled_recently: bool,
}

/// What to do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Send what is dirty and look again. `extra`: taken only to shorten the downtime.
    AnotherPass { extra: bool },
    /// The destination has a backlog: let it catch up, then look again.
    WaitForDestination,
    /// Hold the vCPUs back by `percent` of their time, then send another pass.
    Throttle { percent: u32 },
    /// Stop the guest and send the rest.
    SwitchOver { why: SwitchReason },
    /// Switch over, but first let the destination apply what is in flight, sending nothing
    /// new; the next look switches over (with `drained` set).
    Drain { why: SwitchReason },
    /// End the migration; the source VM runs on.
    GiveUp { why: GiveUpReason },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwitchReason {
    /// The prediction fits the target.
    Fits,
    /// The target is below what the switchover can reach; this is as short as it gets.
    AtFloor,
    /// Time ran out and the operator asked to force it.
    Forced,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GiveUpReason {
    /// `max_time` ran out.
    TimedOut,
    /// Fully throttled, and the dirty set no longer shrinks.
    CannotConverge,
}

/// A pass that still shrinks the dirty set by this factor is worth taking even once the
/// prediction fits.
pub const WORTH_ANOTHER_PASS: f64 = 0.75;
/// Below this many milliseconds of dirty data the last pass is as short as it gets. On a LAN
/// the rest of the switchover is about 2 ms, so a 1 ms last pass was a third of the downtime
/// of a guest dirtying 200 MiB/s; an extra pass costs about as long as the data it sends.
pub const MEMORY_FLOOR_MS: f64 = 0.25;
/// ... or below this share of the switchover's fixed part, when that is larger.
pub const MEMORY_FLOOR_SHARE: f64 = 0.1;
/// Extra passes taken for a shorter downtime, at most.
pub const MAX_EXTRA_PASSES: u32 = 10;
/// Passes at full throttle without progress before giving up.
pub const MAX_STALLED_PASSES: u32 = 8;
/// The destination counts as caught up when its backlog is applied within this long.
pub const BACKLOG_SLACK_MS: f64 = 1.0;
/// A backlog that shrank to less than this share of the previous look's is draining. Any
/// shrinking counts: looks can be a few milliseconds apart, and a slow link drains only a
/// sliver of a large backlog in that time (a tenth was never seen draining at 100 Mbit/s).
pub const BACKLOG_DRAINING: f64 = 1.0;

/// The prediction, in parts (milliseconds).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prediction {
    pub dirty_ms: f64,
    pub backlog_ms: f64,
    pub floor_ms: f64,
}

impl Prediction {
    pub fn total_ms(&self) -> f64 {
        self.dirty_ms + self.backlog_ms + self.floor_ms
    }
}

fn ms(bytes: u64, rate: f64) -> f64 {
    if bytes == 0 {
        0.0
    } else if rate > 0.0 {
        bytes as f64 / rate * 1e3
    } else {
        f64::INFINITY
    }
}

impl Inputs<'_> {
    pub fn dirty_bytes(&self) -> u64 {
        self.sources.iter().map(|s| s.dirty_bytes).sum()
    }

    pub fn dirty_rate(&self) -> f64 {
        self.sources.iter().map(|s| s.dirty_rate).sum()
    }

    /// The backlog less the round trip's worth that is on its way.
    pub fn queued_backlog(&self) -> u64 {
        let on_its_way = self.apply_rate * self.rtt.as_secs_f64();
        self.backlog_bytes
            .saturating_sub(on_its_way.clamp(0.0, u64::MAX as f64) as u64)
    }

    /// The downtime a switchover now would have.
    pub fn predict(&self) -> Prediction {
        Prediction {
            dirty_ms: ms(self.dirty_bytes(), self.send_rate),
            backlog_ms: ms(self.queued_backlog(), self.apply_rate),
            floor_ms: self.floor_ms,
        }
    }
}

/// The policy. Pure: the same inputs give the same decision.
pub fn decide(i: &Inputs<'_>) -> Decision {
    let p = i.predict();
    let dirty = i.dirty_bytes();
    if i.time_left.is_some_and(|t| t.is_zero()) {
        return match i.when_time_is_up {
            WhenTimeIsUp::Force => Decision::SwitchOver {
                why: SwitchReason::Forced,
            },
            WhenTimeIsUp::GiveUp => Decision::GiveUp {
                why: GiveUpReason::TimedOut,
            },
        };
    }
    if let Some(why) = i.drained {
        return Decision::SwitchOver { why };
    }
    // A backlog that drains is waited for: the guest is not stopped while the destination
    // catches up. One that holds steady (a link as fast as the guest dirties) is data in
    // flight, and counts in the prediction like the rest.
    let draining = i
        .previous_backlog
        .is_none_or(|prev| (i.backlog_bytes as f64) < BACKLOG_DRAINING * prev as f64);
    // A destination that has applied nothing yet (no rate to plan with) is waited for too:
    // it may still be setting up, and nothing can be predicted without it.
    let unknown = i.apply_rate <= 0.0;
    if p.backlog_ms > BACKLOG_SLACK_MS && (draining || unknown) {
        return Decision::WaitForDestination;
    }
    let shrinking = i
        .previous_dirty
        .is_none_or(|prev| (dirty as f64) < WORTH_ANOTHER_PASS * prev as f64);
    let at_memory_floor = p.dirty_ms <= MEMORY_FLOOR_MS.max(MEMORY_FLOOR_SHARE * p.floor_ms);
    // Switching over with data in flight: let it arrive first.
    let switch = |why| {
        if p.backlog_ms > BACKLOG_SLACK_MS {
            Decision::Drain { why }
        } else {
            Decision::SwitchOver { why }
        }
    };
    if p.total_ms() <= i.target_ms {
        if at_memory_floor || !shrinking || i.extra_passes >= MAX_EXTRA_PASSES {
            return switch(SwitchReason::Fits);
        }
        return Decision::AnotherPass { extra: true };
    }
    if at_memory_floor && p.floor_ms + BACKLOG_SLACK_MS >= i.target_ms {
        return switch(SwitchReason::AtFloor);
    }
    let fully_throttled = i.throttle_taken >= i.throttle_steps.len();
    if i.iteration >= 1
        && !fully_throttled
        && !i.throttled_recently
        && i.dirty_rate() > 0.5 * i.send_rate
    {
        return Decision::Throttle {
            percent: i.throttle_steps[i.throttle_taken],
        };
    }
    if fully_throttled && !shrinking && i.stalled_passes >= MAX_STALLED_PASSES {
        return Decision::GiveUp {
            why: GiveUpReason::CannotConverge,
        };
    }
    Decision::AnotherPass { extra: false }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STEPS: [u32; 6] = [20, 40, 60, 80, 90, 99];
    const MIB: u64 = 1 << 20;
    const GBPS: f64 = 1e9;

    fn memory(dirty_bytes: u64, dirty_rate: f64) -> [DirtySource; 1] {
        [DirtySource {
            name: "memory",
            dirty_bytes,
            dirty_rate,
        }]
    }

    /// A named scenario: the inputs differ from a quiet baseline by the closure.
    struct Case {
        name: &'static str,
        dirty_bytes: u64,
        dirty_rate: f64,
        tweak: fn(&mut Inputs<'_>),
        expect: Decision,
    }

    fn baseline(sources: &[DirtySource]) -> Inputs<'_> {
        Inputs {
            sources,
            send_rate: 2.0 * GBPS,
            backlog_bytes: 0,
            previous_backlog: None,
            apply_rate: 2.0 * GBPS,
            rtt: Duration::from_micros(100),
            target_ms: 100.0,
            floor_ms: 2.0,
            time_left: None,
            when_time_is_up: WhenTimeIsUp::GiveUp,
            throttle_steps: &STEPS,
            throttle_taken: 0,
            iteration: 1,
            previous_dirty: None,
            extra_passes: 0,
            stalled_passes: 0,
            drained: None,
            throttled_recently: false,
        }
    }

    #[test]
    fn decisions_follow_the_rules() {
        let cases = [
            Case {
                name: "an idle guest switches over at once",
                dirty_bytes: 0,
                dirty_rate: 0.0,
                tweak: |_| {},
                expect: Decision::SwitchOver {
                    why: SwitchReason::Fits,
                },
            },
            Case {
                name: "a fitting prediction that still shrinks takes an extra pass",
                dirty_bytes: 64 * MIB,
                dirty_rate: 10.0 * MIB as f64,
                tweak: |i| i.previous_dirty = Some(512 * MIB),
                expect: Decision::AnotherPass { extra: true },
            },
            Case {
                name: "half a millisecond of dirty data that still shrinks takes one more pass",
                dirty_bytes: MIB,
                dirty_rate: 200.0 * MIB as f64,
                tweak: |i| i.previous_dirty = Some(8 * MIB),
                expect: Decision::AnotherPass { extra: true },
            },
            Case {
                name: "a tenth of a millisecond of dirty data is at the floor and switches over",
                dirty_bytes: 200 * 1024,
                dirty_rate: 200.0 * MIB as f64,
                tweak: |i| i.previous_dirty = Some(8 * MIB),
                expect: Decision::SwitchOver {
                    why: SwitchReason::Fits,
                },
            },
            Case {
                name: "a fitting prediction that stopped shrinking switches over",
                dirty_bytes: 64 * MIB,
                dirty_rate: 10.0 * MIB as f64,
                tweak: |i| i.previous_dirty = Some(70 * MIB),
                expect: Decision::SwitchOver {
                    why: SwitchReason::Fits,
                },
            },
            Case {
                name: "extra passes are bounded",
                dirty_bytes: 64 * MIB,
                dirty_rate: 10.0 * MIB as f64,
                tweak: |i| {
                    i.previous_dirty = Some(512 * MIB);
                    i.extra_passes = MAX_EXTRA_PASSES;
                },
                expect: Decision::SwitchOver {
                    why: SwitchReason::Fits,
                },
            },
            Case {
                name: "a destination with a backlog is waited for, even when all else fits",
                dirty_bytes: 0,
                dirty_rate: 0.0,
                tweak: |i| i.backlog_bytes = 64 * MIB,
                expect: Decision::WaitForDestination,
            },
            Case {
                name: "a steady backlog is data in flight: it counts, here it fits, and it \
                       drains before the switchover",
                dirty_bytes: 0,
                dirty_rate: 0.0,
                tweak: |i| {
                    i.backlog_bytes = 64 * MIB;
                    i.previous_backlog = Some(64 * MIB);
                },
                expect: Decision::Drain {
                    why: SwitchReason::Fits,
                },
            },
            Case {
                name: "after the drain the switchover goes ahead, whatever the guest dirtied",
                dirty_bytes: 512 * MIB,
                dirty_rate: 0.5 * GBPS,
                tweak: |i| {
                    i.backlog_bytes = 64 * MIB;
                    i.previous_backlog = Some(128 * MIB);
                    i.drained = Some(SwitchReason::AtFloor);
                },
                expect: Decision::SwitchOver {
                    why: SwitchReason::AtFloor,
                },
            },
            Case {
                name: "at a long link's floor, with a queue beyond the round trip's worth, the \
                       link drains first",
                dirty_bytes: MIB,
                dirty_rate: 10.0 * MIB as f64,
                tweak: |i| {
                    i.send_rate = 0.125 * GBPS;
                    i.apply_rate = 0.125 * GBPS;
                    i.floor_ms = 102.0;
                    i.rtt = Duration::from_millis(100);
                    i.backlog_bytes = 25 * MIB;
                    i.previous_backlog = Some(12 * MIB);
                },
                expect: Decision::Drain {
                    why: SwitchReason::AtFloor,
                },
            },
            Case {
                name: "a round trip's worth of backlog is on its way, not queued",
                dirty_bytes: MIB,
                dirty_rate: 10.0 * MIB as f64,
                tweak: |i| {
                    i.send_rate = 0.125 * GBPS;
                    i.apply_rate = 0.125 * GBPS;
                    i.floor_ms = 102.0;
                    i.rtt = Duration::from_millis(100);
                    i.backlog_bytes = 12_000_000;
                    i.previous_backlog = Some(12_000_000);
                },
                expect: Decision::SwitchOver {
                    why: SwitchReason::AtFloor,
                },
            },
            Case {
                name: "at a long link's floor a last pass of a tenth of it is short enough",
                dirty_bytes: MIB,
                dirty_rate: 10.0 * MIB as f64,
                tweak: |i| {
                    i.send_rate = 0.125 * GBPS;
                    i.floor_ms = 102.0;
                },
                expect: Decision::SwitchOver {
                    why: SwitchReason::AtFloor,
                },
            },
            Case {
                name: "a steady backlog that does not fit the target is not waited for forever",
                dirty_bytes: 0,
                dirty_rate: 0.0,
                tweak: |i| {
                    i.backlog_bytes = 512 * MIB;
                    i.previous_backlog = Some(500 * MIB);
                },
                expect: Decision::AnotherPass { extra: false },
            },
            Case {
                name: "a draining backlog is waited for",
                dirty_bytes: 0,
                dirty_rate: 0.0,
                tweak: |i| {
                    i.backlog_bytes = 32 * MIB;
                    i.previous_backlog = Some(64 * MIB);
                },
                expect: Decision::WaitForDestination,
            },
            Case {
                name: "a backlog that shrank a little since a look moments ago is draining",
                dirty_bytes: 0,
                dirty_rate: 0.0,
                tweak: |i| {
                    i.backlog_bytes = 4_369_000;
                    i.previous_backlog = Some(4_400_000);
                    i.apply_rate = 12.5e6;
                },
                expect: Decision::WaitForDestination,
            },
            Case {
                name: "a backlog applied within the slack does not hold the switchover",
                dirty_bytes: 0,
                dirty_rate: 0.0,
                tweak: |i| i.backlog_bytes = 4096,
                expect: Decision::SwitchOver {
                    why: SwitchReason::Fits,
                },
            },
            Case {
                name: "a backlog with an unknown apply rate is waited for",
                dirty_bytes: 0,
                dirty_rate: 0.0,
                tweak: |i| {
                    i.backlog_bytes = 4096;
                    i.apply_rate = 0.0;
                },
                expect: Decision::WaitForDestination,
            },
            Case {
                name: "a destination that applied nothing yet is waited for, not given up on",
                dirty_bytes: 64 * MIB,
                dirty_rate: 1.5 * GBPS,
                tweak: |i| {
                    i.backlog_bytes = 26 * MIB;
                    i.previous_backlog = Some(20 * MIB);
                    i.apply_rate = 0.0;
                    i.throttle_taken = STEPS.len();
                    i.previous_dirty = Some(64 * MIB);
                    i.stalled_passes = MAX_STALLED_PASSES;
                },
                expect: Decision::WaitForDestination,
            },
            Case {
                name: "a target below the floor switches over at the floor, not never",
                dirty_bytes: 4096,
                dirty_rate: 1e5,
                tweak: |i| i.target_ms = 1.0,
                expect: Decision::SwitchOver {
                    why: SwitchReason::AtFloor,
                },
            },
            Case {
                name: "a guest dirtying faster than half the link is throttled",
                dirty_bytes: 1024 * MIB,
                dirty_rate: 1.5 * GBPS,
                tweak: |_| {},
                expect: Decision::Throttle { percent: 20 },
            },
            Case {
                name: "throttling goes one step at a time",
                dirty_bytes: 1024 * MIB,
                dirty_rate: 1.5 * GBPS,
                tweak: |i| i.throttle_taken = 3,
                expect: Decision::Throttle { percent: 80 },
            },
            Case {
                name: "a step taken moments ago is given time to show before the next",
                dirty_bytes: 1024 * MIB,
                dirty_rate: 1.5 * GBPS,
                tweak: |i| {
                    i.throttle_taken = 3;
                    i.throttled_recently = true;
                },
                expect: Decision::AnotherPass { extra: false },
            },
            Case {
                name: "the first pass is not a reason to throttle",
                dirty_bytes: 1024 * MIB,
                dirty_rate: 1.5 * GBPS,
                tweak: |i| i.iteration = 0,
                expect: Decision::AnotherPass { extra: false },
            },
            Case {
                name: "a slow dirtier that does not fit yet gets another pass",
                dirty_bytes: 1024 * MIB,
                dirty_rate: 0.1 * GBPS,
                tweak: |_| {},
                expect: Decision::AnotherPass { extra: false },
            },
            Case {
                name: "fully throttled and stalled gives up",
                dirty_bytes: 1024 * MIB,
                dirty_rate: 1.5 * GBPS,
                tweak: |i| {
                    i.throttle_taken = STEPS.len();
                    i.previous_dirty = Some(1024 * MIB);
                    i.stalled_passes = MAX_STALLED_PASSES;
                },
                expect: Decision::GiveUp {
                    why: GiveUpReason::CannotConverge,
                },
            },
            Case {
                name: "fully throttled but still shrinking goes on",
                dirty_bytes: 512 * MIB,
                dirty_rate: 1.5 * GBPS,
                tweak: |i| {
                    i.throttle_taken = STEPS.len();
                    i.previous_dirty = Some(1024 * MIB);
                    i.stalled_passes = MAX_STALLED_PASSES;
                },
                expect: Decision::AnotherPass { extra: false },
            },
            Case {
                name: "time up with force switches over whatever the prediction",
                dirty_bytes: 1024 * MIB,
                dirty_rate: 1.5 * GBPS,
                tweak: |i| {
                    i.time_left = Some(Duration::ZERO);
                    i.when_time_is_up = WhenTimeIsUp::Force;
                },
                expect: Decision::SwitchOver {
                    why: SwitchReason::Forced,
                },
            },
            Case {
                name: "time up without force gives up",
                dirty_bytes: 1024 * MIB,
                dirty_rate: 1.5 * GBPS,
                tweak: |i| i.time_left = Some(Duration::ZERO),
                expect: Decision::GiveUp {
                    why: GiveUpReason::TimedOut,
                },
            },
            Case {
                name: "time left is not time up",
                dirty_bytes: 0,
                dirty_rate: 0.0,
                tweak: |i| i.time_left = Some(Duration::from_millis(1)),
                expect: Decision::SwitchOver {
                    why: SwitchReason::Fits,
                },
            },
            Case {
                name: "an unknown send rate never predicts a fit",
                dirty_bytes: 4096,
                dirty_rate: 0.0,
                tweak: |i| i.send_rate = 0.0,
                expect: Decision::AnotherPass { extra: false },
            },
        ];
        for case in cases {
            let sources = memory(case.dirty_bytes, case.dirty_rate);
            let mut inputs = baseline(&sources);
            (case.tweak)(&mut inputs);
            assert_eq!(decide(&inputs), case.expect, "{}", case.name);
        }
    }

    #[test]
    fn every_source_counts_in_the_prediction() {
        let sources = [
            DirtySource {
                name: "memory",
                dirty_bytes: 100 * MIB,
                dirty_rate: 0.0,
            },
            DirtySource {
                name: "disk 0",
                dirty_bytes: 100 * MIB,
                dirty_rate: 0.0,
            },
        ];
        let mut i = baseline(&sources);
        i.send_rate = 200.0 * MIB as f64;
        i.backlog_bytes = 20 * MIB;
        i.apply_rate = 100.0 * MIB as f64;
        i.rtt = Duration::ZERO;
        let p = i.predict();
        assert!((p.dirty_ms - 1000.0).abs() < 1e-6, "{p:?}");
        assert!((p.backlog_ms - 200.0).abs() < 1e-6, "{p:?}");
        assert!((p.total_ms() - 1202.0).abs() < 1e-6, "{p:?}");
        // Over a 100 ms round trip, 10 MiB of it is on its way, not queued.
        i.rtt = Duration::from_millis(100);
        let p = i.predict();
        assert!((p.backlog_ms - 100.0).abs() < 1e-6, "{p:?}");
    }
}
