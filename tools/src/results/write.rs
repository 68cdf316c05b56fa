//! Writing and reading a results directory: `results.json`, one CSV per table, `pcpu-exits.csv`, `comparison.svg`.

use crate::results::metrics::EXIT_BUCKETS;
use crate::results::table::{push_record, tables};
use crate::results::{sched, schema, svg, timeline, Results, SCHEMA_NAME, SCHEMA_VERSIONS_READ};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// The results file's name inside a results directory.
pub const RESULTS_JSON: &str = "results.json";
/// The picture's name inside a results directory.
pub const SVG_NAME: &str = "comparison.svg";
/// The per-pCPU exit table's name inside a results directory.
pub const PCPU_CSV: &str = "pcpu-exits.csv";

/// `time` in UTC as (`YYYY-MM-DDTHH:MM:SSZ`, `YYYYMMDDTHHMMSSZ`).
pub fn utc_stamp(time: SystemTime) -> (String, String) {
    let secs = time
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (h, mi, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Days since 1970-01-01 to a civil date (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        format!("{y:04}-{m:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z"),
        format!("{y:04}{m:02}{d:02}T{h:02}{mi:02}{s:02}Z"),
    )
}

/// `target/umbra/results` (under `CARGO_TARGET_DIR` when set).
pub fn results_root() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::prereq::workspace_root().join("target"))
        .join("umbra")
        .join("results")
}

/// A file-name-safe form of a workload name.
pub fn file_stem(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// CSV file name of a workload's table.
pub fn table_file(workload: &str) -> String {
    format!("table-{}.csv", file_stem(workload))
}

/// CSV file name of a group's scheduler summary table.
pub fn sched_file(group: &str) -> String {
    format!("sched-{}.csv", file_stem(group))
}

/// File name of a run's timeline picture.
pub fn timeline_file(label: &str) -> String {
    format!("timeline-{}.svg", file_stem(label))
}

/// Writes `results` into a new directory `<root>/<timestamp>[-N]/` and
/// returns it: `results.json` (checked against the schema first), one
/// `table-<workload>.csv` per table, `pcpu-exits.csv` and `comparison.svg`.
pub fn write_dir(results: &Results, root: &Path) -> Result<PathBuf> {
    let json = serde_json::to_string_pretty(results).context("encoding results.json")?;
    let doc: serde_json::Value = serde_json::from_str(&json)?;
    let errors = schema::validate_results(&doc);
    if !errors.is_empty() {
        bail!(
            "results do not match their own schema: {}",
            errors.join("; ")
        );
    }
    let stamp = utc_stamp(SystemTime::now()).1;
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let mut dir = root.join(&stamp);
    let mut n = 2;
    while dir.exists() {
        dir = root.join(format!("{stamp}-{n}"));
        n += 1;
    }
    std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let put = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    };
    put(RESULTS_JSON, &json)?;
    for t in tables(results) {
        put(&table_file(&t.workload), &t.csv())?;
    }
    put(PCPU_CSV, &pcpu_csv(results))?;
    put(SVG_NAME, &svg::render(results)?)?;
    for t in sched::summary_tables(results)
        .iter()
        .chain(&sched::overview_table(results))
    {
        put(&sched_file(&t.group), &t.csv())?;
    }
    for run in &results.runs {
        if let Some(svg) = timeline::render(run)? {
            put(&timeline_file(&run.label), &svg)?;
        }
    }
    Ok(dir)
}

/// The per-pCPU exit tables of every run: `run,cpu,<reason...>,total`.
pub fn pcpu_csv(results: &Results) -> String {
    let mut out = String::new();
    let mut head = vec!["run".to_string(), "cpu".to_string()];
    head.extend(EXIT_BUCKETS.iter().map(|(k, _)| k.to_string()));
    head.push("total".into());
    push_record(&mut out, &head);
    for run in &results.runs {
        for p in &run.report.pcpus {
            let mut rec = vec![run.label.clone(), p.cpu.to_string()];
            rec.extend(
                EXIT_BUCKETS
                    .iter()
                    .map(|(k, _)| p.exits.get(*k).map(u64::to_string).unwrap_or_default()),
            );
            rec.push(p.total_exits().to_string());
            push_record(&mut out, &rec);
        }
    }
    out
}

