//! When a host is hot, and when the whole cluster is calm enough to consolidate: both only
//! from load that lasted, never from one sample.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::config::Policy;

/// Samples further apart than this (the host was unreachable, or the controller stalled)
/// tell nothing about the time between them: the host's window starts over.
pub const MAX_SAMPLE_GAP_SECS: f64 = 3.0;

/// Slack for comparing sample times, which are sums of floating-point seconds.
const TIME_SLACK: f64 = 1e-9;

/// How a host's load stands against the hot thresholds. Times are the caller's seconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "heat")]
pub enum Heat {
    Cool,
    /// Over a hot threshold since `since`, not yet for long enough.
    Warming {
        since: f64,
    },
    /// Over a hot threshold from `since` for at least the sustain time; it stays hot until it
    /// is calm for as long.
    Hot {
        since: f64,
    },
}

impl Heat {
    pub fn is_hot(self) -> bool {
        matches!(self, Heat::Hot { .. })
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Thresholds {
    hot_cpu: f64,
    cool_cpu: f64,
    hot_memory: f64,
    sustain_secs: f64,
}

/// One host's recent history, kept as the start of its current runs of samples: all the
/// sustain rule needs, since a run breaks at the first sample that does not belong to it.
#[derive(Debug, Clone, Copy)]
struct Track {
    last_t: f64,
    /// Start of the run of samples over a hot threshold.
    over_since: Option<f64>,
    /// Start of the run of samples under `cool_cpu` and `hot_memory`.
    calm_since: Option<f64>,
    /// When the host became hot (the start of the run that made it so).
    hot_since: Option<f64>,
    heat: Heat,
}

impl Track {
    fn new(t: f64) -> Track {
        Track {
            last_t: t,
            over_since: None,
            calm_since: None,
            hot_since: None,
            heat: Heat::Cool,
        }
    }
}

/// Tells, host by host, whether load has stayed over the hot thresholds long enough.
#[derive(Debug, Clone)]
pub struct HotspotDetector {
    thresholds: Thresholds,
    hosts: HashMap<String, Track>,
}

impl HotspotDetector {
    pub fn new(policy: &Policy) -> HotspotDetector {
        HotspotDetector {
            thresholds: Thresholds {
                hot_cpu: policy.hot_cpu,
                cool_cpu: policy.cool_cpu,
                hot_memory: policy.hot_memory,
                sustain_secs: policy.sustain_secs,
            },
            hosts: HashMap::new(),
        }
    }

    /// Takes one sample of `host` at `t_secs` (shares of its capacity) and says how hot it is.
    pub fn observe(&mut self, host: &str, t_secs: f64, cpu_util: f64, mem_util: f64) -> Heat {
        let th = self.thresholds;
        let track = self
            .hosts
            .entry(host.to_string())
            .or_insert_with(|| Track::new(t_secs));
        let gap = t_secs - track.last_t;
        if !(-TIME_SLACK..=MAX_SAMPLE_GAP_SECS + TIME_SLACK).contains(&gap) {
            // Unreachable for a while (or time went backwards): what was seen before says
            // nothing about now.
            *track = Track::new(t_secs);
        }
        track.last_t = t_secs;

        let over = cpu_util >= th.hot_cpu || mem_util >= th.hot_memory;
        let calm = cpu_util < th.cool_cpu && mem_util < th.hot_memory;
        track.over_since = if over {
            Some(track.over_since.unwrap_or(t_secs))
        } else {
            None
        };
        track.calm_since = if calm {
            Some(track.calm_since.unwrap_or(t_secs))
        } else {
            None
        };
        let lasted =
            |since: Option<f64>| since.filter(|&s| t_secs - s >= th.sustain_secs - TIME_SLACK);

        track.heat = match track.hot_since {
            Some(hot_since) => {
                if lasted(track.calm_since).is_some() {
                    track.hot_since = None;
                    Heat::Cool
                } else {
                    Heat::Hot { since: hot_since }
                }
            }
            None => match (lasted(track.over_since), track.over_since) {
                (Some(since), _) => {
                    track.hot_since = Some(since);
                    Heat::Hot { since }
                }
                (None, Some(since)) => Heat::Warming { since },
                (None, None) => Heat::Cool,
            },
        };
        track.heat
    }

    /// What the last sample of `host` said (`Cool` for a host never seen).
    pub fn heat(&self, host: &str) -> Heat {
        self.hosts.get(host).map_or(Heat::Cool, |track| track.heat)
    }

    /// Drops a host's history (it left the cluster, or was powered off).
    pub fn forget(&mut self, host: &str) {
        self.hosts.remove(host);
    }
}

/// Tells when the cluster's average CPU share has stayed low long enough to consolidate.
#[derive(Debug, Clone)]
pub struct ClusterCalm {
    below: f64,
    sustain_secs: f64,
    last_t: Option<f64>,
    calm_since: Option<f64>,
}

impl ClusterCalm {
    pub fn new(policy: &Policy) -> ClusterCalm {
        ClusterCalm {
            below: policy.consolidate_below,
            sustain_secs: policy.consolidate_sustain_secs,
            last_t: None,
            calm_since: None,
        }
    }

    /// Takes the cluster's average CPU share at `t_secs`; true when consolidation is due.
    pub fn observe(&mut self, t_secs: f64, average_util: f64) -> bool {
        let gap = self.last_t.map_or(0.0, |last| t_secs - last);
        if !(-TIME_SLACK..=MAX_SAMPLE_GAP_SECS + TIME_SLACK).contains(&gap) {
            self.calm_since = None;
        }
        self.last_t = Some(t_secs);
        if average_util < self.below {
            let since = *self.calm_since.get_or_insert(t_secs);
            t_secs - since >= self.sustain_secs - TIME_SLACK
        } else {
            self.calm_since = None;
            false
        }
    }

    /// Starts the calm period over (after a consolidation, so the next one waits for the
    /// cluster to settle).
    pub fn reset(&mut self) {
        self.calm_since = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Expected heat after a sample: C cool, W(since) warming, H(since) hot.
    #[derive(Debug, Clone, Copy)]
    enum E {
        C,
        W(f64),
        H(f64),
    }

    fn expected(e: E) -> Heat {
        match e {
            E::C => Heat::Cool,
            E::W(since) => Heat::Warming { since },
            E::H(since) => Heat::Hot { since },
        }
    }

    /// Feeds (t, cpu, mem, expected heat) samples of one host with the default policy
    /// (hot 0.80, cool 0.65, memory 0.95, sustain 5 s).
    fn run(name: &str, samples: &[(f64, f64, f64, E)]) {
        let mut detector = HotspotDetector::new(&Policy::default());
        for (i, &(t, cpu, mem, want)) in samples.iter().enumerate() {
            let heat = detector.observe("host-a", t, cpu, mem);
            assert_eq!(heat, expected(want), "{name}: sample {i} at t={t}");
            assert_eq!(detector.heat("host-a"), heat, "{name}: heat() at t={t}");
        }
    }

    #[test]
    fn heat_follows_sustained_load() {
        use E::*;
        // (case, [(t, cpu, memory, expected heat)])
        type Case = (&'static str, &'static [(f64, f64, f64, E)]);
        let cases: &[Case] = &[
            (
                "one sample spike is not hot",
                &[
                    (0.0, 0.3, 0.1, C),
                    (1.0, 0.99, 0.1, W(1.0)),
                    (2.0, 0.3, 0.1, C),
                ],
            ),
            ("a single sample is never hot", &[(0.0, 1.5, 1.0, W(0.0))]),
            (
                "sustained load is hot after sustain_secs",
                &[
                    (0.0, 0.85, 0.1, W(0.0)),
                    (1.0, 0.9, 0.1, W(0.0)),
                    (2.0, 0.9, 0.1, W(0.0)),
                    (3.0, 0.9, 0.1, W(0.0)),
                    (4.0, 0.9, 0.1, W(0.0)),
                    (5.0, 0.81, 0.1, H(0.0)),
                    (6.0, 0.95, 0.1, H(0.0)),
                ],
            ),
            (
                "one dip below hot restarts the run",
                &[
                    (0.0, 0.9, 0.1, W(0.0)),
                    (1.0, 0.9, 0.1, W(0.0)),
                    (2.0, 0.9, 0.1, W(0.0)),
                    (3.0, 0.79, 0.1, C),
                    (4.0, 0.9, 0.1, W(4.0)),
                    (6.0, 0.9, 0.1, W(4.0)),
                    (8.0, 0.9, 0.1, W(4.0)),
                    (9.0, 0.9, 0.1, H(4.0)),
                ],
            ),
            (
                "memory alone makes a host hot",
                &[
                    (0.0, 0.1, 0.96, W(0.0)),
                    (2.5, 0.1, 0.97, W(0.0)),
                    (5.0, 0.1, 0.95, H(0.0)),
                ],
            ),
            (
                "hysteresis: between cool and hot stays hot",
                &[
                    (0.0, 0.9, 0.1, W(0.0)),
                    (2.5, 0.9, 0.1, W(0.0)),
                    (5.0, 0.9, 0.1, H(0.0)),
                    (6.0, 0.7, 0.1, H(0.0)),
                    (9.0, 0.7, 0.1, H(0.0)),
                    (12.0, 0.66, 0.1, H(0.0)),
                    (14.0, 0.7, 0.1, H(0.0)),
                ],
            ),
            (
                "hot ends only after calm lasted sustain_secs",
                &[
                    (0.0, 0.9, 0.1, W(0.0)),
                    (2.5, 0.9, 0.1, W(0.0)),
                    (5.0, 0.9, 0.1, H(0.0)),
                    (6.0, 0.5, 0.1, H(0.0)),
                    (9.0, 0.5, 0.1, H(0.0)),
                    (10.0, 0.7, 0.1, H(0.0)),
                    (11.0, 0.5, 0.1, H(0.0)),
                    (13.0, 0.5, 0.1, H(0.0)),
                    (15.0, 0.5, 0.1, H(0.0)),
                    (16.0, 0.5, 0.1, C),
                    (17.0, 0.9, 0.1, W(17.0)),
                ],
            ),
            (
                "calm CPU with hot memory stays hot",
                &[
                    (0.0, 0.9, 0.1, W(0.0)),
                    (2.5, 0.9, 0.1, W(0.0)),
                    (5.0, 0.9, 0.1, H(0.0)),
                    (6.0, 0.1, 0.96, H(0.0)),
                    (9.0, 0.1, 0.96, H(0.0)),
                    (12.0, 0.1, 0.96, H(0.0)),
                ],
            ),
            (
                "a gap restarts the window",
                &[
                    (0.0, 0.9, 0.1, W(0.0)),
                    (3.0, 0.9, 0.1, W(0.0)),
                    (7.0, 0.9, 0.1, W(7.0)),
                    (10.0, 0.9, 0.1, W(7.0)),
                    (12.0, 0.9, 0.1, H(7.0)),
                ],
            ),
            (
                "a gap ends a hotspot too",
                &[
                    (0.0, 0.9, 0.1, W(0.0)),
                    (3.0, 0.9, 0.1, W(0.0)),
                    (5.0, 0.9, 0.1, H(0.0)),
                    (30.0, 0.9, 0.1, W(30.0)),
                ],
            ),
            (
                "time going backwards restarts",
                &[
                    (10.0, 0.9, 0.1, W(10.0)),
                    (12.0, 0.9, 0.1, W(10.0)),
                    (4.0, 0.9, 0.1, W(4.0)),
                ],
            ),
        ];
        for (name, samples) in cases {
            run(name, samples);
        }
    }

    #[test]
    fn hosts_are_tracked_apart_and_forgotten() {
        let mut detector = HotspotDetector::new(&Policy::default());
        for t in 0..=5 {
            let t = f64::from(t);
            detector.observe("host-a", t, 0.9, 0.1);
            detector.observe("host-b", t, 0.2, 0.1);
        }
        assert_eq!(detector.heat("host-a"), Heat::Hot { since: 0.0 });
        assert_eq!(detector.heat("host-b"), Heat::Cool);
        detector.forget("host-a");
        assert_eq!(detector.heat("host-a"), Heat::Cool);
        assert_eq!(
            detector.observe("host-a", 6.0, 0.9, 0.1),
            Heat::Warming { since: 6.0 }
        );
    }

    #[test]
    fn cluster_calm_needs_a_lasting_low_average() {
        // (name, [(t, average, due)]) with consolidate_below 0.30 for 20 s.
        type Case = (&'static str, &'static [(f64, f64, bool)]);
        let cases: &[Case] = &[
            (
                "calm for 20 s is due",
                &[(0.0, 0.2, false), (10.0, 0.2, false), (20.0, 0.1, true)],
            ),
            ("a single sample is not due", &[(0.0, 0.0, false)]),
            (
                "a busy sample resets",
                &[
                    (0.0, 0.2, false),
                    (1.0, 0.35, false),
                    (2.0, 0.2, false),
                    (21.0, 0.2, false),
                    (22.0, 0.2, true),
                ],
            ),
        ];
        for (name, samples) in cases {
            let mut calm = ClusterCalm::new(&Policy::default());
            let mut t_prev = 0.0;
            for &(t, average, due) in *samples {
                // Fill in samples a second apart so no gap restarts the window.
                let mut t_fill = t_prev + 1.0;
                while t_fill < t {
                    calm.observe(t_fill, average);
                    t_fill += 1.0;
                }
                assert_eq!(calm.observe(t, average), due, "{name}: t={t}");
                t_prev = t;
            }
        }
    }

    #[test]
    fn cluster_calm_restarts_on_a_gap_and_on_reset() {
        let mut calm = ClusterCalm::new(&Policy::default());
        for t in 0..20 {
            assert!(!calm.observe(f64::from(t), 0.1));
        }
        // 10 s without a sample: the calm so far counts for nothing.
        assert!(!calm.observe(29.0, 0.1));
        for t in 30..49 {
            assert!(!calm.observe(f64::from(t), 0.1), "t={t}");
        }
        assert!(calm.observe(49.0, 0.1));
        calm.reset();
        assert!(!calm.observe(50.0, 0.1));
    }
}
