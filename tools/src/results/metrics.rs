//! The metric catalogue: every per-workload metric key, its table label, and which way is better.

use Better::{Higher, Lower, Neither};

/// Which value of a metric is the better one, for marking tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Better {
    /// Fewer is better (exits, flushes, shadow pages: work done).
    Lower,
    /// More is better.
    Higher,
    /// Set by the guest, not by the implementation: never marked.
    Neither,
}

/// One metric a workload can report.
#[derive(Clone, Copy, Debug)]
pub struct Metric {
    /// Key in `results.json` (`workloads[].metrics`) and in `result:` lines.
    pub key: &'static str,
    /// Row label in tables and CSV files.
    pub label: &'static str,
    /// Which way is better.
    pub better: Better,
}

const fn m(key: &'static str, label: &'static str, better: Better) -> Metric {
    Metric { key, label, better }
}

/// Exit reason buckets: (key in results, column head in the kernel's exit
/// table). Keys are `exits.<key>` in workload metrics.
pub const EXIT_BUCKETS: [(&str, &str); 14] = [
    ("pf", "#PF"),
    ("cr3_write", "cr3-wr"),
    ("cr3_read", "cr3-rd"),
    ("invlpg", "invlpg"),
    ("vmmcall", "vmmcall"),
    ("hlt", "hlt"),
    ("ioio", "ioio"),
    ("intr", "intr"),
    ("shutdown", "shutdn"),
    ("msr", "msr"),
    ("exception", "exc"),
    ("invalid", "invalid"),
    ("other", "other"),
    ("cr_write", "cr-wr"),
];

/// Every known metric, in table row order (verdicts come after all of them).
/// Keys starting `server.` are the MMU server's own counters
/// (`abi::ServerCounters`, field names kept); the others are the kernel's.
#[rustfmt::skip]
pub const CATALOGUE: &[Metric] = &[
    m("exits.pf",                          "exits: #PF",                           Lower),
    m("exits.cr3_write",                   "exits: CR3 write",                     Lower),
    m("exits.cr3_read",                    "exits: CR3 read",                      Lower),
    m("exits.cr_write",                    "exits: CR0/CR4 write",                 Lower),
    m("exits.invlpg",                      "exits: INVLPG",                        Lower),
    m("exits.vmmcall",                     "exits: VMMCALL",                       Lower),
    m("exits.hlt",                         "exits: HLT",                           Lower),
    m("exits.ioio",                        "exits: IN/OUT",                        Lower),
    m("exits.intr",                        "exits: interrupt",                     Lower),
    m("exits.msr",                         "exits: MSR",                           Lower),
    m("exits.exception",                   "exits: other exception",               Lower),
    m("exits.shutdown",                    "exits: shutdown",                      Neither),
    m("exits.invalid",                     "exits: invalid state",                 Lower),
    m("exits.other",                       "exits: other",                         Lower),
    m("exits",                             "exits (all reasons)",                  Lower),
    m("demand_faults",                     "guest demand faults",                  Neither),
    m("exits_per_demand_fault",            "exits per guest demand fault",         Lower),
    m("faults_fixed",                      "faults fixed",                         Lower),
    m("faults_injected",                   "faults injected",                      Neither),
    m("emulated_writes",                   "emulated writes",                      Lower),
    m("shadow_pages_peak",                 "shadow pages: peak",                   Lower),
    m("shadow_pages_created",              "shadow pages: created",                Lower),
    m("shadow_pages_freed",                "shadow pages: freed",                  Lower),
    m("zaps",                              "zaps",                                 Lower),
    m("flush_obligations",                 "flush obligations",                    Lower),
    m("shootdown_ipis",                    "shootdown IPIs",                       Lower),
    m("pcpus_flushed",                     "pCPUs flushed",                        Lower),
    m("harvests",                          "dirty-log harvests",                   Neither),
    m("instructions_per_forwarded_exit",   "instructions per forwarded exit",      Lower),
    m("instructions_per_server_request",   "instructions per server request",      Lower),
    m("server.page_faults",                "server: page faults",                  Lower),
    m("server.faults_fixed",               "server: faults fixed",                 Lower),
    m("server.faults_injected",            "server: faults injected",              Neither),
    m("server.fast_path_fixes",            "server: fast-path fixes",              Higher),
    m("server.shadow_pages_created",       "server: shadow pages created",         Lower),
    m("server.shadow_pages_freed",         "server: shadow pages freed",           Lower),
    m("server.shadow_pages_in_use",        "server: shadow pages in use",          Lower),
    m("server.shadow_pages_peak",          "server: shadow pages peak",            Lower),
    m("server.zaps",                       "server: zaps",                         Lower),
    m("server.reclaims",                   "server: reclaims",                     Lower),
    m("server.emulate_write_replies",      "server: emulate-write replies",        Lower),
    m("server.emulated_writes",            "server: emulated writes",              Lower),
    m("server.unsyncs",                    "server: unsyncs",                      Neither),
    m("server.resyncs",                    "server: resyncs",                      Neither),
    m("server.unshadowed",                 "server: unshadowed frames",            Neither),
    m("server.flush_obligations",          "server: flush obligations",            Lower),
    m("server.flush_cpus",                 "server: pCPUs in flush obligations",   Lower),
    m("grants",                            "grant: grants made",                   Neither),
    m("grant_maps",                        "grant: maps",                          Neither),
    m("grant_unmaps",                      "grant: unmaps",                        Neither),
    m("grant_batches",                     "grant: unmap batches",                 Neither),
    m("grant_flushes",                     "grant: flushes",                       Lower),
    m("grant_flushes_avoided",             "grant: flushes avoided",               Higher),
    m("grant_shootdown_ipis",              "grant: shootdown IPIs",                Lower),
    m("grant_pcpus_flushed",               "grant: pCPUs flushed",                 Lower),
    m("grant_copies",                      "grant: copies",                        Neither),
    m("grant_calls",                       "grant: hypercalls",                    Neither),
    m("grant_refused",                     "grant: calls or entries refused",      Neither),
];

