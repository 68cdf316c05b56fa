//! From a run's console lines to a typed [`Report`]: today's prose tables and the `result:` lines.
//!
//! Two sources, merged per workload (keyed by domain):
//! - the report the kernel prints today: the per-pCPU exit table, the MMU
//!   server's counter table, the `svm: workload ...` lines, the shadow-page
//!   and `N/M workloads passed` lines;
//! - machine-readable `result:` lines (format in `SCHEMA.md`, "Console
//!   result lines"), whose values win over the prose for the same key.
//!
//! Lines that belong to neither (boot messages, guest console) are ignored.
//! A line that starts like one of the above but does not parse is an error
//! naming the line and the offending word: a report that silently lost a
//! number would make every comparison after it wrong.

use crate::results::metrics::{pcpu_key, server_key, workload_key};
use crate::results::sched::{sched_line, trace_line, versioned_pairs, Sched};
use crate::results::{Pcpu, Report, Value, Verdict, Workload};
use std::collections::BTreeMap;
use std::fmt;

/// The version of `result:` lines this parser reads (`v=1`).
pub const RESULT_LINE_VERSION: u32 = 1;

/// A console line that looked like part of the report but did not parse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    /// 1-based line number in the console.
    pub line: usize,
    /// The line.
    pub text: String,
    /// What was wrong, naming the offending word.
    pub what: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "console line {}: {} (line: `{}`)",
            self.line, self.what, self.text
        )
    }
}

impl std::error::Error for ParseError {}

/// Metric key to value, as in [`Workload::metrics`].
type Metrics = BTreeMap<String, Value>;

/// Which table the lines being read belong to.
enum Section {
    /// Not in a table.
    None,
    /// The next line is the per-pCPU exit table's header.
    ExitHeader,
    /// Rows of the per-pCPU exit table, with its column heads.
    ExitRows(Vec<String>),
    /// The next line is the server-counter table's header.
    ServerHeader,
    /// Rows of the server-counter table, with its column heads.
    ServerRows(Vec<String>),
}

/// Per domain, what the lines said about it so far.
#[derive(Default)]
struct Partial {
    name: Option<String>,
    vcpus: Option<u32>,
    verdict: Option<(Verdict, String)>,
    prose: Metrics,
    server: Metrics,
    result: Metrics,
    first_line: usize,
}

