//! Counters for the run's report: per pCPU, updated by the CPU itself
//! (relaxed atomics), summed at the end; and the formatting of the MMU
//! server's own counters (`GetCounters`), which only the server knows.

use super::exit::BUCKETS;
use abi::mmu::MmuError;
use abi::{MmuReply, MmuRequest, ServerCounters};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;
use core::sync::atomic::{AtomicU64, Ordering};
use spin::Mutex;

/// One pCPU's counters.
pub struct PcpuStats {
    /// Exits by report bucket.
    pub exits: [AtomicU64; BUCKETS],
    /// #PF exits the server fixed (Resume).
    pub fixed: AtomicU64,
    /// #PF exits injected into the guest.
    pub injected: AtomicU64,
    /// Page-table writes emulated for the server.
    pub emulated: AtomicU64,
    /// Zaps asked for (ZapAll requests and AllReloadRoots obligations).
    pub zaps: AtomicU64,
    /// Flush obligations carried out.
    pub obligations: AtomicU64,
    /// Shootdown IPIs sent for guest flushes.
    pub ipis: AtomicU64,
    /// CPUs told to flush (the local one included).
    pub cpus_flushed: AtomicU64,
    /// Messages exchanged with the MMU server.
    pub mmu_calls: AtomicU64,
}

impl PcpuStats {
    /// All zero.
    pub const fn new() -> PcpuStats {
        PcpuStats {
            exits: [const { AtomicU64::new(0) }; BUCKETS],
            fixed: AtomicU64::new(0),
            injected: AtomicU64::new(0),
            emulated: AtomicU64::new(0),
            zaps: AtomicU64::new(0),
            obligations: AtomicU64::new(0),
            ipis: AtomicU64::new(0),
            cpus_flushed: AtomicU64::new(0),
            mmu_calls: AtomicU64::new(0),
        }
    }
}

impl Default for PcpuStats {
    fn default() -> Self {
        Self::new()
    }
}

/// Adds one.
pub fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Reads.
pub fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// The counters of every possible pCPU.
pub static STATS: [PcpuStats; 64] = [const { PcpuStats::new() }; 64];

/// Zeroes every counter and drops every sample (a new run begins).
pub fn reset(ncpu: usize) {
    for s in STATS.iter().take(ncpu) {
        for c in s.exits.iter().chain([
            &s.fixed,
            &s.injected,
            &s.emulated,
            &s.zaps,
            &s.obligations,
            &s.ipis,
            &s.cpus_flushed,
            &s.mmu_calls,
        ]) {
            c.store(0, Ordering::Relaxed);
        }
    }
    for v in ROUND_TRIPS.iter().chain(PF_EXITS.iter()) {
        v.lock().clear();
    }
}

/// Samples kept per pCPU and figure (the first ones of the run).
const MAX_SAMPLES: usize = 8192;

/// TSC ticks of each MMU request round trip (door entered to reply
/// decoded), per pCPU. Under `-icount` a tick is one instruction.
static ROUND_TRIPS: [Mutex<Vec<u32>>; 64] = [const { Mutex::new(Vec::new()) }; 64];
/// TSC ticks of each forwarded #PF exit (exit to the next VMRUN), per pCPU.
static PF_EXITS: [Mutex<Vec<u32>>; 64] = [const { Mutex::new(Vec::new()) }; 64];

fn record(v: &Mutex<Vec<u32>>, ticks: u64) {
    let mut v = v.lock();
    if v.len() < MAX_SAMPLES {
        v.push(ticks.min(u32::MAX as u64) as u32);
    }
}

/// Records one MMU request round trip on `cpu`.
pub fn record_round_trip(cpu: usize, ticks: u64) {
    record(&ROUND_TRIPS[cpu], ticks);
}

/// Records one forwarded #PF exit on `cpu`.
pub fn record_pf_exit(cpu: usize, ticks: u64) {
    record(&PF_EXITS[cpu], ticks);
}

/// Which sampled figure.
#[derive(Clone, Copy, Debug)]
pub enum Figure {
    /// [`record_round_trip`].
    RoundTrip,
    /// [`record_pf_exit`].
    PfExit,
}

/// Samples, median and 99th percentile of a figure over all pCPUs.
pub fn percentiles(which: Figure) -> Option<(usize, u32, u32)> {
    let set = match which {
        Figure::RoundTrip => &ROUND_TRIPS,
        Figure::PfExit => &PF_EXITS,
    };
    let mut all: Vec<u32> = Vec::new();
    for v in set.iter() {
        all.extend_from_slice(&v.lock());
    }
    if all.is_empty() {
        return None;
    }
    all.sort_unstable();
    let at = |q: usize| all[((all.len() - 1) * q) / 100];
    Some((all.len(), at(50), at(99)))
}

/// Column heads of the server-counter table, one per [`server_row`] value
/// (the meaning of each is documented on [`ServerCounters`]).
pub const SERVER_HEADS: [&str; 17] = [
    "pf", "fixed", "inject", "fast", "sp-new", "sp-free", "sp-used", "sp-peak", "zaps", "reclm",
    "emreq", "emul", "unsync", "resync", "unshad", "flush", "fcpus",
];

/// The counters in [`SERVER_HEADS`] order.
pub fn server_row(c: &ServerCounters) -> [u64; 17] {
    [
        c.page_faults,
        c.faults_fixed,
        c.faults_injected,
        c.fast_path_fixes,
        c.shadow_pages_created,
        c.shadow_pages_freed,
        c.shadow_pages_in_use,
        c.shadow_pages_peak,
        c.zaps,
        c.reclaims,
        c.emulate_write_replies,
        c.emulated_writes,
        c.unsyncs,
        c.resyncs,
        c.unshadowed,
        c.flush_obligations,
        c.flush_cpus,
    ]
}

/// What the server answered to `GetCounters`: its counters, or the text to
/// print instead of numbers ("server does not report counters" when it
/// answered `Unsupported(GetCounters)`).
pub fn counters_of(reply: &MmuReply) -> Result<ServerCounters, String> {
    match reply {
        MmuReply::Counters { counters, .. } => Ok(*counters),
        MmuReply::Error {
            reason: MmuError::Unsupported(MmuRequest::GET_COUNTERS),
            ..
        } => Err(String::from("server does not report counters")),
        MmuReply::Error { reason, .. } => Err(format!("server refused GetCounters: {reason}")),
        other => Err(format!("unexpected reply to GetCounters: {other:?}")),
    }
}

/// One line of the server-counter table: `label`, then the numbers or the
/// reason there are none.
pub fn server_line(label: &str, counters: &Result<ServerCounters, String>) -> String {
    let mut line = format!("{label:<16}");
    match counters {
        Ok(c) => {
            for v in server_row(c) {
                let _ = write!(line, "{v:>8}");
            }
        }
        Err(why) => {
            let _ = write!(line, "  {why}");
        }
    }
    line
}

/// The header line of the server-counter table.
pub fn server_header() -> String {
    let mut line = format!("{:<16}", "workload");
    for h in SERVER_HEADS {
        let _ = write!(line, "{h:>8}");
    }
    line
}
