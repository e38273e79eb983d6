//! The operator's policy: thresholds, limits and which scenarios the controller may enter,
//! read from TOML and checked before use.

use serde::{Deserialize, Serialize};

/// Which automatic scenarios the controller may enter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScenarioMode {
    /// Balance load when a host is hot, consolidate when the cluster is calm.
    #[default]
    Auto,
    /// Only balance load.
    Balance,
    /// Only consolidate and power off emptied hosts.
    PowerSaving,
    /// No automatic moves (evacuations an operator asks for still run).
    Off,
}

/// How an evacuation moves VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EvacuationMode {
    /// VMs with open client connections first, by pre-copy; the others by pause-and-copy,
    /// which sends each page once.
    #[default]
    DependencyAware,
    /// Every VM by pre-copy, cheapest first (the comparison the benchmark makes).
    PreCopy,
}

impl ScenarioMode {
    /// Hot hosts are relieved.
    pub fn balances(self) -> bool {
        matches!(self, ScenarioMode::Auto | ScenarioMode::Balance)
    }

    /// A calm cluster is packed onto fewer hosts.
    pub fn saves_power(self) -> bool {
        matches!(self, ScenarioMode::Auto | ScenarioMode::PowerSaving)
    }
}

/// What the controller decides by. Shares are of a host's capacity (1.0 = all of it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    /// Which scenarios the controller may enter: `auto` (balance when a host is hot, save
    /// power when the cluster is calm), `balance`, `power-saving` or `off`.
    pub scenario: ScenarioMode,
    /// A host whose VMs use at least this share of its CPU capacity for `sustain_secs` is hot.
    pub hot_cpu: f64,
    /// A hot host stops being hot only once its CPU share stays below this (and its memory
    /// below `hot_memory`) for `sustain_secs`: the gap to `hot_cpu` keeps a host that hovers
    /// at the threshold from flapping.
    pub cool_cpu: f64,
    /// A host whose VMs were given at least this share of its memory for `sustain_secs` is
    /// hot. No move may take a destination to this share.
    pub hot_memory: f64,
    /// How long load must stay over (or, for a hot host, under) the thresholds before the
    /// host's state changes, in seconds. A single sample never makes a hotspot.
    pub sustain_secs: f64,
    /// No move may take a destination's CPU share above this; a hot host is relieved down to
    /// it. Below `hot_cpu`, so that moves do not make new hotspots.
    pub target_cpu: f64,
    /// Power saving starts when the cluster's average CPU share stays below this for
    /// `consolidate_sustain_secs`.
    pub consolidate_below: f64,
    /// How long the cluster must stay calm before VMs are packed onto fewer hosts, in seconds.
    pub consolidate_sustain_secs: f64,
    /// Migrations one host takes part in at once, as source or destination.
    pub max_per_host: u32,
    /// Migrations between one pair of hosts at once, either direction.
    pub max_per_link: u32,
    /// Migrations in the whole cluster at once.
    pub max_total: u32,
    /// A VM that moved stays where it is for this long, in seconds: no ping-pong.
    pub cooldown_secs: f64,
    /// The longest pause a pre-copy move may cause at switchover, in milliseconds.
    pub downtime_ms: u64,
    /// The link rate assumed between hosts when estimating what a move sends, in Gbit/s.
    pub link_gbit_per_sec: f64,
    /// How evacuations pick each VM's protocol: `dependency-aware` or `pre-copy`.
    pub evacuation: EvacuationMode,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            scenario: ScenarioMode::Auto,
            hot_cpu: 0.80,
            cool_cpu: 0.65,
            hot_memory: 0.95,
            sustain_secs: 5.0,
            target_cpu: 0.70,
            consolidate_below: 0.30,
            consolidate_sustain_secs: 20.0,
            max_per_host: 1,
            max_per_link: 1,
            max_total: 4,
            cooldown_secs: 60.0,
            downtime_ms: 100,
            link_gbit_per_sec: 1.0,
            evacuation: EvacuationMode::DependencyAware,
        }
    }
}

/// Why a policy was refused.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("the policy is not valid TOML: {0}")]
    Toml(#[from] toml::de::Error),
    #[error("policy field {field} = {value} is out of range: it must be {expected}")]
    OutOfRange {
        field: &'static str,
        value: f64,
        expected: &'static str,
    },
    #[error("policy fields disagree: {0}")]
    Inconsistent(String),
}

