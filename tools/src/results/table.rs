//! One table per workload: implementations as columns, metrics as rows, the best value marked, verdicts last.

use crate::results::metrics::{find, Better, CATALOGUE};
use crate::results::{Results, Value};
use std::fmt::Write;

/// One metric row of a [`Table`].
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// Metric key (as in `results.json`).
    pub key: String,
    /// Row label.
    pub label: String,
    /// One cell per column; `None` where that run did not report it.
    pub cells: Vec<Option<Value>>,
    /// Columns holding the best value; empty when the metric has no better
    /// direction, fewer than two columns report it, or all are equal.
    pub best: Vec<usize>,
}

/// The comparison table of one workload.
#[derive(Clone, Debug, PartialEq)]
pub struct Table {
    /// Workload name.
    pub workload: String,
    /// Column labels: the runs' labels, in run order.
    pub columns: Vec<String>,
    /// Metric rows: catalogue order, then unknown keys sorted.
    pub rows: Vec<Row>,
    /// The verdict per column: `PASS`, `FAIL`, or `-` when the run did not
    /// report the workload.
    pub verdicts: Vec<String>,
    /// The verdict's detail per column (`(faulted, then stopped ...)`),
    /// empty when none.
    pub details: Vec<String>,
}

/// The tables of `results`, one per workload, in first-seen order.
pub fn tables(results: &Results) -> Vec<Table> {
    let columns: Vec<String> = results.runs.iter().map(|r| r.label.clone()).collect();
    results
        .workload_names()
        .into_iter()
        .map(|name| {
            let per_run: Vec<_> = results
                .runs
                .iter()
                .map(|r| r.report.workloads.iter().find(|w| w.name == name))
                .collect();
            let mut keys: Vec<String> = CATALOGUE
                .iter()
                .map(|m| m.key.to_string())
                .filter(|k| per_run.iter().flatten().any(|w| w.metrics.contains_key(k)))
                .collect();
            let mut extra: Vec<String> = per_run
                .iter()
                .flatten()
                .flat_map(|w| w.metrics.keys())
                .filter(|k| find(k).is_none())
                .cloned()
                .collect();
            extra.sort();
            extra.dedup();
            keys.extend(extra);
            let rows = keys
                .into_iter()
                .map(|key| {
                    let cells: Vec<Option<Value>> = per_run
                        .iter()
                        .map(|w| w.and_then(|w| w.metrics.get(&key).copied()))
                        .collect();
                    let (label, better) = match find(&key) {
                        Some(m) => (m.label.to_string(), m.better),
                        None => (key.clone(), Better::Neither),
                    };
                    let best = best_columns(&cells, better);
                    Row {
                        key,
                        label,
                        cells,
                        best,
                    }
                })
                .collect();
            let verdicts = per_run
                .iter()
                .map(|w| w.map_or("-".to_string(), |w| w.verdict.to_string()))
                .collect();
            let details = per_run
                .iter()
                .map(|w| w.map(|w| w.verdict_detail.clone()).unwrap_or_default())
                .collect();
            Table {
                workload: name,
                columns: columns.clone(),
                rows,
                verdicts,
                details,
            }
        })
        .collect()
}

/// Columns holding the best of `cells` under `better`.
pub fn best_columns(cells: &[Option<Value>], better: Better) -> Vec<usize> {
    let present: Vec<(usize, f64)> = cells
        .iter()
        .enumerate()
        .filter_map(|(i, c)| c.map(|v| (i, v.as_f64())))
        .collect();
    let Some(&(_, first)) = present.first() else {
        return Vec::new();
    };
    if present.len() < 2 || present.iter().all(|&(_, v)| v == first) {
        return Vec::new();
    }
    let pick = match better {
        Better::Neither => return Vec::new(),
        Better::Lower => present
            .iter()
            .map(|&(_, v)| v)
            .fold(f64::INFINITY, f64::min),
        Better::Higher => present
            .iter()
            .map(|&(_, v)| v)
            .fold(f64::NEG_INFINITY, f64::max),
    };
    present
        .iter()
        .filter(|&&(_, v)| v == pick)
        .map(|&(i, _)| i)
        .collect()
}