/// Parses a console into a [`Report`].
pub fn parse_console<S: AsRef<str>>(lines: &[S]) -> Result<Report, ParseError> {
    let mut report = Report::default();
    let mut domains: BTreeMap<u32, Partial> = BTreeMap::new();
    let mut section = Section::None;
    let mut pcpu_rows: BTreeMap<u32, Pcpu> = BTreeMap::new();
    let mut sched = Sched::default();
    for (i, raw) in lines.iter().enumerate() {
        let text = raw.as_ref().trim_end();
        let err = |what: String| ParseError {
            line: i + 1,
            text: text.to_string(),
            what,
        };
        section = match section {
            Section::ExitHeader if text.starts_with("cpu ") => {
                Section::ExitRows(text.split_whitespace().skip(1).map(String::from).collect())
            }
            Section::ExitHeader => {
                return Err(err("expected the exit table's `cpu ...` header".into()))
            }
            Section::ServerHeader if text.starts_with("workload ") => {
                Section::ServerRows(text.split_whitespace().skip(1).map(String::from).collect())
            }
            Section::ServerHeader => {
                return Err(err(
                    "expected the server-counter table's `workload ...` header".into(),
                ))
            }
            Section::ExitRows(heads) if is_exit_row(text) => {
                if let Some(p) = exit_row(text, &heads).map_err(err)? {
                    if pcpu_rows.insert(p.cpu, p).is_some() {
                        return Err(err("a second row for this pCPU".into()));
                    }
                }
                Section::ExitRows(heads)
            }
            Section::ServerRows(heads) if !text.starts_with("svm: ") && !text.is_empty() => {
                if let Some((domain, values)) = server_row(text, &heads).map_err(err)? {
                    let d = domains.entry(domain).or_default();
                    if !d.server.is_empty() {
                        return Err(err(format!("a second server-counter row for d{domain}")));
                    }
                    d.server = values;
                }
                Section::ServerRows(heads)
            }
            _ => Section::None,
        };
        if !matches!(section, Section::None) {
            continue;
        }
        let body = text.strip_prefix("svm: ").unwrap_or(text);
        if let Some(rest) = body.strip_prefix("result: ") {
            result_line(rest, &mut report, &mut domains, &mut pcpu_rows, i + 1).map_err(err)?;
        } else if let Some(rest) = record(body, "sched: ") {
            sched_line(rest, &mut sched).map_err(err)?;
        } else if let Some(rest) = record(body, "trace: ") {
            trace_line(rest, &mut sched).map_err(err)?;
        } else if let Some(rest) = text.strip_prefix("svm: ") {
            section = svm_line(rest, &mut report, &mut domains, i + 1).map_err(err)?;
        } else if let Some(name) = text.strip_prefix("umbra: MMU implementation: ") {
            report.server.get_or_insert_with(|| name.trim().to_string());
        }
    }
    report.pcpus = pcpu_rows.into_values().collect();
    if !sched.is_empty() {
        sched.vcpus.sort_by_key(|v| v.vcpu);
        sched.pcpus.sort_by_key(|p| p.pcpu);
        report.sched = Some(sched);
    }
    for (domain, p) in domains {
        report.workloads.push(finish(domain, p)?);
    }
    Ok(report)
}

/// The rest of `line` after `prefix` when it is a versioned record
/// (`sched: v=1 ...`); the kernel's prose under the same prefix (`sched:
/// pcpu 3: refused the decision ...`) is not one.
fn record<'a>(line: &'a str, prefix: &str) -> Option<&'a str> {
    line.strip_prefix(prefix)
        .filter(|rest| rest.starts_with("v="))
}

/// A workload from what its lines said; an error when no line gave its
/// name, vCPUs and verdict.
fn finish(domain: u32, p: Partial) -> Result<Workload, ParseError> {
    let missing = |what: &str| ParseError {
        line: p.first_line,
        text: String::new(),
        what: format!("d{domain} has server counters or a result line but no {what}"),
    };
    let name = p.name.clone().ok_or_else(|| missing("workload name"))?;
    let vcpus = p.vcpus.ok_or_else(|| missing("vcpus"))?;
    let (verdict, verdict_detail) = p.verdict.clone().ok_or_else(|| missing("verdict"))?;
    let mut metrics = p.server;
    metrics.extend(p.prose);
    metrics.extend(p.result);
    Ok(Workload {
        name,
        domain,
        vcpus,
        verdict,
        verdict_detail,
        metrics,
    })
}

fn is_exit_row(text: &str) -> bool {
    match text.split_whitespace().next() {
        Some("all") => true,
        Some(w) => w.parse::<u32>().is_ok(),
        None => false,
    }
}

fn number(word: &str) -> Result<u64, String> {
    word.parse()
        .map_err(|_| format!("`{word}` is not a whole number"))
}

fn value(word: &str) -> Result<Option<Value>, String> {
    if word == "-" {
        return Ok(None);
    }
    if let Ok(c) = word.parse::<u64>() {
        return Ok(Some(Value::Count(c)));
    }
    match word.parse::<f64>() {
        Ok(r) if r.is_finite() => Ok(Some(Value::Ratio(r))),
        _ => Err(format!("`{word}` is not a number or `-`")),
    }
}

