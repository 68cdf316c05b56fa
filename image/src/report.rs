//! The run's report: exits per pCPU, the server's own counters, the costs, and each workload's verdict.

use abi::MmuRequest;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use guests::work::{Workload, WORKLOADS};
use kernel::kprintln;
use kernel::svm::domain::Domain;
use kernel::svm::stats::{self, get, STATS};
use kernel::svm::Svm;

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
    let total = server_counters(svm);
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
    print_costs(svm);
    kprintln!("svm: ---- workloads ----");
    let mut all = true;
    for d in svm.domains() {
        let (ok, text) = verdict(d);
        all &= ok;
        let stop = *d.stop_reason.lock();
        let n = |c: &core::sync::atomic::AtomicU64| c.load(core::sync::atomic::Ordering::Relaxed);
        let exits = n(&d.exits);
        let injected = n(&d.injected);
        // Exits per guest demand fault: every exit of the domain (barriers,
        // console and checks included) over the guest's demand faults.
        let per_fault = match workload(d).demand_faults {
            0 => "-".into(),
            f => format!("{:.2}", exits as f64 / f as f64),
        };
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
    let doms = svm.domains();
    let passed = doms.iter().filter(|d| verdict(d).0).count();
    kprintln!("svm: {passed}/{} workloads passed", doms.len());
    if test_mode {
        let name = format!("{}-{}", svm.name, svm.transport());
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
fn server_counters(svm: &Svm) -> Result<abi::ServerCounters, String> {
    let doms = svm.domains();
    let mut rows = Vec::new();
    if svm.server_stopped() {
        let why = String::from("the server was stopped");
        kprintln!("svm: ---- MMU server `{}` counters: {why} ----", svm.name);
        return Err(why);
    }
    for d in doms {
        let Ok(reply) = svm.mmu(Some(d), &MmuRequest::GetCounters { domain: Some(d.id) }) else {
            return Err("the server was stopped".into());
        };
        let label = format!("{} d{}", d.spec.name, d.id.0);
        rows.push((label, stats::counters_of(&reply)));
    }
    let Ok(reply) = svm.mmu(None, &MmuRequest::GetCounters { domain: None }) else {
        return Err("the server was stopped".into());
    };
    let total = stats::counters_of(&reply);
    let name = &svm.name;
    if let Err(why) = &total {
        if rows.iter().all(|(_, r)| r.as_ref().err() == Some(why)) {
            kprintln!("svm: ---- MMU server `{name}` counters: {why} ----");
            return total;
        }
    }
    kprintln!("svm: ---- MMU server `{name}` counters, per workload (GetCounters) ----");
    kprintln!("{}", stats::server_header());
    for (label, r) in &rows {
        kprintln!("{}", stats::server_line(label, r));
    }
    kprintln!("{}", stats::server_line("all (server)", &total));
    total
}

/// The cost table: TSC ticks per MMU request round trip and per forwarded
/// #PF exit, median and p99 over the run's samples. Under `-icount` the TSC
/// counts instructions, and the table says so (`umbra-costs:` lines are
/// what `cargo xtask run --icount` collects).
fn print_costs(svm: &Svm) {
    let unit = if kernel::boot::has_arg(kernel::cmdline(), "icount") {
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
