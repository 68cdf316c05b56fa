//! The run's report: exits per pCPU, the server's own counters, the costs, and each workload's verdict.

use abi::MmuRequest;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use guests::work::{Workload, WORKLOADS};
use kernel::kprintln;
use kernel::svm::domain::Domain;
use kernel::svm::sched::Scheduler;
use kernel::svm::stats::{self, get, STATS};
use kernel::svm::Svm;

/// The run's name in test lines: `<server>-<transport>[-<policy>]`.
pub fn run_label(svm: &Svm) -> String {
    match &svm.sched {
        Some(s) => format!("{}-{}-{}", svm.name, svm.transport(), s.policy),
        None => format!("{}-{}", svm.name, svm.transport()),
    }
}

/// The guests-crate workload a domain runs.
pub fn workload(d: &Domain) -> &'static Workload {
    &WORKLOADS[d.spec.index as usize]
}

/// A workload's verdict from what its domain reported.
pub fn verdict(d: &Domain) -> (bool, &'static str) {
    use core::sync::atomic::Ordering::Acquire;
    let reported = d.reported.load(Acquire);
    let stop = *d.stop_reason.lock();
    if workload(d).ends_in_shutdown {
        return match (reported, stop) {
            (1, Some(("shutdown", _))) => (true, "PASS (faulted, then stopped on shutdown)"),
            (1, _) => (false, "FAIL (reported, but was not stopped on shutdown)"),
            _ => (false, "FAIL (no passing report)"),
        };
    }
    if stop.is_some() {
        return (false, "FAIL (stopped)");
    }
    if reported == 1 && d.exited_bad.load(Acquire) == 0 && d.exited_ok.load(Acquire) == d.spec.vcpus
    {
        (true, "PASS")
    } else {
        (false, "FAIL")
    }
}

/// Prints the run's report: exits per pCPU, the server's counters, the
/// costs, one line per workload with its verdict (and, in test mode, one
/// test line each). Returns whether every workload passed.
pub fn report(svm: &Svm, ncpu: usize, test_mode: bool) -> bool {
    use kernel::svm::exit::{BUCKETS, BUCKET_NAMES};
    kprintln!("svm: ---- exits by reason, per pCPU ----");
    let mut line = String::new();
    use core::fmt::Write;
    let _ = write!(line, "cpu ");
    for n in BUCKET_NAMES {
        let _ = write!(line, "{n:>8}");
    }
    let _ = write!(
        line,
        "{:>8}{:>8}{:>8}{:>7}{:>6}{:>7}{:>7}",
        "fixed", "inject", "emul", "zaps", "ipis", "flushd", "mmu"
    );
    kprintln!("{line}");
    let mut tot = [0u64; BUCKETS + 8];
    for (c, s) in STATS.iter().enumerate().take(ncpu) {
        let mut row = [0u64; BUCKETS + 8];
        for (b, r) in row.iter_mut().enumerate().take(BUCKETS) {
            *r = get(&s.exits[b]);
        }
        row[BUCKETS] = get(&s.fixed);
        row[BUCKETS + 1] = get(&s.injected);
        row[BUCKETS + 2] = get(&s.emulated);
        row[BUCKETS + 3] = get(&s.zaps);
        row[BUCKETS + 4] = get(&s.ipis);
        row[BUCKETS + 5] = get(&s.cpus_flushed);
        row[BUCKETS + 6] = get(&s.mmu_calls);
        print_row(&format!("{c:<4}"), &row);
        for (t, r) in tot.iter_mut().zip(row.iter()) {
            *t += r;
        }
    }
    print_row("all ", &tot);
    let (total, per_domain) = server_counters(svm);
    let (shadow_now, shadow_peak) = svm.shadow_pages();
    let fast = match &total {
        Ok(c) => format!(
            "{} of the server's {} fixes ({} page faults)",
            c.fast_path_fixes, c.faults_fixed, c.page_faults
        ),
        Err(why) => why.clone(),
    };
    kprintln!(
        "svm: shadow pages in use {shadow_now}, peak {shadow_peak}; fast-path fixes: {fast} \
         (Resume replies = {})",
        tot[BUCKETS]
    );
    let costs = print_costs(svm);
    if let Some(s) = &svm.sched {
        print_sched(svm, s);
    }
    kprintln!("svm: ---- workloads ----");
    let mut all = true;
    for d in svm.domains() {
        let (ok, text) = verdict(d);
        all &= ok;
        let stop = *d.stop_reason.lock();
        let n = |c: &core::sync::atomic::AtomicU64| c.load(core::sync::atomic::Ordering::Relaxed);
        let exits = n(&d.exits);
        let injected = n(&d.injected);
        let per_fault = exits_per_fault(d);
        kprintln!(
            "svm: workload {:<12} d{} vcpus {} exits {:>6} #PF {:>6} fixed {:>6} inject {:>5} emul {:>5} \
             exits/demand-fault {:>5} zaps {:>3} harvests {:>3} shootdown-ipis {:>4}  {}{}",
            d.spec.name,
            d.id.0,
            d.spec.vcpus,
            exits,
            n(&d.pf_exits),
            n(&d.fixed),
            injected,
            n(&d.emulated),
            per_fault,
            n(&d.zaps),
            n(&d.harvests),
            n(&d.shootdown_ipis),
            text,
            match stop {
                Some((why, v)) => format!(" [stopped: {why} {v:#x}]"),
                None => String::new(),
            }
        );
    }
    for (d, counters) in svm.domains().iter().zip(&per_domain) {
        let grants = crate::grants::result_fields(svm, d);
        kprintln!("{}{grants}", result_line(d, counters.as_ref().ok(), costs));
    }
    let doms = svm.domains();
    let passed = doms.iter().filter(|d| verdict(d).0).count();
    kprintln!("svm: {passed}/{} workloads passed", doms.len());
    if test_mode {
        let name = run_label(svm);
        for d in doms {
            match verdict(d) {
                (true, _) => kprintln!("test svm-{name}-{} ... ok", d.spec.name),
                (false, why) => {
                    kprintln!("test svm-{name}-{} ... FAILED: {why}", d.spec.name)
                }
            }
        }
    }
    all
}