/// One row of the per-pCPU exit table; `None` for the `all` row.
fn exit_row(text: &str, heads: &[String]) -> Result<Option<Pcpu>, String> {
    let words: Vec<&str> = text.split_whitespace().collect();
    if words.len() != heads.len() + 1 {
        return Err(format!(
            "{} values for {} columns",
            words.len() - 1,
            heads.len()
        ));
    }
    let mut p = Pcpu::default();
    for (h, w) in heads.iter().zip(&words[1..]) {
        let n = number(w)?;
        match pcpu_key(h) {
            Ok(bucket) => p.exits.insert(bucket.to_string(), n),
            Err(counter) => p.counters.insert(counter, n),
        };
    }
    if words[0] == "all" {
        return Ok(None);
    }
    p.cpu = words[0]
        .parse()
        .map_err(|_| format!("`{}` is not a pCPU number", words[0]))?;
    Ok(Some(p))
}

/// `d7` -> 7.
fn domain_of(word: &str) -> Result<u32, String> {
    word.strip_prefix('d')
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("`{word}` is not a domain (`d<number>`)"))
}

/// One row of the server-counter table: `<name> d<N>` and one number per
/// head. `None` for the `all (server)` row and for rows that give a reason
/// instead of numbers.
fn server_row(text: &str, heads: &[String]) -> Result<Option<(u32, Metrics)>, String> {
    let words: Vec<&str> = text.split_whitespace().collect();
    if words.len() < heads.len() + 1
        || words[words.len() - heads.len()..]
            .iter()
            .any(|w| w.parse::<u64>().is_err())
    {
        // `demand-64M d1  server does not report counters`: no numbers.
        return Ok(None);
    }
    let label = &words[..words.len() - heads.len()];
    if label == ["all", "(server)"] {
        return Ok(None);
    }
    let [_name, domain] = label else {
        return Err(format!(
            "row label `{}` is not `<workload> d<N>`",
            label.join(" ")
        ));
    };
    let domain = domain_of(domain)?;
    let mut values = BTreeMap::new();
    for (h, w) in heads.iter().zip(&words[label.len()..]) {
        values.insert(server_key(h), Value::Count(number(w)?));
    }
    Ok(Some((domain, values)))
}

/// A line starting `svm: `; returns the section that starts after it.
fn svm_line(
    rest: &str,
    report: &mut Report,
    domains: &mut BTreeMap<u32, Partial>,
    line: usize,
) -> Result<Section, String> {
    if rest.starts_with("---- exits by reason, per pCPU") {
        return Ok(Section::ExitHeader);
    }
    if rest.starts_with("---- MMU server `") && rest.contains("counters, per workload") {
        return Ok(Section::ServerHeader);
    }
    if let Some(w) = rest.strip_prefix("workload ") {
        workload_line(w, domains, line)?;
    } else if let Some(s) = rest.strip_prefix("shadow pages in use ") {
        // `225, peak 225; fast-path fixes: ...`
        let (now, tail) = s.split_once(", peak ").ok_or("no `, peak ` after in-use")?;
        let peak = tail.split(';').next().unwrap_or(tail);
        report.shadow_pages_in_use = Some(number(now.trim())?);
        report.shadow_pages_peak = Some(number(peak.trim())?);
    } else if let Some(s) = rest.strip_suffix(" workloads passed") {
        let (p, t) = s
            .split_once('/')
            .ok_or("no `N/M` before `workloads passed`")?;
        report.workloads_passed = Some(number(p)? as u32);
        report.workloads_total = Some(number(t)? as u32);
    } else if let Some(s) = rest.strip_prefix("MMU server `") {
        // `MMU server `reference`; 11 workloads on 8 CPUs`
        if let Some((name, tail)) = s.split_once("`; ") {
            report.server = Some(name.to_string());
            if let Some(cpus) = tail
                .strip_suffix(" CPUs")
                .and_then(|t| t.rsplit(' ').next())
            {
                report.cpus = Some(number(cpus)? as u32);
            }
        }
    }
    Ok(Section::None)
}

