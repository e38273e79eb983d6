//! Concurrency limits: how many migrations a host, a pair of hosts and the cluster take part
//! in at once, counting the ones running and the ones planned.

use std::collections::BTreeMap;

use super::config::Policy;
use super::view::InFlight;

/// Migrations counted so far, against the policy's limits.
#[derive(Debug, Clone)]
pub(crate) struct Slots {
    max_per_host: u32,
    max_per_link: u32,
    max_total: u32,
    per_host: BTreeMap<String, u32>,
    per_link: BTreeMap<(String, String), u32>,
    total: u32,
}

/// A link is the same whichever way a migration crosses it.
fn link(a: &str, b: &str) -> (String, String) {
    if a <= b {
        (a.to_string(), b.to_string())
    } else {
        (b.to_string(), a.to_string())
    }
}

impl Slots {
    pub fn new(policy: &Policy, in_flight: &[InFlight]) -> Slots {
        let mut slots = Slots {
            max_per_host: policy.max_per_host,
            max_per_link: policy.max_per_link,
            max_total: policy.max_total,
            per_host: BTreeMap::new(),
            per_link: BTreeMap::new(),
            total: 0,
        };
        for flight in in_flight {
            slots.take(&flight.from, &flight.to);
        }
        slots
    }

    fn host_count(&self, host: &str) -> u32 {
        self.per_host.get(host).copied().unwrap_or(0)
    }

    /// Whether another migration may start in the cluster and involve `host`: what a source
    /// is checked against before any destination is looked for.
    pub fn check_source(&self, host: &str) -> Result<(), String> {
        if self.total >= self.max_total {
            return Err(format!(
                "{} migrations run or are planned in the cluster (max_total {})",
                self.total, self.max_total
            ));
        }
        let count = self.host_count(host);
        if count >= self.max_per_host {
            return Err(format!(
                "{host} takes part in {count} migrations (max_per_host {})",
                self.max_per_host
            ));
        }
        Ok(())
    }

    /// Whether a migration from `from` to `to` may start now.
    pub fn check(&self, from: &str, to: &str) -> Result<(), String> {
        self.check_source(from)?;
        let count = self.host_count(to);
        if count >= self.max_per_host {
            return Err(format!(
                "{to} takes part in {count} migrations (max_per_host {})",
                self.max_per_host
            ));
        }
        let count = self.per_link.get(&link(from, to)).copied().unwrap_or(0);
        if count >= self.max_per_link {
            return Err(format!(
                "{count} migrations run between {from} and {to} (max_per_link {})",
                self.max_per_link
            ));
        }
        Ok(())
    }

    pub fn take(&mut self, from: &str, to: &str) {
        *self.per_host.entry(from.to_string()).or_default() += 1;
        *self.per_host.entry(to.to_string()).or_default() += 1;
        *self.per_link.entry(link(from, to)).or_default() += 1;
        self.total += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flight(from: &str, to: &str) -> InFlight {
        InFlight {
            vm: format!("{from}-{to}"),
            from: from.to_string(),
            to: to.to_string(),
            memory_bytes: 0,
            cpu: 0.0,
            disk_bytes: 0,
        }
    }

    #[test]
    fn limits_count_running_and_planned_migrations() {
        // (case, per host, per link, total, running, planned, asked, refusal piece or "")
        type Case = (
            &'static str,
            (u32, u32, u32),
            &'static [(&'static str, &'static str)],
            &'static [(&'static str, &'static str)],
            (&'static str, &'static str),
            &'static str,
        );
        let cases: &[Case] = &[
            ("nothing runs", (1, 1, 4), &[], &[], ("a", "b"), ""),
            (
                "source busy",
                (1, 1, 4),
                &[("a", "c")],
                &[],
                ("a", "b"),
                "a takes part in 1",
            ),
            (
                "destination busy",
                (1, 1, 4),
                &[("c", "b")],
                &[],
                ("a", "b"),
                "b takes part in 1",
            ),
            (
                "planned counts",
                (1, 1, 4),
                &[],
                &[("b", "c")],
                ("a", "b"),
                "b takes part in 1",
            ),
            (
                "link either way",
                (2, 1, 4),
                &[("b", "a")],
                &[],
                ("a", "b"),
                "between a and b",
            ),
            (
                "link has room",
                (2, 2, 4),
                &[("b", "a")],
                &[],
                ("a", "b"),
                "",
            ),
            (
                "total",
                (1, 1, 2),
                &[("c", "d")],
                &[("e", "f")],
                ("a", "b"),
                "max_total 2",
            ),
        ];
        for (name, (per_host, per_link, total), running, planned, (from, to), want) in cases {
            let policy = Policy {
                max_per_host: *per_host,
                max_per_link: *per_link,
                max_total: *total,
                ..Policy::default()
            };
            let running: Vec<InFlight> = running.iter().map(|(f, t)| flight(f, t)).collect();
            let mut slots = Slots::new(&policy, &running);
            for (f, t) in *planned {
                slots.take(f, t);
            }
            match slots.check(from, to) {
                Ok(()) => assert!(want.is_empty(), "{name}: allowed, want {want:?}"),
                Err(why) => assert!(
                    !want.is_empty() && why.contains(want),
                    "{name}: {why:?}, want {want:?}"
                ),
            }
        }
    }
}