fn cell_text(cell: Option<Value>, best: bool) -> String {
    match cell {
        None => "-".into(),
        Some(v) if best => format!("{v}*"),
        Some(v) => format!("{v} "),
    }
}

impl Table {
    /// The table as text: a title line, a header, one line per metric (the
    /// best value followed by `*`), then the verdicts.
    pub fn render(&self) -> String {
        let label_w = self
            .rows
            .iter()
            .map(|r| r.label.len())
            .chain(["verdict".len()])
            .max()
            .unwrap_or(0);
        let texts: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|r| {
                r.cells
                    .iter()
                    .enumerate()
                    .map(|(i, c)| cell_text(*c, r.best.contains(&i)))
                    .collect()
            })
            .collect();
        let widths: Vec<usize> = (0..self.columns.len())
            .map(|c| {
                texts
                    .iter()
                    .map(|row| row[c].len())
                    .chain([self.columns[c].len() + 1, self.verdicts[c].len() + 1])
                    .max()
                    .unwrap_or(1)
            })
            .collect();
        let mut out = String::new();
        let _ = writeln!(out, "== {} ==", self.workload);
        let _ = write!(out, "{:<label_w$}", "metric");
        for (c, w) in self.columns.iter().zip(&widths) {
            let _ = write!(out, "  {:>w$}", format!("{c} "));
        }
        out.push('\n');
        for (r, row) in self.rows.iter().zip(&texts) {
            let _ = write!(out, "{:<label_w$}", r.label);
            for (t, w) in row.iter().zip(&widths) {
                let _ = write!(out, "  {t:>w$}");
            }
            out.push('\n');
        }
        let _ = write!(out, "{:<label_w$}", "verdict");
        for (v, w) in self.verdicts.iter().zip(&widths) {
            let _ = write!(out, "  {:>w$}", format!("{v} "));
        }
        out.push('\n');
        for ((c, v), d) in self.columns.iter().zip(&self.verdicts).zip(&self.details) {
            if !d.is_empty() {
                let _ = writeln!(out, "  {c}: {v} {d}");
            }
        }
        out.lines().map(|l| format!("{}\n", l.trim_end())).collect()
    }

    /// The table as CSV: `metric,key,<one column per run>,best`, raw
    /// numbers (empty where not reported), `best` naming the best columns
    /// separated by `;`; then the verdict row, and a `verdict detail` row
    /// when any run has one.
    pub fn csv(&self) -> String {
        let mut out = String::new();
        let mut head = vec!["metric".to_string(), "key".to_string()];
        head.extend(self.columns.iter().cloned());
        head.push("best".into());
        push_record(&mut out, &head);
        for r in &self.rows {
            let mut rec = vec![r.label.clone(), r.key.clone()];
            rec.extend(r.cells.iter().map(|c| match c {
                None => String::new(),
                Some(Value::Count(n)) => n.to_string(),
                Some(Value::Ratio(x)) => x.to_string(),
            }));
            let best: Vec<&str> = r.best.iter().map(|&i| self.columns[i].as_str()).collect();
            rec.push(best.join(";"));
            push_record(&mut out, &rec);
        }
        let mut rec = vec!["verdict".to_string(), "verdict".to_string()];
        rec.extend(self.verdicts.iter().cloned());
        rec.push(String::new());
        push_record(&mut out, &rec);
        if self.details.iter().any(|d| !d.is_empty()) {
            let mut rec = vec!["verdict detail".to_string(), "verdict_detail".to_string()];
            rec.extend(self.details.iter().cloned());
            rec.push(String::new());
            push_record(&mut out, &rec);
        }
        out
    }
}