/// `demand-64M   d1 vcpus 1 exits  64281 #PF  64086 ... PASS (detail)`.
fn workload_line(
    text: &str,
    domains: &mut BTreeMap<u32, Partial>,
    line: usize,
) -> Result<(), String> {
    let mut words = text.split_whitespace();
    let name = words.next().ok_or("no workload name")?;
    let domain = domain_of(words.next().ok_or("no domain after the name")?)?;
    let d = domains.entry(domain).or_default();
    if d.verdict.is_some() {
        return Err(format!("a second workload line for d{domain}"));
    }
    if d.first_line == 0 {
        d.first_line = line;
    }
    d.name = Some(name.to_string());
    loop {
        let key = words.next().ok_or("no PASS or FAIL at the end")?;
        let verdict = match key {
            "PASS" => Some(Verdict::Pass),
            "FAIL" => Some(Verdict::Fail),
            _ => None,
        };
        if let Some(v) = verdict {
            d.verdict = Some((v, words.collect::<Vec<_>>().join(" ")));
            return Ok(());
        }
        let val = words
            .next()
            .ok_or_else(|| format!("no value after `{key}`"))?;
        if key == "vcpus" {
            d.vcpus = Some(number(val)? as u32);
        } else if let Some(v) = value(val).map_err(|e| format!("{key}: {e}"))? {
            d.prose.insert(workload_key(key), v);
        }
    }
}