/// Reads `<dir>/results.json` (or `dir` itself when it is a file), checking
/// the schema name and version.
pub fn load(dir: &Path) -> Result<Results> {
    let path = if dir.is_dir() {
        dir.join(RESULTS_JSON)
    } else {
        dir.to_path_buf()
    };
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let doc: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let version = doc["schema_version"].as_u64();
    if doc["schema"] != SCHEMA_NAME
        || !version.is_some_and(|v| SCHEMA_VERSIONS_READ.iter().any(|&r| u64::from(r) == v))
    {
        bail!(
            "{}: schema {} version {}; this tool reads {SCHEMA_NAME} versions {SCHEMA_VERSIONS_READ:?}",
            path.display(),
            doc["schema"],
            doc["schema_version"]
        );
    }
    let errors = schema::validate_results(&doc);
    if !errors.is_empty() {
        bail!("{}: {}", path.display(), errors.join("; "));
    }
    serde_json::from_value(doc).with_context(|| format!("decoding {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::{load, table_file, utc_stamp, write_dir, PCPU_CSV, RESULTS_JSON, SVG_NAME};
    use crate::results::schema::validate_results;
    use crate::results::test_data::two_runs;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn stamps_are_utc_calendar_dates() {
        let t = |s| utc_stamp(UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(t(0).0, "1970-01-01T00:00:00Z");
        assert_eq!(t(951_782_400).0, "2000-02-29T00:00:00Z");
        assert_eq!(t(1_798_779_119).1, "20270101T045159Z");
    }

    #[test]
    fn a_written_directory_reads_back_and_validates() {
        let root = std::env::temp_dir().join(format!("umbra-results-{}", std::process::id()));
        let results = two_runs();
        let a = write_dir(&results, &root).unwrap();
        let b = write_dir(&results, &root).unwrap();
        assert_ne!(
            a, b,
            "a second write in the same second gets its own directory"
        );
        assert_eq!(load(&a).unwrap(), results);
        let doc: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(a.join(RESULTS_JSON)).unwrap()).unwrap();
        assert_eq!(validate_results(&doc), Vec::<String>::new());
        // Each CSV on disk holds the numbers of results.json, cell for cell.
        for (col, run) in doc["runs"].as_array().unwrap().iter().enumerate() {
            for w in run["report"]["workloads"].as_array().unwrap() {
                let name = w["name"].as_str().unwrap();
                let csv = std::fs::read_to_string(a.join(table_file(name))).unwrap();
                let mut seen = 0;
                for line in csv.lines().skip(1) {
                    let fields: Vec<&str> = line.split(',').collect();
                    let cell = fields[2 + col];
                    if fields[1] == "verdict" {
                        assert_eq!(cell, w["verdict"].as_str().unwrap(), "{name}");
                        continue;
                    }
                    if line.starts_with("verdict detail,") {
                        let detail = w["verdict_detail"].as_str().unwrap();
                        assert!(line.contains(detail), "{name}: {line}");
                        continue;
                    }
                    let json = &w["metrics"][fields[1]];
                    assert_eq!(
                        cell.parse::<f64>().ok(),
                        json.as_f64(),
                        "{name} {}",
                        fields[1]
                    );
                    seen += 1;
                }
                assert_eq!(seen, w["metrics"].as_object().unwrap().len(), "{name}");
            }
        }
        let pcpu = std::fs::read_to_string(a.join(PCPU_CSV)).unwrap();
        assert_eq!(pcpu.lines().count(), 1 + 16);
        assert!(pcpu.lines().nth(1).unwrap().starts_with("reference,0,770,"));
        assert!(a.join(SVG_NAME).is_file());
        // A document that breaks the schema is refused with the reason.
        let bad = root.join("bad.json");
        std::fs::write(&bad, doc.to_string().replace("\"success\"", "\"fine\"")).unwrap();
        let e = load(&bad).unwrap_err().to_string();
        assert!(e.contains("ending") && e.contains("fine"), "{e}");
        std::fs::write(
            &bad,
            doc.to_string()
                .replace("\"schema_version\":2", "\"schema_version\":9"),
        )
        .unwrap();
        assert!(load(&bad).unwrap_err().to_string().contains("version 9"));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
