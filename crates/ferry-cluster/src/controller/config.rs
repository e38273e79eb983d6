//! The controller's configuration file (TOML): the hosts it manages and its policy.
//!
//! ```toml
//! [[host]]
//! name = "h1"
//! api = "10.0.0.1:7700"
//!
//! [policy]
//! hot_cpu = 0.8
//! ```

use std::collections::BTreeSet;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::policy::Policy;

/// One host: its agent's name (its certificate holds it) and API address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostEntry {
    pub name: String,
    pub api: String,
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    #[serde(rename = "host", default)]
    pub hosts: Vec<HostEntry>,
    #[serde(default)]
    pub policy: Policy,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
}

impl ClusterFile {
    pub fn load(path: &Path) -> Result<ClusterFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        ClusterFile::parse(&text).map_err(|reason| ConfigError::Invalid {
            path: path.display().to_string(),
            reason,
        })
    }

    pub fn parse(text: &str) -> Result<ClusterFile, String> {
        let file: ClusterFile = toml::from_str(text).map_err(|e| e.to_string())?;
        file.policy.validate().map_err(|e| e.to_string())?;
        if file.hosts.is_empty() {
            return Err("no [[host]]: the controller needs hosts to manage".into());
        }
        let mut names = BTreeSet::new();
        for h in &file.hosts {
            if !crate::agent_api::valid_vm_name(&h.name) {
                return Err(format!("{:?} is not a host name", h.name));
            }
            if !names.insert(&h.name) {
                return Err(format!("host {} is listed twice", h.name));
            }
            if ferry_vmm::migration::wire::server_name(&h.api).is_err() || !h.api.contains(':') {
                return Err(format!("host {}: api {:?} is not HOST:PORT", h.name, h.api));
            }
        }
        Ok(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_file_parses_with_the_default_policy() {
        let file = ClusterFile::parse(
            "[[host]]\nname = \"h1\"\napi = \"10.0.0.1:7700\"\n[[host]]\nname = \"h2\"\napi = \"10.0.0.2:7700\"\n",
        )
        .expect("parses");
        assert_eq!(file.hosts.len(), 2);
        assert_eq!(file.policy, Policy::default());
    }

    #[test]
    fn bad_cluster_files_are_refused_with_the_reason() {
        for (text, says) in [
            ("", "no [[host]]"),
            (
                "[[host]]\nname = \"a\"\napi = \"x:1\"\n[[host]]\nname = \"a\"\napi = \"y:1\"\n",
                "twice",
            ),
            (
                "[[host]]\nname = \"a/b\"\napi = \"x:1\"\n",
                "not a host name",
            ),
            ("[[host]]\nname = \"a\"\napi = \"nowhere\"\n", "HOST:PORT"),
            (
                "[[host]]\nname = \"a\"\napi = \"x:1\"\nport = 3\n",
                "unknown field",
            ),
            (
                "[[host]]\nname = \"a\"\napi = \"x:1\"\n[policy]\nhot_cpu = 0.5\ncool_cpu = 0.6\n",
                "cool",
            ),
        ] {
            let e = ClusterFile::parse(text).expect_err(text);
            assert!(e.contains(says), "{text:?}: {e}");
        }
    }
}