/// The catalogue entry of `key`, if known.
pub fn find(key: &str) -> Option<&'static Metric> {
    CATALOGUE.iter().find(|m| m.key == key)
}

/// Key of the server-counter table column `head` (`sp-new` ->
/// `server.shadow_pages_created`); unknown heads become `server.<head>`
/// with `-` as `_`.
pub fn server_key(head: &str) -> String {
    let field = match head {
        "pf" => "page_faults",
        "fixed" => "faults_fixed",
        "inject" => "faults_injected",
        "fast" => "fast_path_fixes",
        "sp-new" => "shadow_pages_created",
        "sp-free" => "shadow_pages_freed",
        "sp-used" => "shadow_pages_in_use",
        "sp-peak" => "shadow_pages_peak",
        "zaps" => "zaps",
        "reclm" => "reclaims",
        "emreq" => "emulate_write_replies",
        "emul" => "emulated_writes",
        "unsync" => "unsyncs",
        "resync" => "resyncs",
        "unshad" => "unshadowed",
        "flush" => "flush_obligations",
        "fcpus" => "flush_cpus",
        other => return format!("server.{}", sanitize(other)),
    };
    format!("server.{field}")
}

/// Key of a `svm: workload` line's word (`#PF` -> `exits.pf`); unknown
/// words are sanitized.
pub fn workload_key(word: &str) -> String {
    match word {
        "exits" => "exits".into(),
        "#PF" => "exits.pf".into(),
        "fixed" => "faults_fixed".into(),
        "inject" => "faults_injected".into(),
        "emul" => "emulated_writes".into(),
        "exits/demand-fault" => "exits_per_demand_fault".into(),
        "zaps" => "zaps".into(),
        "harvests" => "harvests".into(),
        "shootdown-ipis" => "shootdown_ipis".into(),
        other => sanitize(other),
    }
}

/// Key of a per-pCPU exit table column: `Ok(bucket)` for an exit reason,
/// `Err(counter)` for the other columns.
pub fn pcpu_key(head: &str) -> Result<&'static str, String> {
    if let Some((key, _)) = EXIT_BUCKETS.iter().find(|(_, h)| *h == head) {
        return Ok(key);
    }
    Err(match head {
        "fixed" => "faults_fixed".into(),
        "inject" => "faults_injected".into(),
        "emul" => "emulated_writes".into(),
        "zaps" => "zaps".into(),
        "ipis" => "shootdown_ipis".into(),
        "flushd" => "pcpus_flushed".into(),
        "mmu" => "server_requests".into(),
        other => sanitize(other),
    })
}

/// Lower case, with every character outside `[a-z0-9_.]` replaced by `_`.
pub fn sanitize(word: &str) -> String {
    word.chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{find, pcpu_key, server_key, workload_key, CATALOGUE, EXIT_BUCKETS};

    #[test]
    fn keys_are_unique_and_every_bucket_has_a_row() {
        for (i, a) in CATALOGUE.iter().enumerate() {
            assert!(
                CATALOGUE[i + 1..].iter().all(|b| b.key != a.key),
                "{} twice",
                a.key
            );
        }
        for (k, _) in EXIT_BUCKETS {
            assert!(find(&format!("exits.{k}")).is_some(), "no row for {k}");
        }
    }

    #[test]
    fn column_heads_map_to_catalogued_keys() {
        for h in [
            "pf", "fixed", "inject", "fast", "sp-new", "sp-free", "sp-used", "sp-peak", "zaps",
            "reclm", "emreq", "emul", "unsync", "resync", "unshad", "flush", "fcpus",
        ] {
            assert!(find(&server_key(h)).is_some(), "{h}");
        }
        assert_eq!(server_key("new-col"), "server.new_col");
        for w in [
            "exits",
            "#PF",
            "fixed",
            "inject",
            "emul",
            "exits/demand-fault",
        ] {
            assert!(find(&workload_key(w)).is_some(), "{w}");
        }
        assert_eq!(pcpu_key("shutdn"), Ok("shutdown"));
        assert_eq!(pcpu_key("flushd"), Err("pcpus_flushed".into()));
    }
}
