//! A run's scheduler figures: the `sched:` and `trace:` console lines, parsed, and the per-policy summary table.
//!
//! Line formats (tokens separated by spaces, no prefix; see `SCHEMA.md`,
//! "Scheduler lines"):
//!
//! ```text
//! sched: v=1 policy=<name> vcpu=<id> domain=<n> workload=<name> weight=<w> cpu_us=<n> slices=<n> migrations=<n>
//! sched: v=1 policy=<name> pcpu=<p> busy_us=<n> idle_us=<n> slices=<n>
//! sched: v=1 policy=<name> summary migrations=<n> migration_flushes=<n> refused=<n> jain_equal=<x|-> worst_share_error=<x|->
//! trace: v=1 pcpu=<p> vcpu=<id> domain=<n> start_us=<n> end_us=<n>
//! ```

use crate::results::table::push_record;
use crate::results::{Results, Run, Selectors};
use serde::{Deserialize, Serialize};
use std::fmt::Write;

/// The version of `sched:` and `trace:` lines this parser reads (`v=1`).
pub const SCHED_LINE_VERSION: u32 = 1;

/// One vCPU's line: what the scheduler gave it over the run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchedVcpu {
    /// The vCPU's wire id (`abi::VcpuId`).
    pub vcpu: u32,
    /// Domain number of its workload.
    pub domain: u32,
    /// Its workload's name.
    pub workload: String,
    /// Its scheduling weight.
    pub weight: u32,
    /// CPU time it ran, microseconds.
    pub cpu_us: u64,
    /// Slices it ran.
    pub slices: u64,
    /// Times it ran on a different pCPU than its previous slice.
    pub migrations: u64,
}

/// One pCPU's line: how busy the scheduler kept it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchedPcpu {
    /// pCPU number.
    pub pcpu: u32,
    /// Time it ran vCPUs, microseconds.
    pub busy_us: u64,
    /// Time it was idle, microseconds.
    pub idle_us: u64,
    /// Slices it ran.
    pub slices: u64,
}

/// One slice of the trace: a vCPU on a pCPU from `start_us` to `end_us`
/// (microseconds since the run began).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slice {
    /// pCPU it ran on.
    pub pcpu: u32,
    /// vCPU wire id.
    pub vcpu: u32,
    /// The vCPU's domain.
    pub domain: u32,
    /// Start, microseconds since the run began.
    pub start_us: u64,
    /// End (not before the start), microseconds since the run began.
    pub end_us: u64,
}

/// What a run's scheduler lines say (`report.sched` in `results.json`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Sched {
    /// The policy the lines name; `None` when only `trace:` lines came.
    pub policy: Option<String>,
    /// Per vCPU, by wire id.
    pub vcpus: Vec<SchedVcpu>,
    /// Per pCPU, by number.
    pub pcpus: Vec<SchedPcpu>,
    /// Migrations over the run (summary line).
    pub migrations: Option<u64>,
    /// TLB/shadow flushes caused by migrations (summary line).
    pub migration_flushes: Option<u64>,
    /// Decisions of the policy the kernel refused (summary line).
    pub refused: Option<u64>,
    /// Jain's fairness index over the equal-weight vCPUs; `None` for `-`.
    pub jain_equal: Option<f64>,
    /// Worst relative error of a weighted vCPU's share; `None` for `-`.
    pub worst_share_error: Option<f64>,
    /// The slices, in console order.
    pub trace: Vec<Slice>,
}

impl Sched {
    /// Whether no line said anything.
    pub fn is_empty(&self) -> bool {
        *self == Sched::default()
    }
}

/// Splits `v=<n> key=value ...` into pairs after checking the version;
/// `bare` words (no `=`) come back as `(word, "")`. Errors name the word.
pub fn versioned_pairs<'a>(
    rest: &'a str,
    what: &str,
    version: u32,
    bare: &[&str],
) -> Result<Vec<(&'a str, &'a str)>, String> {
    let mut pairs: Vec<(&str, &str)> = Vec::new();
    for word in rest.split_whitespace() {
        let (k, v) = match word.split_once('=') {
            Some(kv) => kv,
            None if bare.contains(&word) => (word, ""),
            None => return Err(format!("`{word}` is not `key=value`")),
        };
        if k.is_empty() || crate::results::metrics::sanitize(k) != k {
            return Err(format!("`{k}` is not a key (a-z, 0-9, `_`, `.`)"));
        }
        if pairs.iter().any(|(seen, _)| *seen == k) {
            return Err(format!("key `{k}` given twice"));
        }
        pairs.push((k, v));
    }
    match pairs.first() {
        Some(("v", v)) if *v == version.to_string() => Ok(pairs.split_off(1)),
        Some(("v", v)) => Err(format!(
            "{what} line version `{v}`; this parser reads v={version}"
        )),
        _ => Err(format!("a {what} line starts with `v=<version>`")),
    }
}

/// The `key=value` pairs of one line, taken out by name; unknown keys are
/// an error once the record is read.
struct Fields<'a>(Vec<(&'a str, &'a str)>);

