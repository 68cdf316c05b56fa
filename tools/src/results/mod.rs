//! Run results as data: the typed model behind `results.json` (schema in `SCHEMA.md` beside this file).
//!
//! A console report is parsed into a [`Report`] ([`parse`]); a boot with its
//! selectors and ending becomes a [`Run`]; the runs of one `run` or
//! `compare` command are one [`Results`], written by [`write::write_dir`] as
//! JSON, one CSV per table and an SVG under `target/umbra/results/<timestamp>/`.

pub mod diff;
pub mod metrics;
pub mod parse;
pub mod sched;
pub mod schema;
pub mod svg;
pub mod table;
#[cfg(test)]
pub mod test_data;
pub mod timeline;
pub mod write;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// The `schema` field of every results file.
pub const SCHEMA_NAME: &str = "umbra-results";
/// The version of the results schema this code writes. Bump it (and
/// `SCHEMA.md`, `schema.json`) on any change a reader could notice.
pub const SCHEMA_VERSION: u32 = 2;
/// Every version this code reads: version 1 is version 2 without
/// `report.sched`.
pub const SCHEMA_VERSIONS_READ: [u32; 2] = [1, 2];

/// A number in a report: a count, or a ratio (exits per demand fault,
/// instructions per exit). JSON keeps the distinction: `3` vs `3.0`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Value {
    /// A whole count.
    Count(u64),
    /// A ratio or average.
    Ratio(f64),
}

impl Value {
    /// The value as a float, for comparing and plotting.
    pub fn as_f64(self) -> f64 {
        match self {
            Value::Count(c) => c as f64,
            Value::Ratio(r) => r,
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Count(c) => write!(f, "{c}"),
            Value::Ratio(r) => write!(f, "{r:.2}"),
        }
    }
}

/// Whether a workload passed, as the kernel judged it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// `PASS`.
    #[serde(rename = "PASS")]
    Pass,
    /// `FAIL`.
    #[serde(rename = "FAIL")]
    Fail,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Pass => "PASS",
            Verdict::Fail => "FAIL",
        })
    }
}

/// One guest workload's figures in one run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Workload {
    /// Workload name (`demand-64M`, ...).
    pub name: String,
    /// Domain number the kernel gave it (`d1` is 1).
    pub domain: u32,
    /// vCPUs it ran on.
    pub vcpus: u32,
    /// The kernel's verdict.
    pub verdict: Verdict,
    /// Words after the verdict, e.g. `(faulted, then stopped on shutdown)`;
    /// empty when none.
    pub verdict_detail: String,
    /// Metric key (see [`metrics::CATALOGUE`]) to value. Absent keys were not
    /// reported by this run (not the same as 0).
    pub metrics: BTreeMap<String, Value>,
}

/// One pCPU's row of the kernel's per-pCPU exit table.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Pcpu {
    /// pCPU number.
    pub cpu: u32,
    /// Exit reason (bucket key, see [`metrics::EXIT_BUCKETS`]) to exits.
    pub exits: BTreeMap<String, u64>,
    /// The other columns of the table (faults_fixed, shootdown_ipis, ...).
    pub counters: BTreeMap<String, u64>,
}

impl Pcpu {
    /// All exits on this pCPU, every reason.
    pub fn total_exits(&self) -> u64 {
        self.exits.values().sum()
    }
}

/// What one console report says, parsed by [`parse::parse_console`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The MMU server the report names.
    pub server: Option<String>,
    /// CPUs the workloads ran on.
    pub cpus: Option<u32>,
    /// Workloads that passed, from `svm: N/M workloads passed`.
    pub workloads_passed: Option<u32>,
    /// Workloads run, from the same line.
    pub workloads_total: Option<u32>,
    /// Shadow pages in use at the end of the run.
    pub shadow_pages_in_use: Option<u64>,
    /// Most shadow pages in use at once during the run.
    pub shadow_pages_peak: Option<u64>,
    /// Per workload, in report order.
    pub workloads: Vec<Workload>,
    /// The per-pCPU exit table (without its `all` row).
    pub pcpus: Vec<Pcpu>,
    /// The scheduler's figures and trace (`sched:`/`trace:` lines); absent
    /// when the run printed none (schema version 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sched: Option<sched::Sched>,
}

/// The combination of implementations and settings one boot ran.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Selectors {
    /// MMU server name; empty for `--mmu none`.
    pub mmu: String,
    /// CPUs QEMU gave the machine.
    pub smp: u32,
    /// Whether QEMU counted instructions (`-icount`).
    pub icount: bool,
    /// Kernel-server transport (`transport=`), when chosen.
    pub transport: Option<String>,
    /// Grant server (`grant=`), when chosen.
    pub grant: Option<String>,
    /// vCPU scheduler (`sched=`), when chosen.
    pub sched: Option<String>,
}

impl Selectors {
    /// `key=value` words, in a fixed order, for labels and progress lines.
    pub fn words(&self) -> Vec<(&'static str, String)> {
        let mut w = vec![("mmu", self.mmu.clone()), ("smp", self.smp.to_string())];
        if self.icount {
            w.push(("icount", "on".into()));
        }
        for (k, v) in [
            ("transport", &self.transport),
            ("grant", &self.grant),
            ("sched", &self.sched),
        ] {
            if let Some(v) = v {
                w.push((k, v.clone()));
            }
        }
        w
    }
}