/// Asks the server for its counters, per domain and in total, through the
/// same byte path as every request (`Svm::mmu`), prints the table (or one
/// line when the server reports none at all), and returns the total (or the
/// text printed instead of numbers).
/// The server's counters: in total, and per domain (in domain order).
type ServerCounts = (Counted, Vec<Counted>);
/// One `GetCounters` answer, or why there is none.
type Counted = Result<abi::ServerCounters, String>;

fn server_counters(svm: &Svm) -> ServerCounts {
    let doms = svm.domains();
    let stopped = || -> ServerCounts {
        let why = String::from("the server was stopped");
        (
            Err(why.clone()),
            doms.iter().map(|_| Err(why.clone())).collect(),
        )
    };
    if svm.server_stopped() {
        kprintln!(
            "svm: ---- MMU server `{}` counters: the server was stopped ----",
            svm.name
        );
        return stopped();
    }
    let mut rows = Vec::new();
    for d in doms {
        let Ok(reply) = svm.mmu(Some(d), &MmuRequest::GetCounters { domain: Some(d.id) }) else {
            return stopped();
        };
        let label = format!("{} d{}", d.spec.name, d.id.0);
        rows.push((label, stats::counters_of(&reply)));
    }
    let Ok(reply) = svm.mmu(None, &MmuRequest::GetCounters { domain: None }) else {
        return stopped();
    };
    let total = stats::counters_of(&reply);
    let name = &svm.name;
    let per_domain = rows.iter().map(|(_, r)| r.clone()).collect();
    if let Err(why) = &total {
        if rows.iter().all(|(_, r)| r.as_ref().err() == Some(why)) {
            kprintln!("svm: ---- MMU server `{name}` counters: {why} ----");
            return (total, per_domain);
        }
    }
    kprintln!("svm: ---- MMU server `{name}` counters, per workload (GetCounters) ----");
    kprintln!("{}", stats::server_header());
    for (label, r) in &rows {
        kprintln!("{}", stats::server_line(label, r));
    }
    kprintln!("{}", stats::server_line("all (server)", &total));
    (total, per_domain)
}

/// Exits per fault, the one definition: the exits the domain took strictly
/// between the guest's `PHASE_BEGIN` and `PHASE_END` hypercalls, over the
/// faults the guest counted in that phase (guest demand faults for
/// demand-64M and linux-32M, first touches of mapped pages for touch-16M).
/// `-` for a workload without a measured phase.
pub fn exits_per_fault(d: &Domain) -> String {
    use core::sync::atomic::Ordering::Relaxed;
    match d.phase_faults.load(Relaxed) {
        0 => "-".into(),
        f => format!("{:.2}", d.phase_exits.load(Relaxed) as f64 / f as f64),
    }
}

