//! The migration journal: every migration the controller orders, written before each step
//! is taken. A controller that takes over reads it and carries on the migrations in flight
//! with the same request IDs, which the agents answer once: nothing is ordered twice.

use serde::{Deserialize, Serialize};

use crate::agent_api::IncomingReady;
use crate::model::{MoveProtocol, VmSpec};

/// Where a migration the controller ordered is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "step")]
pub enum Step {
    /// Decided; the destination has not been asked yet (or its answer was lost).
    Ordered,
    /// The destination's receiver is ready.
    Receiving { ready: IncomingReady },
    /// The source was told to migrate.
    Sending { ready: IncomingReady },
    /// The VM runs on the destination.
    Done,
    /// It did not happen; the VM runs on the source (or, if `lost`, nowhere that is known).
    Failed { why: String, lost: bool },
}

impl Step {
    pub fn is_open(&self) -> bool {
        !matches!(self, Step::Done | Step::Failed { .. })
    }
}

/// One migration the controller ordered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Unique in the cluster's history; the agents' request IDs derive from it.
    pub id: String,
    pub vm: String,
    pub from: String,
    pub to: String,
    pub protocol: MoveProtocol,
    /// Why it was ordered (the plan's reason).
    pub reason: String,
    /// The VM's spec and the downtime target, as first sent: a replay sends the same.
    pub spec: VmSpec,
    pub downtime_ms: u64,
    pub step: Step,
    /// Milliseconds since the epoch: ordered, last changed.
    pub ordered_unix_ms: u64,
    pub updated_unix_ms: u64,
    /// Resources the VM takes (for the planner, while in flight).
    pub memory_bytes: u64,
    pub cpu: f64,
    pub disk_bytes: u64,
    /// What the migration reported last: downtime and bytes sent, when known.
    #[serde(default)]
    pub measured_downtime_ms: Option<f64>,
    #[serde(default)]
    pub bytes: Option<u64>,
    /// The agents were told of its end: the source forgot a VM that left, or the
    /// destination dropped the receiver of a move that failed. A new leader finishes this
    /// for a record that ended without it.
    #[serde(default)]
    pub tidied: bool,
}

impl Record {
    /// The request ID of one of this migration's calls to an agent.
    pub fn request_id(&self, call: &str) -> String {
        format!("{}/{call}", self.id)
    }
}

/// A host an operator asked to empty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evacuation {
    pub host: String,
    pub request_id: String,
    pub started_unix_ms: u64,
    /// Set once no VM is left on it.
    #[serde(default)]
    pub finished_unix_ms: Option<u64>,
}

/// Everything a controller must not lose: kept in the store, written by the leader only.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Journal {
    /// Open migrations, and the most recent finished ones (the oldest are dropped).
    pub records: Vec<Record>,
    /// VM -> when it last moved (milliseconds since the epoch): the cool-down survives a
    /// change of leader.
    pub last_moved: std::collections::BTreeMap<String, u64>,
    pub evacuations: Vec<Evacuation>,
    /// Hosts emptied by power saving, free to be powered off.
    pub power_off: Vec<String>,
    /// Counts migrations ever ordered: the next record's ID.
    pub next_id: u64,
}

/// Finished records kept for `ferry cluster status` and the metrics.
const FINISHED_KEPT: usize = 200;

impl Journal {
    pub fn open(&self) -> impl Iterator<Item = &Record> {
        self.records.iter().filter(|r| r.step.is_open())
    }

    /// Records that ended but whose agents were not told yet.
    pub fn untidy(&self) -> impl Iterator<Item = &Record> {
        self.records
            .iter()
            .filter(|r| !r.step.is_open() && !r.tidied)
    }

    pub fn record_mut(&mut self, id: &str) -> Option<&mut Record> {
        self.records.iter_mut().find(|r| r.id == id)
    }

    /// Whether a migration of `vm` changed step at or after `unix_ms`: a report sampled
    /// before then may not show where the VM is now.
    pub fn changed_since(&self, vm: &str, unix_ms: u64) -> bool {
        self.records
            .iter()
            .any(|r| r.vm == vm && r.updated_unix_ms >= unix_ms)
    }