const EXAMPLE_TOML: &str = r#"# ferry controller policy. Shares are of a host's capacity (1.0 = all of it).

# Which scenarios the controller may enter: "auto" (balance when a host is hot, save power
# when the cluster is calm), "balance", "power-saving" or "off".
scenario = "auto"

# A host whose VMs use at least this share of its CPU for sustain_secs is hot.
hot_cpu = 0.80
# A hot host stops being hot only once its CPU stays below this (and its memory below
# hot_memory) for sustain_secs.
cool_cpu = 0.65
# A host whose VMs were given at least this share of its memory for sustain_secs is hot;
# no move takes a destination to this share.
hot_memory = 0.95
# Seconds load must stay over (or, for a hot host, under) the thresholds.
sustain_secs = 5.0

# No move takes a destination above this CPU share; hot hosts are relieved down to it.
target_cpu = 0.70

# Power saving starts when the cluster's average CPU share stays below this...
consolidate_below = 0.30
# ...for this many seconds.
consolidate_sustain_secs = 20.0

# Migrations one host takes part in at once (as source or destination).
max_per_host = 1
# Migrations between one pair of hosts at once (either direction).
max_per_link = 1
# Migrations in the cluster at once.
max_total = 4

# Seconds a VM that moved stays put.
cooldown_secs = 60.0
# Longest switchover pause of a pre-copy move, in milliseconds.
downtime_ms = 100
# Link rate between hosts assumed when estimating what a move sends, in Gbit/s.
link_gbit_per_sec = 1.0

# How an evacuation moves VMs: "dependency-aware" (VMs with open client connections first,
# by pre-copy; the others by pause-and-copy) or "pre-copy" (every VM).
evacuation = "dependency-aware"
"#;

impl Policy {
    /// Reads a policy from TOML (missing fields take their defaults) and checks it.
    pub fn from_toml(text: &str) -> Result<Policy, PolicyError> {
        let policy: Policy = toml::from_str(text)?;
        policy.validate()?;
        Ok(policy)
    }