/// A `result:` line (after the prefix): `v=1` then `key=value` words.
fn result_line(
    rest: &str,
    report: &mut Report,
    domains: &mut BTreeMap<u32, Partial>,
    pcpus: &mut BTreeMap<u32, Pcpu>,
    line: usize,
) -> Result<(), String> {
    let pairs = versioned_pairs(rest, "result", RESULT_LINE_VERSION, &[])?;
    let pairs = pairs.as_slice();
    match pairs.first() {
        Some(("workload", name)) => {
            let mut domain = None;
            let mut vcpus = None;
            let mut verdict = None;
            let mut metrics = BTreeMap::new();
            for (k, v) in &pairs[1..] {
                match *k {
                    "domain" => domain = Some(number(v)? as u32),
                    "vcpus" => vcpus = Some(number(v)? as u32),
                    "verdict" => {
                        verdict = Some(match *v {
                            "PASS" => Verdict::Pass,
                            "FAIL" => Verdict::Fail,
                            other => return Err(format!("verdict `{other}` is not PASS or FAIL")),
                        })
                    }
                    key => {
                        if let Some(val) = value(v).map_err(|e| format!("{key}: {e}"))? {
                            metrics.insert(key.to_string(), val);
                        }
                    }
                }
            }
            let domain = domain.ok_or("a workload result line needs `domain=`")?;
            let d = domains.entry(domain).or_default();
            if !d.result.is_empty() {
                return Err(format!("a second result line for d{domain}"));
            }
            if d.first_line == 0 {
                d.first_line = line;
            }
            if let Some(old) = &d.name {
                if old != name {
                    return Err(format!("d{domain} is `{old}` elsewhere, `{name}` here"));
                }
            }
            d.name = Some(name.to_string());
            d.vcpus = vcpus.or(d.vcpus);
            if let Some(v) = verdict {
                let detail = d.verdict.take().map(|(_, t)| t).unwrap_or_default();
                d.verdict = Some((v, detail));
            }
            d.result = metrics;
        }
        Some(("pcpu", cpu)) => {
            let cpu = number(cpu)? as u32;
            let p = pcpus.entry(cpu).or_insert_with(|| Pcpu {
                cpu,
                ..Pcpu::default()
            });
            for (k, v) in &pairs[1..] {
                let n = number(v).map_err(|e| format!("{k}: {e}"))?;
                match k.strip_prefix("exits.") {
                    Some(bucket) => p.exits.insert(bucket.to_string(), n),
                    None => p.counters.insert(k.to_string(), n),
                };
            }
        }
        Some(("server", name)) => {
            report.server = Some(name.to_string());
            for (k, v) in &pairs[1..] {
                let n = number(v).map_err(|e| format!("{k}: {e}"))?;
                match *k {
                    "cpus" => report.cpus = Some(n as u32),
                    "workloads" => report.workloads_total = Some(n as u32),
                    "passed" => report.workloads_passed = Some(n as u32),
                    "shadow_pages_peak" => report.shadow_pages_peak = Some(n),
                    "shadow_pages_in_use" => report.shadow_pages_in_use = Some(n),
                    other => return Err(format!("unknown key `{other}` in a run result line")),
                }
            }
        }
        _ => {
            return Err("after `v=`, a result line names `workload=`, `pcpu=` or `server=`".into())
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_console;
    use crate::results::{Value, Verdict};

    const REFERENCE: &str = include_str!("../../tests/fixtures/run-reference.txt");
    const WITH_RESULTS: &str = include_str!("../../tests/fixtures/run-result-lines.txt");

    fn lines(text: &str) -> Vec<&str> {
        text.lines().collect()
    }

    #[test]
    fn todays_report_gives_every_workload_and_pcpu() {
        let r = parse_console(&lines(REFERENCE)).unwrap();
        assert_eq!(r.server.as_deref(), Some("reference"));
        assert_eq!(r.cpus, Some(8));
        assert_eq!(
            (r.workloads_passed, r.workloads_total),
            (Some(11), Some(11))
        );
        assert_eq!(
            (r.shadow_pages_in_use, r.shadow_pages_peak),
            (Some(225), Some(225))
        );
        assert_eq!(r.workloads.len(), 11);
        let d = &r.workloads[0];
        assert_eq!((d.name.as_str(), d.domain, d.vcpus), ("demand-64M", 1, 1));
        assert_eq!(d.verdict, Verdict::Pass);
        let m = |k: &str| d.metrics.get(k).copied();
        assert_eq!(m("exits"), Some(Value::Count(64281)));
        assert_eq!(m("exits.pf"), Some(Value::Count(64086)));
        assert_eq!(m("faults_injected"), Some(Value::Count(16398)));
        assert_eq!(m("exits_per_demand_fault"), Some(Value::Ratio(3.92)));
        assert_eq!(m("shootdown_ipis"), Some(Value::Count(5)));
        assert_eq!(m("server.shadow_pages_created"), Some(Value::Count(161)));
        assert_eq!(m("server.flush_cpus"), Some(Value::Count(14)));
        // `-` means not applicable: no key at all.
        assert_eq!(r.workloads[1].metrics.get("exits_per_demand_fault"), None);
        let hostile = &r.workloads[10];
        assert_eq!(hostile.name, "hostile");
        assert_eq!(
            hostile.verdict_detail,
            "(faulted, then stopped on shutdown) [stopped: shutdown 0x1293cf]"
        );
        assert_eq!(r.pcpus.len(), 8);
        assert_eq!(r.pcpus[1].exits["pf"], 64822);
        assert_eq!(r.pcpus[6].counters["pcpus_flushed"], 474);
        // The per-pCPU rows add up to the table's own `all` row.
        let hlt: u64 = r.pcpus.iter().map(|p| p.exits["hlt"]).sum();
        assert_eq!(hlt, 42202);
        // The server's per-workload page faults add up to its total.
        let pf: u64 = r
            .workloads
            .iter()
            .map(|w| w.metrics["server.page_faults"].as_f64() as u64)
            .sum();
        assert_eq!(pf, 94075);
    }

    #[test]
    fn result_lines_win_over_the_prose_and_add_what_it_lacks() {
        let r = parse_console(&lines(WITH_RESULTS)).unwrap();
        let d = &r.workloads[0];
        assert_eq!(d.metrics["exits_per_demand_fault"], Value::Ratio(3.0));
        assert_eq!(d.metrics["exits.hlt"], Value::Count(2));
        assert_eq!(d.metrics["shadow_pages_peak"], Value::Count(161));
        assert_eq!(d.metrics["pcpus_flushed"], Value::Count(16));
        // Prose numbers the result line does not repeat stay.
        assert_eq!(d.metrics["server.reclaims"], Value::Count(0));
        // The verdict detail comes from the prose line.
        let hostile = r.workloads.iter().find(|w| w.name == "hostile").unwrap();
        assert!(hostile.verdict_detail.contains("stopped on shutdown"));
        assert_eq!(r.pcpus[0].counters["server_requests"], 19125);
        // A workload known only from its result line.
        let only = r.workloads.iter().find(|w| w.name == "linux-like").unwrap();
        assert_eq!(
            (only.domain, only.vcpus, only.verdict),
            (12, 1, Verdict::Fail)
        );
        assert_eq!(
            only.metrics["instructions_per_forwarded_exit"],
            Value::Ratio(1520.5)
        );
    }

    #[test]
    fn bad_lines_are_errors_naming_the_line_and_the_word() {
        let cases = [
            (
                "svm: workload demand-64M d1 vcpus 1 exits 12x PASS",
                "`12x`",
            ),
            ("svm: workload demand-64M dx vcpus 1 PASS", "`dx`"),
            (
                "svm: workload demand-64M d1 vcpus 1 exits 3",
                "PASS or FAIL",
            ),
            ("result: v=2 workload=a domain=1", "version `2`"),
            ("result: workload=a domain=1", "v=<version>"),
            (
                "result: v=1 workload=a domain=1 exits=1 exits=2",
                "`exits` given twice",
            ),
            ("result: v=1 workload=a domain=1 Exits=1", "`Exits`"),
            ("result: v=1 workload=a domain=1 verdict=MAYBE", "`MAYBE`"),
            ("result: v=1 workload=a vcpus=1", "domain="),
            ("result: v=1 server=x bogus=1", "`bogus`"),
            ("result: v=1 nothing", "`nothing`"),
            ("svm: 3/x workloads passed", "`x`"),
        ];
        for (line, want) in cases {
            let text = format!("umbra: booting\n{line}\n");
            let e = parse_console(&lines(&text)).expect_err(line);
            assert_eq!(e.line, 2, "{line}");
            assert!(e.what.contains(want), "{line}: {e}");
        }
    }

    #[test]
    fn broken_tables_are_errors_and_truncated_runs_are_not() {
        let mut l = lines(REFERENCE);
        let at = l.iter().position(|x| x.starts_with("1 ")).unwrap();
        l[at] = "1 64822 0";
        let e = parse_console(&l).unwrap_err();
        assert!(e.what.contains("values for"), "{e}");
        // A run cut off before the report parses, with nothing in it.
        let head: Vec<&str> = lines(REFERENCE).into_iter().take(26).collect();
        let r = parse_console(&head).unwrap();
        assert!(r.workloads.is_empty() && r.pcpus.is_empty());
        assert_eq!(r.server.as_deref(), Some("reference"));
        // Every line cut short anywhere, or with a word doubled: an error or
        // a report, never a panic.
        let full = lines(WITH_RESULTS);
        for (i, line) in full.iter().enumerate() {
            for cut in (0..line.len())
                .filter(|&c| line.is_char_boundary(c))
                .step_by(3)
            {
                let mut l = full.clone();
                l[i] = &line[..cut];
                let _ = parse_console(&l);
            }
            let doubled = line.replacen(' ', "  x ", 1);
            let mut l = full.clone();
            l[i] = &doubled;
            let _ = parse_console(&l);
        }
        // Garbage never panics.
        for junk in [
            "svm: ---- exits by reason, per pCPU ----\n\n",
            "svm: workload",
            "result:",
        ] {
            let _ = parse_console(&lines(junk));
        }
    }
}