    /// Drops the oldest finished records beyond what is kept.
    pub fn trim(&mut self) {
        let finished = self.records.iter().filter(|r| !r.step.is_open()).count();
        let mut drop = finished.saturating_sub(FINISHED_KEPT);
        self.records.retain(|r| {
            if drop > 0 && !r.step.is_open() {
                drop -= 1;
                false
            } else {
                true
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: u64, step: Step) -> Record {
        Record {
            id: format!("m{id}"),
            vm: format!("vm{id}"),
            from: "a".into(),
            to: "b".into(),
            protocol: MoveProtocol::PreCopy,
            reason: String::new(),
            spec: VmSpec {
                kernel: "k".into(),
                initrd: None,
                memory_mib: 1,
                vcpus: 1,
                append: String::new(),
                disks: Vec::new(),
                nics: Vec::new(),
                balloon: false,
            },
            downtime_ms: 100,
            step,
            ordered_unix_ms: 0,
            updated_unix_ms: 0,
            memory_bytes: 0,
            cpu: 0.0,
            disk_bytes: 0,
            measured_downtime_ms: None,
            bytes: None,
            tidied: false,
        }
    }

    /// Regression: a leader that died between writing a move's end and telling the agents
    /// left the source listing a departed VM (or the destination a receiver) for good.
    #[test]
    fn ended_records_whose_agents_were_not_told_are_untidy() {
        let mut j = Journal::default();
        j.records.push(record(1, Step::Done));
        j.records.push(record(2, Step::Ordered));
        let mut told = record(3, Step::Done);
        told.tidied = true;
        j.records.push(told);
        let untidy: Vec<&str> = j.untidy().map(|r| r.id.as_str()).collect();
        assert_eq!(untidy, ["m1"]);
        // Older journals have no such field: their ended records count as untidy, and
        // telling the agents again is harmless (request IDs).
        let text = serde_json::to_string(&j)
            .expect("json")
            .replace(",\"tidied\":false", "");
        let back: Journal = serde_json::from_str(&text).expect("old journal");
        assert_eq!(back.untidy().count(), 1);
    }

    #[test]
    fn trimming_keeps_every_open_record() {
        let mut j = Journal::default();
        for i in 0..(FINISHED_KEPT as u64 + 10) {
            j.records.push(record(i, Step::Done));
        }
        j.records.insert(3, record(9999, Step::Ordered));
        j.trim();
        assert_eq!(j.records.len(), FINISHED_KEPT + 1);
        assert!(j.records.iter().any(|r| r.id == "m9999"));
        assert_eq!(j.records.iter().filter(|r| r.step.is_open()).count(), 1);
        // The oldest finished went first.
        assert!(!j.records.iter().any(|r| r.id == "m0"));
    }

    /// Regression: a move that ended just after the hosts were polled left the source's
    /// report listing the VM, and the controller ordered a second move of it, which the
    /// source refused (the VM had gone).
    #[test]
    fn a_report_older_than_a_moves_end_is_stale_for_that_vm() {
        let mut j = Journal::default();
        let mut r = record(1, Step::Done);
        r.updated_unix_ms = 10_000;
        j.records.push(r);
        assert!(
            j.changed_since("vm1", 9_000),
            "sampled before the move ended"
        );
        assert!(j.changed_since("vm1", 10_000));
        assert!(!j.changed_since("vm1", 10_001), "sampled after");
        assert!(!j.changed_since("vm2", 0), "another VM");
    }

    #[test]
    fn the_journal_reads_back_what_was_written() {
        let mut j = Journal::default();
        j.records.push(record(
            1,
            Step::Failed {
                why: "x".into(),
                lost: false,
            },
        ));
        j.records.push(record(
            2,
            Step::Sending {
                ready: IncomingReady {
                    listen: "10.0.0.2:4000".into(),
                    tls_name: "b".into(),
                },
            },
        ));
        j.last_moved.insert("vm1".into(), 5);
        let text = serde_json::to_string(&j).expect("encodes");
        let back: Journal = serde_json::from_str(&text).expect("decodes");
        assert_eq!(back, j);
        assert_eq!(back.records[1].request_id("go"), "m2/go");
    }
}
