//! The agent's API: HTTP + JSON over mutual TLS, one agent per host.
//!
//! | method | path                          | body              | answer                |
//! |--------|-------------------------------|-------------------|-----------------------|
//! | GET    | `/v1/host`                    |                   | [`HostReport`]        |
//! | POST   | `/v1/vms`                     | [`StartVm`]       | [`VmReport`]          |
//! | GET    | `/v1/vms/{name}`              |                   | [`VmReport`]          |
//! | POST   | `/v1/vms/{name}/stop`         | [`Plain`]         | [`VmReport`]          |
//! | POST   | `/v1/vms/{name}/forget`       | [`Plain`]         | [`Forgotten`]         |
//! | POST   | `/v1/vms/{name}/migrate`      | [`MigrateVm`]     | [`VmReport`]          |
//! | GET    | `/v1/vms/{name}/migration`    |                   | `MigrationStatus`     |
//! | POST   | `/v1/incoming`                | [`Incoming`]      | [`IncomingReady`]     |
//! | POST   | `/v1/incoming/{name}/cancel`  | [`Plain`]         | [`Forgotten`]         |
//! | GET    | `/metrics`                    |                   | Prometheus text       |
//!
//! Every request that changes something carries a `request_id` chosen by the caller. The
//! agent remembers the answer to each ID: the same request sent twice (a retry after a lost
//! answer, or a new controller replaying its journal) does one thing and gets the same
//! answer. The same ID with another body is refused with 409.
//!
//! [`HostReport`]: crate::model::HostReport
//! [`VmReport`]: crate::model::VmReport

use serde::{Deserialize, Serialize};

use crate::model::{MoveProtocol, VmSpec};

/// `POST /v1/vms`: start a VM on this host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartVm {
    pub request_id: String,
    /// Unique in the cluster: letters, digits, `-` and `_`.
    pub name: String,
    pub spec: VmSpec,
}

/// A request with nothing but its ID.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plain {
    pub request_id: String,
}

/// The answer of forget and cancel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forgotten {
    pub name: String,
    /// Whether there was something to forget (false on a replay after it was done).
    pub removed: bool,
}

/// `POST /v1/incoming`: get ready to receive VM `name`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Incoming {
    pub request_id: String,
    pub name: String,
    /// The VM's spec, from its source: its memory and disks are reserved here, and the
    /// destination's disks are made in this agent's state folder.
    pub spec: VmSpec,
    /// The source host's name, for the logs.
    pub from: String,
}

/// The answer to [`Incoming`]: where the source sends the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncomingReady {
    /// `IP:PORT` of the receiver.
    pub listen: String,
    /// The name the receiver's certificate holds (the host's name).
    pub tls_name: String,
}

/// `POST /v1/vms/{name}/migrate`: move the VM to a receiver another agent made ready.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateVm {
    pub request_id: String,
    /// The [`IncomingReady`] of the destination.
    pub to: IncomingReady,
    pub protocol: MoveProtocol,
    /// For pre-copy: the longest the guest may stop.
    #[serde(default = "ferry_api::default_downtime_ms")]
    pub downtime_ms: u64,
    /// Cap on the link, bytes per second.
    #[serde(default)]
    pub bandwidth_bytes_per_sec: Option<u64>,
    /// Give up after this long.
    #[serde(default)]
    pub max_time_secs: Option<u64>,
}

/// Whether `name` is a usable VM name (it becomes a folder name).
pub fn valid_vm_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && !name.starts_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_names_cannot_escape_their_folder() {
        for good in ["vm-1", "web_2", "A"] {
            assert!(valid_vm_name(good), "{good}");
        }
        for bad in ["", "..", "a/b", "-x", "a b", &"x".repeat(65), "é"] {
            assert!(!valid_vm_name(bad), "{bad}");
        }
    }

    #[test]
    fn requests_refuse_unknown_fields() {
        let bad =
            r#"{"request_id":"1","name":"a","spec":{"kernel":"k","memory_mib":1,"vcpus":1},"x":1}"#;
        assert!(serde_json::from_str::<StartVm>(bad).is_err());
        let good =
            r#"{"request_id":"1","name":"a","spec":{"kernel":"k","memory_mib":1,"vcpus":1}}"#;
        assert!(serde_json::from_str::<StartVm>(good).is_ok());
    }
}