impl<'a> Fields<'a> {
    fn take(&mut self, key: &str) -> Result<&'a str, String> {
        let at = self
            .0
            .iter()
            .position(|(k, _)| *k == key)
            .ok_or_else(|| format!("no `{key}=`"))?;
        Ok(self.0.remove(at).1)
    }

    fn num<T: std::str::FromStr>(&mut self, key: &str) -> Result<T, String> {
        let v = self.take(key)?;
        v.parse()
            .map_err(|_| format!("{key}: `{v}` is not a whole number"))
    }

    /// A decimal number or `-` (`None`).
    fn ratio(&mut self, key: &str) -> Result<Option<f64>, String> {
        match self.take(key)? {
            "-" => Ok(None),
            v => match v.parse::<f64>() {
                Ok(x) if x.is_finite() && x >= 0.0 => Ok(Some(x)),
                _ => Err(format!("{key}: `{v}` is not a number or `-`")),
            },
        }
    }

    fn done(self) -> Result<(), String> {
        match self.0.first() {
            None => Ok(()),
            Some((k, _)) => Err(format!("unknown key `{k}`")),
        }
    }
}

/// A `sched:` line (after the prefix) into `sched`.
pub fn sched_line(rest: &str, sched: &mut Sched) -> Result<(), String> {
    let mut f = Fields(versioned_pairs(
        rest,
        "sched",
        SCHED_LINE_VERSION,
        &["summary"],
    )?);
    let policy = f.take("policy")?;
    if policy.is_empty() {
        return Err("`policy=` names no policy".into());
    }
    match &sched.policy {
        Some(p) if p != policy => {
            return Err(format!("policy `{policy}` here, `{p}` on earlier lines"))
        }
        _ => sched.policy = Some(policy.to_string()),
    }
    match f.0.first().map(|(k, _)| *k) {
        Some("vcpu") => {
            let v = SchedVcpu {
                vcpu: f.num("vcpu")?,
                domain: f.num("domain")?,
                workload: f.take("workload")?.to_string(),
                weight: f.num("weight")?,
                cpu_us: f.num("cpu_us")?,
                slices: f.num("slices")?,
                migrations: f.num("migrations")?,
            };
            f.done()?;
            if sched.vcpus.iter().any(|x| x.vcpu == v.vcpu) {
                return Err(format!("a second line for vCPU {}", v.vcpu));
            }
            sched.vcpus.push(v);
        }
        Some("pcpu") => {
            let p = SchedPcpu {
                pcpu: f.num("pcpu")?,
                busy_us: f.num("busy_us")?,
                idle_us: f.num("idle_us")?,
                slices: f.num("slices")?,
            };
            f.done()?;
            if sched.pcpus.iter().any(|x| x.pcpu == p.pcpu) {
                return Err(format!("a second line for pCPU {}", p.pcpu));
            }
            sched.pcpus.push(p);
        }
        Some("summary") => {
            f.take("summary")?;
            if sched.migrations.is_some() {
                return Err("a second summary line".into());
            }
            sched.migration_flushes = Some(f.num("migration_flushes")?);
            sched.refused = Some(f.num("refused")?);
            sched.jain_equal = f.ratio("jain_equal")?;
            sched.worst_share_error = f.ratio("worst_share_error")?;
            sched.migrations = Some(f.num("migrations")?);
            f.done()?;
        }
        _ => {
            return Err("after `policy=`, a sched line names `vcpu=`, `pcpu=` or `summary`".into())
        }
    }
    Ok(())
}

/// A `trace:` line (after the prefix) into `sched.trace`.
pub fn trace_line(rest: &str, sched: &mut Sched) -> Result<(), String> {
    let mut f = Fields(versioned_pairs(rest, "trace", SCHED_LINE_VERSION, &[])?);
    let s = Slice {
        pcpu: f.num("pcpu")?,
        vcpu: f.num("vcpu")?,
        domain: f.num("domain")?,
        start_us: f.num("start_us")?,
        end_us: f.num("end_us")?,
    };
    f.done()?;
    if s.end_us < s.start_us {
        return Err(format!(
            "end_us={} is before start_us={}",
            s.end_us, s.start_us
        ));
    }
    sched.trace.push(s);
    Ok(())
}

/// The issue's goal for Jain's index over equal-weight vCPUs: at least this.
pub const GOAL_JAIN: f64 = 0.99;
/// The issue's goal for weighted shares: `worst_share_error` (a fraction of
/// the target share, 0.05 = 5%) at most this.
pub const GOAL_SHARE_ERROR: f64 = 0.05;