    /// A policy file with every field at its default, commented: the operator's template.
    pub fn example_toml() -> &'static str {
        EXAMPLE_TOML
    }

    /// The assumed link rate in bytes per second.
    pub fn link_bytes_per_sec(&self) -> f64 {
        self.link_gbit_per_sec * 1e9 / 8.0
    }

    /// Checks ranges and the orderings the decisions rely on.
    pub fn validate(&self) -> Result<(), PolicyError> {
        for (field, value) in [
            ("hot_cpu", self.hot_cpu),
            ("cool_cpu", self.cool_cpu),
            ("hot_memory", self.hot_memory),
            ("target_cpu", self.target_cpu),
            ("consolidate_below", self.consolidate_below),
        ] {
            if !(value > 0.0 && value <= 2.0) {
                return Err(PolicyError::OutOfRange {
                    field,
                    value,
                    expected: "a share in (0, 2]",
                });
            }
        }
        for (field, value) in [
            ("sustain_secs", self.sustain_secs),
            ("consolidate_sustain_secs", self.consolidate_sustain_secs),
            ("link_gbit_per_sec", self.link_gbit_per_sec),
        ] {
            if !(value > 0.0 && value.is_finite()) {
                return Err(PolicyError::OutOfRange {
                    field,
                    value,
                    expected: "above 0",
                });
            }
        }
        if !(self.cooldown_secs >= 0.0 && self.cooldown_secs.is_finite()) {
            return Err(PolicyError::OutOfRange {
                field: "cooldown_secs",
                value: self.cooldown_secs,
                expected: "0 or more",
            });
        }
        for (field, value) in [
            ("max_per_host", self.max_per_host),
            ("max_per_link", self.max_per_link),
            ("max_total", self.max_total),
        ] {
            if value < 1 {
                return Err(PolicyError::OutOfRange {
                    field,
                    value: f64::from(value),
                    expected: "1 or more",
                });
            }
        }
        if self.downtime_ms < 1 {
            return Err(PolicyError::OutOfRange {
                field: "downtime_ms",
                value: self.downtime_ms as f64,
                expected: "1 or more",
            });
        }
        // Without the gap, a host at the threshold flaps between hot and cool.
        if self.cool_cpu >= self.hot_cpu {
            return Err(PolicyError::Inconsistent(format!(
                "cool_cpu ({}) must be below hot_cpu ({})",
                self.cool_cpu, self.hot_cpu
            )));
        }
        // A move that took its destination to hot_cpu would make the next hotspot.
        if self.target_cpu >= self.hot_cpu {
            return Err(PolicyError::Inconsistent(format!(
                "target_cpu ({}) must be below hot_cpu ({})",
                self.target_cpu, self.hot_cpu
            )));
        }
        // Packing hosts up to target_cpu can only free one when the average is below it.
        if self.consolidate_below >= self.target_cpu {
            return Err(PolicyError::Inconsistent(format!(
                "consolidate_below ({}) must be below target_cpu ({})",
                self.consolidate_below, self.target_cpu
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_parses_to_the_defaults() {
        let policy = Policy::from_toml(Policy::example_toml()).expect("the example parses");
        assert_eq!(policy, Policy::default());
        Policy::default()
            .validate()
            .expect("the defaults are valid");
    }

    #[test]
    fn example_names_every_field() {
        let example: toml::Table = toml::from_str(Policy::example_toml()).expect("toml");
        let mut example_keys: Vec<&String> = example.keys().collect();
        example_keys.sort();
        let defaults = serde_json::to_value(Policy::default()).expect("json");
        let mut field_keys: Vec<&String> =
            defaults.as_object().expect("an object").keys().collect();
        field_keys.sort();
        assert_eq!(example_keys, field_keys);
    }

    #[test]
    fn missing_fields_take_defaults() {
        let policy = Policy::from_toml("scenario = \"power-saving\"\nmax_total = 8\n")
            .expect("valid policy");
        assert_eq!(
            policy,
            Policy {
                scenario: ScenarioMode::PowerSaving,
                max_total: 8,
                ..Policy::default()
            }
        );
        assert_eq!(Policy::from_toml("").expect("empty"), Policy::default());
    }

    #[test]
    fn refuses_bad_policies() {
        // (policy text, a piece of the error message)
        let cases: &[(&str, &str)] = &[
            ("hot_cpus = 0.9", "hot_cpus"),
            ("scenario = \"sometimes\"", "sometimes"),
            ("hot_cpu = \"high\"", "not valid TOML"),
            (
                "cool_cpu = 0.85",
                "cool_cpu (0.85) must be below hot_cpu (0.8)",
            ),
            (
                "target_cpu = 0.8",
                "target_cpu (0.8) must be below hot_cpu (0.8)",
            ),
            (
                "consolidate_below = 0.7",
                "consolidate_below (0.7) must be below target_cpu (0.7)",
            ),
            ("hot_cpu = 0.0", "hot_cpu = 0"),
            ("hot_memory = 2.5", "hot_memory = 2.5"),
            ("sustain_secs = 0.0", "sustain_secs"),
            (
                "consolidate_sustain_secs = -1.0",
                "consolidate_sustain_secs",
            ),
            ("cooldown_secs = -5.0", "cooldown_secs"),
            ("max_per_host = 0", "max_per_host"),
            ("max_per_link = 0", "max_per_link"),
            ("max_total = 0", "max_total"),
            ("downtime_ms = 0", "downtime_ms"),
            ("link_gbit_per_sec = 0.0", "link_gbit_per_sec"),
            ("max_total = -1", "not valid TOML"),
        ];
        for (text, expected) in cases {
            let error = Policy::from_toml(text).expect_err(text).to_string();
            assert!(
                error.contains(expected),
                "{text:?}: {error:?} does not mention {expected:?}"
            );
        }
    }

    #[test]
    fn accepts_edges_of_ranges() {
        let text = "hot_cpu = 2.0\ncool_cpu = 1.5\ntarget_cpu = 1.9\nhot_memory = 2.0\n\
                    cooldown_secs = 0.0\nscenario = \"off\"";
        let policy = Policy::from_toml(text).expect("valid policy");
        assert_eq!(policy.scenario, ScenarioMode::Off);
        assert_eq!(policy.hot_cpu, 2.0);
    }

    #[test]
    fn scenario_modes() {
        // (mode, balances, saves power)
        let cases = [
            (ScenarioMode::Auto, true, true),
            (ScenarioMode::Balance, true, false),
            (ScenarioMode::PowerSaving, false, true),
            (ScenarioMode::Off, false, false),
        ];
        for (mode, balances, saves) in cases {
            assert_eq!(mode.balances(), balances, "{mode:?}");
            assert_eq!(mode.saves_power(), saves, "{mode:?}");
        }
    }
}