/// The machine-readable line of one workload (`result: v=1 ...`, the
/// format `cargo xtask` parses into its results; see
/// `tools/src/results/SCHEMA.md`).
fn result_line(
    d: &Domain,
    server: Option<&abi::ServerCounters>,
    costs: Option<(u32, u32)>,
) -> String {
    use core::fmt::Write;
    use core::sync::atomic::Ordering::Relaxed;
    let n = |c: &core::sync::atomic::AtomicU64| c.load(Relaxed);
    let (ok, _) = verdict(d);
    let mut l = format!(
        "result: v=1 workload={} domain={} vcpus={} verdict={} demand_faults={} exits={}",
        d.spec.name,
        d.id.0,
        d.spec.vcpus,
        if ok { "PASS" } else { "FAIL" },
        n(&d.phase_faults),
        n(&d.exits)
    );
    for (key, c) in kernel::svm::exit::BUCKET_KEYS.iter().zip(&d.exits_by) {
        let _ = write!(l, " exits.{key}={}", n(c));
    }
    let _ = write!(
        l,
        " exits_per_demand_fault={} faults_fixed={} faults_injected={} emulated_writes={}",
        exits_per_fault(d),
        n(&d.fixed),
        n(&d.injected),
        n(&d.emulated)
    );
    match server {
        Some(c) => {
            let _ = write!(
                l,
                " shadow_pages_peak={} shadow_pages_created={} shadow_pages_freed={}",
                c.shadow_pages_peak, c.shadow_pages_created, c.shadow_pages_freed
            );
        }
        None => l.push_str(" shadow_pages_peak=- shadow_pages_created=- shadow_pages_freed=-"),
    }
    let _ = write!(
        l,
        " zaps={} flush_obligations={} shootdown_ipis={} pcpus_flushed={} harvests={}",
        n(&d.zaps),
        n(&d.obligations),
        n(&d.shootdown_ipis),
        n(&d.cpus_flushed),
        n(&d.harvests)
    );
    if let Some((request, exit)) = costs {
        let _ = write!(
            l,
            " instructions_per_forwarded_exit={exit} instructions_per_server_request={request}"
        );
    }
    l
}

/// The cost table: TSC ticks per MMU request round trip and per forwarded
/// #PF exit, median and p99 over the run's samples. Under `-icount` the TSC
/// counts instructions, and the table says so (`umbra-costs:` lines are
/// what `cargo xtask run --icount` collects).
/// Returns the medians (request round trip, #PF exit) when they are
/// instruction counts.
fn print_costs(svm: &Svm) -> Option<(u32, u32)> {
    let icount = kernel::boot::has_arg(kernel::cmdline(), "icount");
    let unit = if icount {
        "instructions"
    } else {
        "TSC ticks (boot with --icount for instructions)"
    };
    kprintln!(
        "svm: ---- costs in {unit}, transport {} ----",
        svm.transport()
    );
    for (label, fig) in [
        ("request round trip", stats::Figure::RoundTrip),
        ("forwarded #PF exit", stats::Figure::PfExit),
    ] {
        match stats::percentiles(fig) {
            Some((n, median, p99)) => kprintln!(
                "umbra-costs: server {} transport {} figure {:?} samples {n} median {median} p99 {p99}   ({label})",
                svm.name,
                svm.transport(),
                fig
            ),
            None => kprintln!("umbra-costs: server {} transport {} figure {:?} samples 0", svm.name, svm.transport(), fig),
        }
    }
    let median = |f| stats::percentiles(f).map_or(0, |(_, m, _)| m);
    icount.then(|| {
        (
            median(stats::Figure::RoundTrip),
            median(stats::Figure::PfExit),
        )
    })
}

fn print_row(label: &str, row: &[u64]) {
    use core::fmt::Write;
    let mut line = String::new();
    let _ = write!(line, "{label}");
    for (i, v) in row.iter().enumerate().take(kernel::svm::exit::BUCKETS) {
        let _ = i;
        let _ = write!(line, "{v:>8}");
    }
    let b = kernel::svm::exit::BUCKETS;
    let _ = write!(
        line,
        "{:>8}{:>8}{:>8}{:>7}{:>6}{:>7}{:>7}",
        row[b],
        row[b + 1],
        row[b + 2],
        row[b + 3],
        row[b + 4],
        row[b + 5],
        row[b + 6]
    );
    kprintln!("{line}");
}