/// Appends one CSV record (RFC 4180 quoting where needed).
pub fn push_record(out: &mut String, fields: &[String]) {
    let quoted: Vec<String> = fields
        .iter()
        .map(|f| {
            if f.contains([',', '"', '\n']) {
                format!("\"{}\"", f.replace('"', "\"\""))
            } else {
                f.clone()
            }
        })
        .collect();
    out.push_str(&quoted.join(","));
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::{best_columns, tables};
    use crate::results::metrics::Better;
    use crate::results::test_data::two_runs;
    use crate::results::Value;

    #[test]
    fn best_is_marked_only_where_values_differ_and_a_direction_exists() {
        let c = |v: &[Option<u64>]| v.iter().map(|x| x.map(Value::Count)).collect::<Vec<_>>();
        assert_eq!(
            best_columns(&c(&[Some(3), Some(2), Some(2)]), Better::Lower),
            [1, 2]
        );
        assert_eq!(
            best_columns(&c(&[Some(3), Some(2), None]), Better::Higher),
            [0]
        );
        assert!(best_columns(&c(&[Some(3), Some(3)]), Better::Lower).is_empty());
        assert!(best_columns(&c(&[Some(3), None]), Better::Lower).is_empty());
        assert!(best_columns(&c(&[Some(3), Some(1)]), Better::Neither).is_empty());
    }

    #[test]
    fn tables_hold_the_numbers_of_the_json_and_mark_the_best() {
        let results = two_runs();
        // Round trip through JSON: the tables are built from what was written.
        let json = serde_json::to_string(&results).unwrap();
        let back: crate::results::Results = serde_json::from_str(&json).unwrap();
        assert_eq!(back, results);
        let doc: serde_json::Value = serde_json::from_str(&json).unwrap();
        let ts = tables(&back);
        assert_eq!(ts.len(), 11);
        for t in &ts {
            let text = t.render();
            let csv = t.csv();
            for (col, run) in doc["runs"].as_array().unwrap().iter().enumerate() {
                let w = run["report"]["workloads"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|w| w["name"] == t.workload.as_str())
                    .unwrap();
                let metrics = w["metrics"].as_object().unwrap();
                // Every metric of the JSON is a row, with the same number.
                for (key, v) in metrics {
                    let row = t.rows.iter().find(|r| &r.key == key).unwrap();
                    assert_eq!(
                        row.cells[col].unwrap().as_f64(),
                        v.as_f64().unwrap(),
                        "{key}"
                    );
                    let line = csv
                        .lines()
                        .find(|l| l.contains(&format!(",{key},")))
                        .unwrap();
                    let field = line.split(',').nth(2 + col).unwrap();
                    assert_eq!(field.parse::<f64>().unwrap(), v.as_f64().unwrap(), "{key}");
                    let shown = row.cells[col].unwrap().to_string();
                    let text_line = text
                        .lines()
                        .find(|l| {
                            l.strip_prefix(row.label.as_str())
                                .is_some_and(|t| t.starts_with("  "))
                        })
                        .unwrap();
                    assert!(
                        text_line.contains(&shown),
                        "{key}: `{text_line}` lacks {shown}"
                    );
                }
                assert_eq!(t.rows.len(), metrics.len());
                assert_eq!(t.verdicts[col], w["verdict"].as_str().unwrap());
            }
        }
        // The second run has fewer exits on demand-64M: it is marked best.
        let demand = &ts[0];
        let exits = demand.rows.iter().find(|r| r.key == "exits").unwrap();
        assert_eq!(exits.best, [1]);
        let line = demand.render();
        let line = line.lines().find(|l| l.starts_with("exits (all")).unwrap();
        assert!(line.trim_end().ends_with('*'), "{line}");
        // Verdicts come last in text and CSV.
        let rendered = demand.render();
        let last_row = rendered.lines().rfind(|l| !l.starts_with("  ")).unwrap();
        assert!(last_row.starts_with("verdict"), "{last_row}");
        assert!(demand.csv().lines().last().unwrap().starts_with("verdict,"));
        let hostile = ts.iter().find(|t| t.workload == "hostile").unwrap();
        let csv = hostile.csv();
        let last = csv.lines().last().unwrap();
        assert!(
            last.starts_with("verdict detail,verdict_detail,\"(faulted, then"),
            "{last}"
        );
        assert!(hostile
            .render()
            .contains("  reference: PASS (faulted, then"));
    }
}