/// How a boot ended, as recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EndingKind {
    /// The image reported success.
    Success,
    /// The image reported failure.
    Failure,
    /// QEMU exited 0 (triple fault, or no isa-debug-exit write).
    TripleFault,
    /// QEMU exited with another status, or was killed by a signal.
    Other,
    /// Killed at the time limit.
    Timeout,
}

impl fmt::Display for EndingKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EndingKind::Success => "success",
            EndingKind::Failure => "failure",
            EndingKind::TripleFault => "triple-fault",
            EndingKind::Other => "other",
            EndingKind::Timeout => "timeout",
        })
    }
}

/// One boot: its selectors, how it ended, and its parsed report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Run {
    /// Column label in tables: the selector values that differ between the
    /// runs of this command (the MMU name always).
    pub label: String,
    /// What ran.
    pub selectors: Selectors,
    /// The kernel command line.
    pub kernel_args: String,
    /// How the boot ended.
    pub ending: EndingKind,
    /// QEMU's exit status, when it exited with one.
    pub exit_status: Option<i32>,
    /// Wall time of the boot, seconds.
    pub wall_seconds: f64,
    /// The parsed console report.
    pub report: Report,
}

/// Everything one `run` or `compare` command produced: the content of
/// `results.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Results {
    /// Always [`SCHEMA_NAME`].
    pub schema: String,
    /// [`SCHEMA_VERSION`] of the writer.
    pub schema_version: u32,
    /// `run` or `compare`.
    pub command: String,
    /// When the command started, UTC, `YYYY-MM-DDTHH:MM:SSZ`.
    pub created: String,
    /// One per boot, in the order they ran.
    pub runs: Vec<Run>,
}

impl Results {
    /// Empty results of `command`, stamped with the current time.
    pub fn new(command: &str) -> Results {
        Results {
            schema: SCHEMA_NAME.into(),
            schema_version: SCHEMA_VERSION,
            command: command.into(),
            created: write::utc_stamp(std::time::SystemTime::now()).0,
            runs: Vec::new(),
        }
    }

    /// Workload names over all runs, in first-seen order.
    pub fn workload_names(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for w in self.runs.iter().flat_map(|r| &r.report.workloads) {
            if !names.contains(&w.name) {
                names.push(w.name.clone());
            }
        }
        names
    }
}

/// Labels for runs: the selector words that differ between them (`mmu`
/// always), joined by spaces; `none` for a run with no MMU server.
pub fn labels(selectors: &[Selectors]) -> Vec<String> {
    let words: Vec<Vec<(&str, String)>> = selectors.iter().map(Selectors::words).collect();
    let varies = |key: &str| {
        let mut vals = words
            .iter()
            .map(|w| w.iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone()));
        let first = vals.next().flatten();
        vals.any(|v| v != first)
    };
    words
        .iter()
        .map(|w| {
            let mut parts = Vec::new();
            for (k, v) in w {
                if *k == "mmu" {
                    parts.push(if v.is_empty() {
                        "none".into()
                    } else {
                        v.clone()
                    });
                } else if varies(k) {
                    parts.push(format!("{k}={v}"));
                }
            }
            parts.join(" ")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{labels, EndingKind, Selectors, Value};

    fn sel(mmu: &str, smp: u32, sched: Option<&str>) -> Selectors {
        Selectors {
            mmu: mmu.into(),
            smp,
            sched: sched.map(String::from),
            ..Selectors::default()
        }
    }

    #[test]
    fn labels_name_only_what_varies() {
        let s = [sel("reference", 8, None), sel("fast-shared", 8, None)];
        assert_eq!(labels(&s), ["reference", "fast-shared"]);
        let s = [sel("reference", 1, None), sel("reference", 8, None)];
        assert_eq!(labels(&s), ["reference smp=1", "reference smp=8"]);
        let s = [sel("a", 8, Some("pinned")), sel("a", 8, None)];
        assert_eq!(labels(&s), ["a sched=pinned", "a"]);
        assert_eq!(labels(&[sel("", 8, None)]), ["none"]);
    }

    #[test]
    fn endings_print_as_their_json_names() {
        for e in [
            EndingKind::Success,
            EndingKind::Failure,
            EndingKind::TripleFault,
            EndingKind::Other,
            EndingKind::Timeout,
        ] {
            assert_eq!(serde_json::to_string(&e).unwrap(), format!("\"{e}\""));
        }
    }

    #[test]
    fn values_keep_counts_and_ratios_apart_in_json() {
        let v: Vec<Value> = serde_json::from_str("[3, 3.5, 4.0]").unwrap();
        assert_eq!(v, [Value::Count(3), Value::Ratio(3.5), Value::Ratio(4.0)]);
        assert_eq!(serde_json::to_string(&v).unwrap(), "[3,3.5,4.0]");
        assert_eq!(Value::Ratio(3.919).to_string(), "3.92");
    }
}