/// The goals `sched` misses (Jain's index below [`GOAL_JAIN`], a share
/// error above [`GOAL_SHARE_ERROR`], a migration under `pinned`); figures
/// reported as `-` or not at all are not judged.
pub fn missed_goals(sched: &Sched) -> Vec<&'static str> {
    let mut missed = Vec::new();
    if sched.jain_equal.is_some_and(|j| j < GOAL_JAIN) {
        missed.push("jain");
    }
    if sched
        .worst_share_error
        .is_some_and(|e| e > GOAL_SHARE_ERROR)
    {
        missed.push("shares");
    }
    if sched.policy.as_deref() == Some("pinned") && sched.migrations.is_some_and(|m| m > 0) {
        missed.push("migrations");
    }
    missed
}

/// The vCPU's name in tables and pictures: `d<domain>/v<id>`.
pub fn vcpu_name(domain: u32, vcpu: u32) -> String {
    format!("d{domain}/v{vcpu}")
}

/// `1234` µs as `1.234` ms (exact).
pub fn ms(us: u64) -> String {
    format!("{}.{:03}", us / 1000, us % 1000)
}

/// One row of a [`SummaryTable`].
#[derive(Clone, Debug, PartialEq)]
pub struct SummaryRow {
    /// Row label.
    pub label: String,
    /// Stable key (for CSV and tests): `migrations`, `pcpu.<p>.busy_ms`,
    /// `vcpu.<id>.cpu_ms`, ...
    pub key: String,
    /// One cell per column; `-` where that run did not report it.
    pub cells: Vec<String>,
}

/// The scheduler figures of the runs that differ only in their policy:
/// policies as columns.
#[derive(Clone, Debug, PartialEq)]
pub struct SummaryTable {
    /// What the runs share (`reference transport=task`).
    pub group: String,
    /// Column heads: the policies.
    pub columns: Vec<String>,
    /// Rows: run-wide figures, then per pCPU, then per vCPU.
    pub rows: Vec<SummaryRow>,
}

/// `selectors` without the scheduler, as words: the group of a run.
fn group_of(s: &Selectors) -> String {
    let without = Selectors {
        sched: None,
        ..s.clone()
    };
    let words: Vec<String> = without
        .words()
        .into_iter()
        .map(|(k, v)| match k {
            "mmu" if v.is_empty() => "none".into(),
            "mmu" => v,
            _ => format!("{k}={v}"),
        })
        .collect();
    words.join(" ")
}

/// The column head of a run: its policy.
fn policy_of(run: &Run) -> String {
    run.selectors
        .sched
        .clone()
        .or_else(|| run.report.sched.as_ref().and_then(|s| s.policy.clone()))
        .unwrap_or_else(|| "default".into())
}

/// One table per group of runs (same selectors but the scheduler) of which
/// some run reported scheduler lines, in first-seen order.
pub fn summary_tables(results: &Results) -> Vec<SummaryTable> {
    let mut groups: Vec<(String, Vec<&Run>)> = Vec::new();
    for run in &results.runs {
        let g = group_of(&run.selectors);
        match groups.iter_mut().find(|(name, _)| *name == g) {
            Some((_, runs)) => runs.push(run),
            None => groups.push((g, vec![run])),
        }
    }
    groups
        .into_iter()
        .filter(|(_, runs)| runs.iter().any(|r| r.report.sched.is_some()))
        .map(|(group, runs)| summary_table(group, &runs))
        .collect()
}

/// Rows over columns of scheduler figures (`None`: that column's run
/// printed no scheduler lines), keys and labels prefixed.
struct Rows<'a> {
    scheds: Vec<Option<&'a Sched>>,
    key_prefix: String,
    label_prefix: String,
    rows: Vec<SummaryRow>,
}

impl Rows<'_> {
    fn row(&mut self, key: &str, label: &str, cell: &dyn Fn(&Sched) -> Option<String>) {
        let cells = self
            .scheds
            .iter()
            .map(|s| s.and_then(cell).unwrap_or_else(|| "-".into()))
            .collect();
        self.rows.push(SummaryRow {
            label: format!("{}{label}", self.label_prefix),
            key: format!("{}{key}", self.key_prefix),
            cells,
        });
    }

    /// The run-wide rows: the summary line's figures, the goals, slices.
    fn run_wide(&mut self) {
        let count = |v: Option<u64>| v.map(|n| n.to_string());
        self.row("migrations", "migrations", &|s| count(s.migrations));
        self.row("migration_flushes", "flushes caused by migrations", &|s| {
            count(s.migration_flushes)
        });
        self.row("refused", "decisions refused by the kernel", &|s| {
            count(s.refused)
        });
        self.row("jain_equal", "Jain's index, equal weights", &|s| {
            s.jain_equal.map(|x| format!("{x:.6}"))
        });
        self.row("worst_share_error", "worst share error (weighted)", &|s| {
            s.worst_share_error.map(|x| format!("{x:.4}"))
        });
        self.row(
            "goals",
            &format!(
                "goals (Jain >= {GOAL_JAIN}, share error <= {GOAL_SHARE_ERROR}, pinned: 0 migrations)"
            ),
            &|s| {
                let missed = missed_goals(s);
                Some(if missed.is_empty() {
                    "ok".into()
                } else {
                    format!("missed:{}", missed.join("+"))
                })
            },
        );
        self.row("slices", "slices (trace)", &|s| {
            (!s.trace.is_empty()).then(|| s.trace.len().to_string())
        });
    }
}

