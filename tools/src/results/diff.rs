//! `cargo xtask compare --diff A B`: the change per metric between two results directories.
//!
//! Runs are paired by label; when each side holds exactly one run they are
//! paired whatever their labels (a server before and after a change, or
//! two servers run separately). Workloads pair by name.

use crate::results::metrics::{find, CATALOGUE};
use crate::results::{Results, Run, Value};
use std::fmt::Write;

/// One metric of one workload that differs between the two sides.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    /// Label of the run pair (`a` or `a -> b` when the labels differ).
    pub run: String,
    /// Workload name.
    pub workload: String,
    /// Metric key, or `verdict`.
    pub key: String,
    /// Value before (`None`: not reported).
    pub before: Option<String>,
    /// Value after.
    pub after: Option<String>,
    /// `after - before` when both are numbers.
    pub delta: Option<f64>,
    /// The change in percent of `before`, when both are numbers and
    /// `before` is not 0.
    pub percent: Option<f64>,
}

/// What a diff found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Diff {
    /// Every changed metric and verdict.
    pub changes: Vec<Change>,
    /// Metrics compared and found equal.
    pub unchanged: usize,
    /// Runs or workloads present on one side only, described.
    pub unpaired: Vec<String>,
}

fn text(v: Option<Value>) -> Option<String> {
    v.map(|v| v.to_string())
}

/// Compares `before` with `after`.
pub fn diff(before: &Results, after: &Results) -> Diff {
    let mut d = Diff::default();
    let pairs: Vec<(&Run, &Run)> = if before.runs.len() == 1 && after.runs.len() == 1 {
        vec![(&before.runs[0], &after.runs[0])]
    } else {
        for r in &before.runs {
            if !after.runs.iter().any(|x| x.label == r.label) {
                d.unpaired.push(format!("run `{}` only before", r.label));
            }
        }
        for r in &after.runs {
            if !before.runs.iter().any(|x| x.label == r.label) {
                d.unpaired.push(format!("run `{}` only after", r.label));
            }
        }
        before
            .runs
            .iter()
            .filter_map(|a| Some((a, after.runs.iter().find(|b| b.label == a.label)?)))
            .collect()
    };
    for (a, b) in pairs {
        let run = if a.label == b.label {
            a.label.clone()
        } else {
            format!("{} -> {}", a.label, b.label)
        };
        for wa in &a.report.workloads {
            let Some(wb) = b.report.workloads.iter().find(|w| w.name == wa.name) else {
                d.unpaired
                    .push(format!("workload `{}` of `{run}` only before", wa.name));
                continue;
            };
            let mut keys: Vec<&str> = CATALOGUE.iter().map(|m| m.key).collect();
            let mut extra: Vec<&str> = wa
                .metrics
                .keys()
                .chain(wb.metrics.keys())
                .map(String::as_str)
                .filter(|k| find(k).is_none())
                .collect();
            extra.sort();
            extra.dedup();
            keys.extend(extra);
            for key in keys {
                let (x, y) = (wa.metrics.get(key).copied(), wb.metrics.get(key).copied());
                if x.is_none() && y.is_none() {
                    continue;
                }
                let same = match (x, y) {
                    (Some(x), Some(y)) => x.as_f64() == y.as_f64(),
                    _ => false,
                };
                if same {
                    d.unchanged += 1;
                    continue;
                }
                let (delta, percent) = match (x, y) {
                    (Some(x), Some(y)) => {
                        let delta = y.as_f64() - x.as_f64();
                        let pct = (x.as_f64() != 0.0).then(|| 100.0 * delta / x.as_f64());
                        (Some(delta), pct)
                    }
                    _ => (None, None),
                };
                d.changes.push(Change {
                    run: run.clone(),
                    workload: wa.name.clone(),
                    key: key.to_string(),
                    before: text(x),
                    after: text(y),
                    delta,
                    percent,
                });
            }
            if wa.verdict != wb.verdict {
                d.changes.push(Change {
                    run: run.clone(),
                    workload: wa.name.clone(),
                    key: "verdict".into(),
                    before: Some(wa.verdict.to_string()),
                    after: Some(wb.verdict.to_string()),
                    delta: None,
                    percent: None,
                });
            } else {
                d.unchanged += 1;
            }
        }
        for wb in &b.report.workloads {
            if !a.report.workloads.iter().any(|w| w.name == wb.name) {
                d.unpaired
                    .push(format!("workload `{}` of `{run}` only after", wb.name));
            }
        }
    }
    d
}