/// The scheduler's part of the report: per vCPU (CPU time, slices,
/// migrations), per pCPU (busy and idle time), the summary (migrations,
/// the flush obligations they caused, refused decisions, Jain's index over
/// equal-weight CPU-bound vCPUs, the worst share error of weighted ones),
/// and one `trace:` line per slice for the timeline picture. Line formats:
/// `tools/src/results/SCHEMA.md`.
fn print_sched(svm: &Svm, s: &Scheduler) {
    use core::sync::atomic::Ordering::Relaxed;
    let policy = &s.policy;
    kprintln!("sched: ---- scheduler `{policy}` ----");
    // CPU-bound vCPUs: (domain, weight, CPU time inside the domain's window).
    let mut cpu_bound: Vec<(u32, u32, u64)> = Vec::new();
    let mut migrations = 0;
    for d in svm.domains() {
        let w = workload(d);
        for v in 0..d.spec.vcpus {
            let id = d.first_vcpu + v;
            let rec = &s.per_vcpu[id as usize];
            let weight = s.weights.get(id as usize).map_or(0, |w| w.load(Relaxed));
            let cpu = rec.cpu_us.load(Relaxed);
            migrations += rec.migrations.load(Relaxed);
            kprintln!(
                "sched: v=1 policy={policy} vcpu={id} domain={} workload={} weight={weight} cpu_us={cpu} slices={} migrations={}",
                d.id.0,
                d.spec.name,
                rec.slices.load(Relaxed),
                rec.migrations.load(Relaxed)
            );
            if w.needs_scheduler {
                cpu_bound.push((d.id.0, weight, rec.window_us.load(Relaxed)));
            }
        }
    }
    let elapsed = s.elapsed_us();
    for (p, rec) in s.per_pcpu.iter().enumerate() {
        let busy = rec.busy_us.load(Relaxed);
        kprintln!(
            "sched: v=1 policy={policy} pcpu={p} busy_us={busy} idle_us={} slices={}",
            elapsed.saturating_sub(busy),
            rec.slices.load(Relaxed)
        );
    }
    let jain = worst_jain(&cpu_bound);
    let share_error = worst_share_error(&cpu_bound);
    let flushes: u64 = svm
        .domains()
        .iter()
        .map(|d| d.migration_flushes.load(Relaxed))
        .sum();
    kprintln!(
        "sched: v=1 policy={policy} summary migrations={migrations} migration_flushes={flushes} refused={} jain_equal={jain} worst_share_error={share_error}",
        s.refused.load(Relaxed)
    );
    for (p, rec) in s.per_pcpu.iter().enumerate() {
        for t in rec.trace.lock().iter() {
            kprintln!(
                "trace: v=1 pcpu={p} vcpu={} domain={} start_us={} end_us={}",
                t.vcpu.0,
                t.domain.0,
                t.start_us,
                t.end_us
            );
        }
    }
}

/// Jain's index of the CPU time equal-weight CPU-bound vCPUs of one domain
/// got inside its measurement window (the common window all of them spend
/// runnable), worst over the (domain, weight) groups, as `x.xxxxxx`; `-`
/// without CPU-bound vCPUs.
fn worst_jain(cpu_bound: &[(u32, u32, u64)]) -> String {
    let keys: Vec<u64> = cpu_bound
        .iter()
        .map(|c| (u64::from(c.0) << 32) | u64::from(c.1))
        .collect();
    let times: Vec<u64> = cpu_bound.iter().map(|c| c.2).collect();
    match abi::sched::jain_by_key(&keys, &times) {
        Some((ppm, _)) => format!("{}.{:06}", ppm.0 / 1_000_000, ppm.0 % 1_000_000),
        None => "-".into(),
    }
}

/// The largest relative error, over the domains whose CPU-bound vCPUs have
/// different weights, between a vCPU's share of its domain's CPU time
/// inside the window and its share by weight, as `x.xxxx` (0.05 = 5%);
/// `-` when no domain has different weights.
fn worst_share_error(cpu_bound: &[(u32, u32, u64)]) -> String {
    let mut worst: Option<u32> = None;
    let mut domains: Vec<u32> = cpu_bound.iter().map(|c| c.0).collect();
    domains.dedup();
    for dom in domains {
        let group: Vec<&(u32, u32, u64)> = cpu_bound.iter().filter(|c| c.0 == dom).collect();
        let weights: Vec<u32> = group.iter().map(|c| c.1).collect();
        if weights.windows(2).all(|w| w[0] == w[1]) {
            continue;
        }
        let times: Vec<u64> = group.iter().map(|c| c.2).collect();
        let mut shares = alloc::vec![abi::sched::Share::default(); weights.len()];
        // One pCPU's worth: no vCPU can reach the cap, so the expected
        // shares are exactly proportional to the weights (the CPU-bound
        // vCPUs of the scheduler workloads never get near a whole pCPU
        // each: 36 of them share 8).
        let n = abi::sched::weighted_shares(&weights, &times, 1, &mut shares);
        let w = shares[..n]
            .iter()
            .map(|s| s.deviation().0)
            .max()
            .unwrap_or(0);
        worst = Some(worst.map_or(w, |x: u32| x.max(w)));
    }
    match worst {
        Some(w) => format!("{}.{:04}", w / 1_000_000, (w % 1_000_000) / 100),
        None => "-".into(),
    }
}