/// With runs of more than one group: the run-wide rows of every group in
/// one table (`<group>: migrations`, ...), policies as columns, so the
/// flushes migrations cause can be read across MMU servers.
pub fn overview_table(results: &Results) -> Option<SummaryTable> {
    let tables = summary_tables(results);
    if tables.len() < 2 {
        return None;
    }
    let mut columns: Vec<String> = Vec::new();
    for run in &results.runs {
        let p = policy_of(run);
        if !columns.contains(&p) {
            columns.push(p);
        }
    }
    let mut rows = Vec::new();
    for t in &tables {
        let scheds = columns
            .iter()
            .map(|p| {
                results
                    .runs
                    .iter()
                    .find(|r| group_of(&r.selectors) == t.group && policy_of(r) == *p)
                    .and_then(|r| r.report.sched.as_ref())
            })
            .collect();
        let mut r = Rows {
            scheds,
            key_prefix: format!("{}/", t.group),
            label_prefix: format!("{}: ", t.group),
            rows: Vec::new(),
        };
        r.run_wide();
        rows.extend(r.rows);
    }
    Some(SummaryTable {
        group: "overview".into(),
        columns,
        rows,
    })
}

fn summary_table(group: String, runs: &[&Run]) -> SummaryTable {
    let scheds: Vec<Option<&Sched>> = runs.iter().map(|r| r.report.sched.as_ref()).collect();
    let mut rows = Rows {
        scheds: scheds.clone(),
        key_prefix: String::new(),
        label_prefix: String::new(),
        rows: Vec::new(),
    };
    rows.run_wide();
    let mut row = |key: String, label: String, cell: &dyn Fn(&Sched) -> Option<String>| {
        rows.row(&key, &label, cell)
    };
    let pcpus: Vec<u32> = ordered(scheds.iter().flatten().flat_map(|s| &s.pcpus), |p| p.pcpu);
    for p in pcpus {
        let find = move |s: &Sched| s.pcpus.iter().find(|x| x.pcpu == p).cloned();
        row(
            format!("pcpu.{p}.busy_ms"),
            format!("pCPU {p} busy ms"),
            &|s| find(s).map(|x| ms(x.busy_us)),
        );
        row(
            format!("pcpu.{p}.busy_pct"),
            format!("pCPU {p} busy %"),
            &|s| {
                find(s)
                    .filter(|x| x.busy_us + x.idle_us > 0)
                    .map(|x| percent(x.busy_us, x.busy_us + x.idle_us))
            },
        );
    }
    let vcpus: Vec<u32> = ordered(scheds.iter().flatten().flat_map(|s| &s.vcpus), |v| v.vcpu);
    for id in vcpus {
        let find = move |s: &Sched| s.vcpus.iter().find(|x| x.vcpu == id).cloned();
        let Some(first) = scheds.iter().flatten().find_map(|s| find(s)) else {
            continue;
        };
        let name = format!(
            "{} {} w={}",
            vcpu_name(first.domain, id),
            first.workload,
            first.weight
        );
        row(
            format!("vcpu.{id}.cpu_ms"),
            format!("{name} cpu ms"),
            &|s| find(s).map(|x| ms(x.cpu_us)),
        );
        row(
            format!("vcpu.{id}.share_pct"),
            format!("{name} share of d{} % (target)", first.domain),
            &|s| {
                let v = find(s)?;
                let peers = s.vcpus.iter().filter(|x| x.domain == v.domain);
                let (cpu, weight) = peers.fold((0, 0u64), |(c, w), x| {
                    (c + x.cpu_us, w + u64::from(x.weight))
                });
                (cpu > 0 && weight > 0).then(|| {
                    format!(
                        "{} ({})",
                        percent(v.cpu_us, cpu),
                        percent(u64::from(v.weight), weight)
                    )
                })
            },
        );
        row(
            format!("vcpu.{id}.migrations"),
            format!("{name} migrations"),
            &|s| find(s).map(|x| x.migrations.to_string()),
        );
    }
    SummaryTable {
        group,
        columns: runs.iter().map(|r| policy_of(r)).collect(),
        rows: rows.rows,
    }
}

/// `part / whole` as a percentage with one decimal.
fn percent(part: u64, whole: u64) -> String {
    format!("{:.1}", part as f64 * 100.0 / whole as f64)
}