impl Diff {
    /// The diff as text: per run and workload, one line per changed metric
    /// (`label: before -> after (delta, percent)`), then the counts.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut last = (String::new(), String::new());
        for c in &self.changes {
            if (c.run.as_str(), c.workload.as_str()) != (last.0.as_str(), last.1.as_str()) {
                let _ = writeln!(out, "== {} / {} ==", c.run, c.workload);
                last = (c.run.clone(), c.workload.clone());
            }
            let label = find(&c.key).map(|m| m.label).unwrap_or(&c.key);
            let side = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
            let _ = write!(
                out,
                "  {label:<36} {:>10} -> {:<10}",
                side(&c.before),
                side(&c.after)
            );
            if let Some(delta) = c.delta {
                if delta.fract() == 0.0 && delta.abs() < 1e15 {
                    let _ = write!(out, " {:+}", delta as i64);
                } else {
                    let _ = write!(out, " {delta:+.2}");
                }
                if let Some(p) = c.percent {
                    let _ = write!(out, " ({p:+.1}%)");
                }
            }
            out.truncate(out.trim_end().len());
            out.push('\n');
        }
        for u in &self.unpaired {
            let _ = writeln!(out, "{u}");
        }
        let _ = writeln!(
            out,
            "{} changed, {} unchanged",
            self.changes.len(),
            self.unchanged
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::diff;
    use crate::results::write::load;
    use std::path::Path;

    fn fixture(name: &str) -> crate::results::Results {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name);
        load(&dir).unwrap()
    }

    #[test]
    fn diff_of_two_fixture_dirs_names_each_changed_metric() {
        let before = fixture("results-before");
        let after = fixture("results-after");
        let d = diff(&before, &after);
        let exits = d
            .changes
            .iter()
            .find(|c| c.workload == "demand-64M" && c.key == "exits")
            .unwrap();
        assert_eq!(exits.run, "reference");
        assert_eq!(exits.before.as_deref(), Some("64281"));
        assert_eq!(exits.after.as_deref(), Some("54281"));
        assert_eq!(exits.delta, Some(-10000.0));
        assert!((exits.percent.unwrap() - (-15.556)).abs() < 0.01);
        let verdict = d.changes.iter().find(|c| c.key == "verdict").unwrap();
        assert_eq!(verdict.workload, "smp-8");
        assert_eq!(
            (verdict.before.as_deref(), verdict.after.as_deref()),
            (Some("PASS"), Some("FAIL"))
        );
        assert_eq!(d.changes.len(), 3, "{:?}", d.changes);
        let text = d.render();
        assert!(text.contains("== reference / demand-64M =="), "{text}");
        assert!(text.contains(" -10000 (-15.6%)"), "{text}");
        assert!(text.contains(" -0.92 (-23.5%)"), "{text}");
        assert!(text.lines().all(|l| l == l.trim_end()), "{text}");
        assert!(text.ends_with(&format!("3 changed, {} unchanged\n", d.unchanged)));
        // Against itself: nothing changed, every metric counted.
        let same = diff(&before, &before);
        assert!(same.changes.is_empty());
        assert_eq!(same.unchanged, d.unchanged + 3);
    }

    #[test]
    fn runs_pair_by_label_and_the_rest_is_reported() {
        let mut a = crate::results::test_data::two_runs();
        let b = a.clone();
        a.runs[1].label = "fast-percpu".into();
        let d = diff(&a, &b);
        assert!(d
            .unpaired
            .contains(&"run `fast-percpu` only before".to_string()));
        assert!(d
            .unpaired
            .contains(&"run `fast-shared` only after".to_string()));
        assert!(d.changes.is_empty());
    }
}