/// The distinct ids of `items`, sorted.
fn ordered<'a, T: 'a>(items: impl Iterator<Item = &'a T>, id: impl Fn(&T) -> u32) -> Vec<u32> {
    let mut ids: Vec<u32> = items.map(id).collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

impl SummaryTable {
    /// The table as text: a title, a header of policies, one line per row.
    pub fn render(&self) -> String {
        let label_w = self
            .rows
            .iter()
            .map(|r| r.label.len())
            .max()
            .unwrap_or(0)
            .max("scheduler".len());
        let widths: Vec<usize> = (0..self.columns.len())
            .map(|c| {
                self.rows
                    .iter()
                    .map(|r| r.cells[c].len())
                    .chain([self.columns[c].len()])
                    .max()
                    .unwrap_or(1)
            })
            .collect();
        let mut out = String::new();
        let _ = writeln!(out, "== scheduler: {} ==", self.group);
        let _ = write!(out, "{:<label_w$}", "scheduler");
        for (c, w) in self.columns.iter().zip(&widths) {
            let _ = write!(out, "  {c:>w$}");
        }
        out.push('\n');
        for r in &self.rows {
            let _ = write!(out, "{:<label_w$}", r.label);
            for (t, w) in r.cells.iter().zip(&widths) {
                let _ = write!(out, "  {t:>w$}");
            }
            out.push('\n');
        }
        out
    }

    /// The table as CSV: `row,key,<one column per policy>`.
    pub fn csv(&self) -> String {
        let mut out = String::new();
        let mut head = vec!["row".to_string(), "key".to_string()];
        head.extend(self.columns.iter().cloned());
        push_record(&mut out, &head);
        for r in &self.rows {
            let mut rec = vec![r.label.clone(), r.key.clone()];
            rec.extend(r.cells.iter().cloned());
            push_record(&mut out, &rec);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::{missed_goals, ms, overview_table, summary_tables, vcpu_name, Sched};
    use crate::results::parse::parse_console;
    use crate::results::schema::validate_results;
    use crate::results::test_data::{sched_runs, two_runs, SCHED};
    use crate::results::write::{load, sched_file, timeline_file, write_dir};
    use std::collections::BTreeMap;

    fn parsed(text: &str) -> Sched {
        let lines: Vec<&str> = text.lines().collect();
        parse_console(&lines).unwrap().sched.expect("sched lines")
    }

    #[test]
    fn the_lines_give_every_vcpu_pcpu_the_summary_and_the_trace() {
        let s = parsed(SCHED);
        assert_eq!(s.policy.as_deref(), Some("credit"));
        assert_eq!(s.vcpus.len(), 6);
        assert_eq!(s.pcpus.len(), 2);
        assert_eq!(s.trace.len(), 43);
        let v4 = &s.vcpus[4];
        assert_eq!(
            (v4.vcpu, v4.domain, v4.workload.as_str(), v4.weight),
            (4, 2, "sched-weighted", 512)
        );
        assert_eq!((v4.cpu_us, v4.slices, v4.migrations), (138_500, 7, 2));
        assert_eq!(s.pcpus[1].busy_us + s.pcpus[1].idle_us, 247_000);
        assert_eq!(
            (s.migrations, s.migration_flushes, s.refused),
            (Some(11), Some(22), Some(0))
        );
        assert_eq!(s.jain_equal, Some(0.996294));
        assert_eq!(s.worst_share_error, Some(0.0072));
        let first = &s.trace[0];
        assert_eq!(
            (
                first.pcpu,
                first.vcpu,
                first.domain,
                first.start_us,
                first.end_us
            ),
            (0, 0, 1, 0, 10_000)
        );
        // The fixture's per-vCPU and per-pCPU lines agree with its trace, so
        // every number was read into the right field.
        let mut per_vcpu: BTreeMap<u32, (u64, u64, u64, Option<u32>)> = BTreeMap::new();
        let mut per_pcpu: BTreeMap<u32, (u64, u64)> = BTreeMap::new();
        for t in &s.trace {
            let e = per_vcpu.entry(t.vcpu).or_default();
            e.0 += t.end_us - t.start_us;
            e.1 += 1;
            e.2 += u64::from(e.3.is_some_and(|p| p != t.pcpu));
            e.3 = Some(t.pcpu);
            let p = per_pcpu.entry(t.pcpu).or_default();
            p.0 += t.end_us - t.start_us;
            p.1 += 1;
        }
        for v in &s.vcpus {
            let (cpu, slices, migrations, _) = per_vcpu[&v.vcpu];
            assert_eq!(
                (v.cpu_us, v.slices, v.migrations),
                (cpu, slices, migrations),
                "vCPU {}",
                v.vcpu
            );
        }
        for p in &s.pcpus {
            assert_eq!((p.busy_us, p.slices), per_pcpu[&p.pcpu], "pCPU {}", p.pcpu);
        }
        let all: u64 = s.vcpus.iter().map(|v| v.migrations).sum();
        assert_eq!(s.migrations, Some(all));
    }

    #[test]
    fn a_console_without_sched_lines_has_no_sched_and_dash_means_none() {
        let lines: Vec<&str> = crate::results::test_data::REFERENCE.lines().collect();
        assert_eq!(parse_console(&lines).unwrap().sched, None);
        let s = parsed("sched: v=1 policy=pinned summary migrations=0 migration_flushes=0 refused=0 jain_equal=- worst_share_error=-");
        assert_eq!(
            (s.jain_equal, s.worst_share_error, s.migrations),
            (None, None, Some(0))
        );
        let s = parsed("trace: v=1 pcpu=3 vcpu=9 domain=2 start_us=5 end_us=5");
        assert_eq!((s.policy, s.trace.len()), (None, 1));
        // The kernel's prose under the same prefixes is not a record.
        let mut text = SCHED.to_string();
        for prose in [
            "sched: pcpu 3: refused the decision Run { vcpu: VcpuId(7) } of `credit`: Blocked",
            "sched: scheduler `credit` STOPPED on pcpu 1 while serving PickNext: fault",
            "sched: policy=credit vcpu=0",
            "trace: 4096 slices kept per pCPU",
        ] {
            text.push_str(prose);
            text.push('\n');
        }
        assert_eq!(parsed(&text), parsed(SCHED));
    }

    #[test]
    fn bad_sched_and_trace_lines_are_errors_naming_the_line_and_the_word() {
        let vcpu = "sched: v=1 policy=credit vcpu=0 domain=1 workload=w weight=256 cpu_us=10 slices=1 migrations=0";
        let cases = [
            ("sched: v=2 policy=credit pcpu=0 busy_us=1 idle_us=1 slices=1", "version `2`"),
            ("sched: v= policy=credit pcpu=0 busy_us=1 idle_us=1 slices=1", "version ``"),
            ("sched: v=1 pcpu=0 busy_us=1 idle_us=1 slices=1", "`policy=`"),
            ("sched: v=1 policy= pcpu=0 busy_us=1 idle_us=1 slices=1", "no policy"),
            ("sched: v=1 policy=pinned pcpu=0 busy_us=1 idle_us=1 slices=1", "`credit` on earlier"),
            ("sched: v=1 policy=credit pcpu=0 busy_us=1 idle_us=1", "`slices=`"),
            ("sched: v=1 policy=credit pcpu=0 busy_us=1x idle_us=1 slices=1", "`1x`"),
            ("sched: v=1 policy=credit pcpu=0 busy_us=-1 idle_us=1 slices=1", "`-1`"),
            ("sched: v=1 policy=credit pcpu=0 busy_us=1 idle_us=1 slices=1 share=3", "`share`"),
            ("sched: v=1 policy=credit pcpu=0 busy_us=1 busy_us=1 idle_us=1 slices=1", "`busy_us` given twice"),
            (vcpu, "a second line for vCPU 0"),
            ("sched: v=1 policy=credit vcpu=0 domain=1 weight=256 cpu_us=10 slices=1 migrations=0", "`workload=`"),
            ("sched: v=1 policy=credit summary migrations=1 migration_flushes=1 refused=0 jain_equal=1.5x worst_share_error=-", "`1.5x`"),
            ("sched: v=1 policy=credit summary migrations=1 migration_flushes=1 refused=0 jain_equal=NaN worst_share_error=-", "`NaN`"),
            ("sched: v=1 policy=credit idle", "`idle`"),
            ("sched: v=1 policy=credit bogus=1", "names `vcpu=`"),
            ("trace: v=1 pcpu=0 vcpu=1 domain=1 start_us=9 end_us=3", "end_us=3 is before start_us=9"),
            ("trace: v=1 pcpu=0 vcpu=1 domain=1 start_us=1", "`end_us=`"),
            ("trace: v=1 summary pcpu=0 vcpu=1 domain=1 start_us=1 end_us=2", "`summary`"),
            ("trace: v=1 pcpu=0 vcpu=x domain=1 start_us=1 end_us=2", "`x`"),
        ];
        for (line, want) in cases {
            let text = format!("{vcpu}\n{line}\n");
            let lines: Vec<&str> = text.lines().collect();
            let e = parse_console(&lines).expect_err(line);
            assert_eq!(e.line, 2, "{line}");
            assert!(e.what.contains(want), "{line}: {e}");
        }
        // Every fixture line cut short anywhere: an error or a report, never a panic.
        let full: Vec<&str> = SCHED.lines().collect();
        for (i, line) in full.iter().enumerate() {
            for cut in (0..line.len()).step_by(7) {
                let mut l = full.clone();
                l[i] = &line[..cut];
                let _ = parse_console(&l);
            }
        }
    }

    #[test]
    fn sched_results_conform_to_the_schema_and_round_trip() {
        let results = sched_runs();
        let mut doc = serde_json::to_value(&results).unwrap();
        assert_eq!(doc["schema_version"], 2);
        assert_eq!(validate_results(&doc), Vec::<String>::new());
        let back: crate::results::Results = serde_json::from_value(doc.clone()).unwrap();
        assert_eq!(back, results);
        // A run without scheduler lines writes no `sched` field.
        let plain = serde_json::to_value(two_runs()).unwrap();
        assert!(plain["runs"][0]["report"].get("sched").is_none());
        let s = &mut doc["runs"][0]["report"]["sched"];
        s["trace"][3]["end_us"] = serde_json::json!(-1);
        s["vcpus"][0].as_object_mut().unwrap().remove("weight");
        s["jain_equal"] = serde_json::json!("high");
        let errors = validate_results(&doc);
        for want in [
            "$.runs[0].report.sched.trace[3].end_us: -1 is beyond the minimum",
            "$.runs[0].report.sched.vcpus[0]: required field `weight` is missing",
            "$.runs[0].report.sched.jain_equal: is string",
        ] {
            assert!(
                errors.iter().any(|e| e.starts_with(want)),
                "{want}: {errors:?}"
            );
        }
        assert_eq!(errors.len(), 3, "{errors:?}");
    }

    #[test]
    fn the_summary_table_holds_the_numbers_of_the_json_with_policies_as_columns() {
        let results = sched_runs();
        let doc = serde_json::to_value(&results).unwrap();
        let ts = summary_tables(&results);
        assert_eq!(ts.len(), 2, "one table per MMU server");
        assert_eq!(
            (ts[0].group.as_str(), ts[1].group.as_str()),
            ("reference smp=8", "fast-shared smp=8")
        );
        assert_eq!(ts[0].columns, ["credit", "pinned"]);
        assert_eq!(ts[1].columns, ["credit"]);
        let runs = doc["runs"].as_array().unwrap();
        for (t, run_idx) in [(&ts[0], vec![0, 1]), (&ts[1], vec![2])] {
            let text = t.render();
            let csv = t.csv();
            for (col, &r) in run_idx.iter().enumerate() {
                let s = &runs[r]["report"]["sched"];
                let cell = |key: &str| {
                    let row = t
                        .rows
                        .iter()
                        .find(|x| x.key == key)
                        .unwrap_or_else(|| panic!("no row {key}"));
                    row.cells[col].clone()
                };
                let or_dash = |v: &serde_json::Value, f: &dyn Fn(&serde_json::Value) -> String| {
                    if v.is_null() {
                        "-".to_string()
                    } else {
                        f(v)
                    }
                };
                for key in ["migrations", "migration_flushes", "refused"] {
                    assert_eq!(cell(key), or_dash(&s[key], &|v| v.to_string()), "{key}");
                }
                assert_eq!(
                    cell("jain_equal"),
                    or_dash(&s["jain_equal"], &|v| format!("{:.6}", v.as_f64().unwrap()))
                );
                assert_eq!(
                    cell("worst_share_error"),
                    or_dash(&s["worst_share_error"], &|v| format!(
                        "{:.4}",
                        v.as_f64().unwrap()
                    ))
                );
                assert_eq!(
                    cell("slices"),
                    s["trace"].as_array().unwrap().len().to_string()
                );
                for p in s["pcpus"].as_array().unwrap() {
                    let key = format!("pcpu.{}.busy_ms", p["pcpu"]);
                    let busy = p["busy_us"].as_u64().unwrap();
                    assert_eq!(
                        cell(&key).parse::<f64>().unwrap() * 1000.0,
                        busy as f64,
                        "{key}"
                    );
                    let all = busy + p["idle_us"].as_u64().unwrap();
                    let pct: f64 = cell(&format!("pcpu.{}.busy_pct", p["pcpu"]))
                        .parse()
                        .unwrap();
                    assert!(
                        (pct - busy as f64 * 100.0 / all as f64).abs() <= 0.05,
                        "{pct}"
                    );
                }
                let vcpus = s["vcpus"].as_array().unwrap();
                for v in vcpus {
                    let id = &v["vcpu"];
                    let cpu = v["cpu_us"].as_u64().unwrap();
                    assert_eq!(
                        cell(&format!("vcpu.{id}.cpu_ms")).parse::<f64>().unwrap() * 1000.0,
                        cpu as f64
                    );
                    assert_eq!(
                        cell(&format!("vcpu.{id}.migrations")),
                        v["migrations"].to_string()
                    );
                    let peers: Vec<_> = vcpus
                        .iter()
                        .filter(|x| x["domain"] == v["domain"])
                        .collect();
                    let dom_cpu: u64 = peers.iter().map(|x| x["cpu_us"].as_u64().unwrap()).sum();
                    let dom_w: u64 = peers.iter().map(|x| x["weight"].as_u64().unwrap()).sum();
                    let share = cell(&format!("vcpu.{id}.share_pct"));
                    let (got, target) = share.trim_end_matches(')').split_once(" (").unwrap();
                    let got: f64 = got.parse().unwrap();
                    let target: f64 = target.parse().unwrap();
                    assert!(
                        (got - cpu as f64 * 100.0 / dom_cpu as f64).abs() <= 0.05,
                        "{share}"
                    );
                    let w = v["weight"].as_u64().unwrap() as f64;
                    assert!((target - w * 100.0 / dom_w as f64).abs() <= 0.05, "{share}");
                }
                // The text and the CSV show the same cells.
                for row in &t.rows {
                    let line = text.lines().find(|l| l.starts_with(&row.label)).unwrap();
                    assert!(line.contains(&row.cells[col]), "{line}");
                    let rec = csv
                        .lines()
                        .find(|l| l.contains(&format!(",{},", row.key)))
                        .unwrap();
                    assert!(rec.contains(&row.cells[col]), "{rec}");
                }
            }
        }
        // The weighted vCPU got twice its peer's time and the table says so.
        let t = &ts[0];
        let w = t.rows.iter().find(|r| r.key == "vcpu.4.share_pct").unwrap();
        assert_eq!(w.cells[0], "66.9 (66.7)");
        assert!(t.rows.iter().any(|r| r.label.starts_with(&vcpu_name(2, 4))));
        // Both runs meet the goals: Jain 0.996294, share error 0.0072, and
        // the pinned copy reports 0 migrations.
        let goals = t.rows.iter().find(|r| r.key == "goals").unwrap();
        assert_eq!(goals.cells, ["ok", "ok"]);
        assert_eq!(ms(138_500), "138.500");
        assert_eq!(ms(7), "0.007");
        assert!(t.render().starts_with("== scheduler: reference smp=8 ==\n"));
        // Runs without scheduler lines make no table.
        assert!(summary_tables(&two_runs()).is_empty());
    }

    #[test]
    fn the_overview_puts_every_group_s_run_wide_rows_in_one_table() {
        let mut results = sched_runs();
        results.runs[2]
            .report
            .sched
            .as_mut()
            .unwrap()
            .migration_flushes = Some(5);
        let groups = summary_tables(&results);
        let o = overview_table(&results).expect("two groups");
        assert_eq!(o.columns, ["credit", "pinned"]);
        for g in &groups {
            let own: Vec<_> = o
                .rows
                .iter()
                .filter(|r| r.key.starts_with(&format!("{}/", g.group)))
                .collect();
            assert_eq!(own.len(), 7, "{}", g.group);
            for r in own {
                let key = r.key.rsplit('/').next().unwrap();
                let row = g.rows.iter().find(|x| x.key == key).unwrap();
                assert_eq!(r.label, format!("{}: {}", g.group, row.label));
                for (col, policy) in g.columns.iter().enumerate() {
                    let at = o.columns.iter().position(|c| c == policy).unwrap();
                    assert_eq!(r.cells[at], row.cells[col], "{}", r.key);
                }
            }
        }
        let flushes = |group: &str| {
            o.rows
                .iter()
                .find(|r| r.key == format!("{group}/migration_flushes"))
                .unwrap()
                .cells
                .clone()
        };
        assert_eq!(flushes("reference smp=8"), ["22", "0"]);
        // fast-shared ran no pinned boot.
        assert_eq!(flushes("fast-shared smp=8"), ["5", "-"]);
        results.runs.truncate(2);
        assert!(overview_table(&results).is_none());
    }

    #[test]
    fn missed_goals_are_named() {
        let mut s = parsed(SCHED);
        assert!(missed_goals(&s).is_empty());
        s.jain_equal = Some(0.98);
        s.worst_share_error = Some(0.051);
        assert_eq!(missed_goals(&s), ["jain", "shares"]);
        s.policy = Some("pinned".into());
        assert_eq!(missed_goals(&s), ["jain", "shares", "migrations"]);
        s.migrations = Some(0);
        s.jain_equal = None;
        s.worst_share_error = Some(0.05);
        assert!(missed_goals(&s).is_empty());
        let mut results = sched_runs();
        results.runs[0].report.sched.as_mut().unwrap().jain_equal = Some(0.5);
        let t = &summary_tables(&results)[0];
        let goals = t.rows.iter().find(|r| r.key == "goals").unwrap();
        assert_eq!(goals.cells, ["missed:jain", "ok"]);
    }

    #[test]
    fn a_results_directory_holds_a_timeline_per_traced_run_and_a_sched_csv_per_group() {
        let root = std::env::temp_dir().join(format!("umbra-sched-{}", std::process::id()));
        let mut results = sched_runs();
        results.runs[2].report.sched.as_mut().unwrap().trace.clear();
        let dir = write_dir(&results, &root).unwrap();
        assert_eq!(load(&dir).unwrap(), results);
        for run in &results.runs[..2] {
            let svg = std::fs::read_to_string(dir.join(timeline_file(&run.label))).unwrap();
            assert!(roxmltree::Document::parse(&svg).is_ok());
        }
        assert!(!dir.join(timeline_file(&results.runs[2].label)).exists());
        assert_eq!(
            timeline_file("reference sched=credit"),
            "timeline-reference_sched_credit.svg"
        );
        for t in summary_tables(&results)
            .iter()
            .chain(&overview_table(&results))
        {
            assert_eq!(
                std::fs::read_to_string(dir.join(sched_file(&t.group))).unwrap(),
                t.csv()
            );
        }
        assert!(dir.join("sched-overview.csv").is_file());
        // Version 1 documents still load.
        let v1 = format!(
            "{}/tests/fixtures/results-before",
            env!("CARGO_MANIFEST_DIR")
        );
        assert_eq!(load(std::path::Path::new(&v1)).unwrap().schema_version, 1);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
