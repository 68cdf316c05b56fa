//! `cargo xtask bench`: the fast MMU servers against the reference, figure by
//! figure, in one run, ending with a summary table.
//!
//! A plain measured-loop harness (no bench framework: build time matters on
//! the project's 2-core machines). Each figure builds a fresh server over
//! fresh simulated memory (`mmu_server::sim`) and drives it as the kernel and
//! the hardware would: a small model walks the shadow tables the server hands
//! out, sends `PageFault` when the walk fails, and carries out the reply
//! (TLBs are not modelled: every access walks, which is what a flush-heavy
//! workload costs anyway). Servers are called through the `MmuServer` trait;
//! the wire codec is measured on its own.
//!
//! Every figure is measured in thread CPU time (the project's machines are
//! small and shared: wall time there measures the neighbours). The
//! multi-threaded throughput takes the CPU time of the slowest thread per
//! round: time spent spinning on a contended lock counts, time preempted
//! does not. Page faults go through `abi::dispatch` as encoded messages, as
//! the kernel sends them; the world switch itself is not modelled.

use abi::mmu::{MemRegion, MemoryMap};
use abi::{
    decode, encode, DomainId, Gfn, GuestCr3, Gva, Hpa, Mfn, MmuReply, MmuRequest, MmuServer,
    PcpuId, PfErrorCode, PhysMem, VcpuId, MAX_MESSAGE,
};
use cpu_time::ThreadTime;
use mmu_server::registry;
use mmu_server::sim::SimMem;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const P: u64 = 1;
const RW: u64 = 2;
const US: u64 = 4;
const PS: u64 = 1 << 7;
const ADDR: u64 = 0x000f_ffff_ffff_f000;
/// Guest frames start at this host frame.
const GUEST_BASE: u64 = 16;
const DOM: DomainId = DomainId(1);

/// The implementations compared (index 0 is "fast" in the summary, the
/// last the reference). `fast-dbit` is the fast server with shared roots
/// and hardware-D-bit dirty logging: only the dirty-log figure measures it
/// (elsewhere it is `fast-shared`).
const IMPLS: [&str; 4] = [
    registry::FAST_SHARED,
    registry::FAST_PERCPU,
    DBITS,
    "reference",
];
const DBITS: &str = registry::FAST_DBIT;
const REF: usize = 3;

/// `PhysMem` that counts frame allocations (shadow pages built).
struct Counting<'a> {
    mem: &'a SimMem,
    allocs: AtomicU64,
}

impl PhysMem for Counting<'_> {
    fn read_u64(&self, at: Hpa) -> Result<u64, abi::MemError> {
        self.mem.read_u64(at)
    }
    fn write_u64(&self, at: Hpa, value: u64) -> Result<(), abi::MemError> {
        self.mem.write_u64(at, value)
    }
    fn compare_exchange_u64(
        &self,
        at: Hpa,
        current: u64,
        new: u64,
    ) -> Result<Result<u64, u64>, abi::MemError> {
        self.mem.compare_exchange_u64(at, current, new)
    }
    fn zero_frame(&self, frame: Mfn) -> Result<(), abi::MemError> {
        self.mem.zero_frame(frame)
    }
    fn alloc_frame(&self) -> Option<Mfn> {
        self.allocs.fetch_add(1, Ordering::Relaxed);
        self.mem.alloc_frame()
    }
    fn free_frame(&self, frame: Mfn) -> Result<(), abi::MemError> {
        self.mem.free_frame(frame)
    }
}

/// Guest memory of `guest` frames followed by a pool of `pool` frames.
fn machine(guest: u64, pool: u64) -> SimMem {
    let frames = GUEST_BASE + guest + pool;
    SimMem::new(frames, GUEST_BASE + guest..frames)
}

/// The guest's side: a bump allocator of guest frames and direct writes of
/// its page tables (made before the guest runs, or on frames that are not
/// shadowed).
struct Builder<'a> {
    mem: &'a SimMem,
    next: u64,
    frames: u64,
}

impl Builder<'_> {
    fn alloc(&mut self) -> u64 {
        assert!(self.next < self.frames, "guest memory exhausted");
        self.next += 1;
        self.next - 1
    }
    fn hpa(&self, gpa: u64) -> Hpa {
        Hpa((GUEST_BASE << 12) + gpa)
    }
    fn read(&self, gpa: u64) -> u64 {
        self.mem.read_u64(self.hpa(gpa)).unwrap()
    }
    fn write(&self, gpa: u64, v: u64) {
        self.mem.write_u64(self.hpa(gpa), v).unwrap()
    }
    /// Maps `va` -> `gfn` (4 KiB, user RW) in the tables at `cr3`.
    fn map(&mut self, cr3: u64, va: u64, gfn: u64) {
        let mut table = cr3;
        for level in (2..=4u32).rev() {
            let ea = table + ((va >> (12 + 9 * (level - 1))) & 511) * 8;
            let e = self.read(ea);
            if e & P != 0 {
                table = e & ADDR;
                continue;
            }
            let t = self.alloc() << 12;
            self.write(ea, t | P | RW | US);
            table = t;
        }
        self.write(table + ((va >> 12) & 511) * 8, (gfn << 12) | P | RW | US);
    }
    fn space(&mut self) -> u64 {
        self.alloc() << 12
    }
}

/// The kernel and the hardware around one server.
struct Hw<'s> {
    server: &'s dyn MmuServer,
    mem: &'s SimMem,
    roots: Vec<AtomicU64>,
}

impl Hw<'_> {
    fn new<'s>(server: &'s dyn MmuServer, mem: &'s SimMem, guest: u64, vcpus: u32) -> Hw<'s> {
        let mut map = MemoryMap::new();
        map.push(MemRegion {
            gfn: Gfn(0),
            mfn: Mfn(GUEST_BASE),
            pages: guest,
        })
        .unwrap();
        ok(server.create_domain(DOM, &map));
        for v in 0..vcpus {
            ok(server.create_vcpu(DOM, VcpuId(v)));
        }
        Hw {
            server,
            mem,
            roots: (0..vcpus).map(|_| AtomicU64::new(0)).collect(),
        }
    }
    fn take_root(&self, v: u32, r: MmuReply) {
        match r {
            MmuReply::LoadShadowRoot { root, .. } => {
                self.roots[v as usize].store(root.0, Ordering::Relaxed)
            }
            other => panic!("expected LoadShadowRoot, got {other:?}"),
        }
    }
    fn schedule(&self, v: u32) {
        self.take_root(v, self.server.vcpu_scheduled(VcpuId(v), PcpuId(v)));
    }
    fn cr3(&self, v: u32, cr3: u64) {
        self.take_root(
            v,
            self.server.write_cr3(VcpuId(v), PcpuId(v), GuestCr3(cr3)),
        );
    }
    /// The hardware walk of the shadow tables: Ok(hpa) or Err(error code).
    fn walk(&self, v: u32, va: u64, write: bool) -> Result<Hpa, u32> {
        let mut t = self.roots[v as usize].load(Ordering::Relaxed) & ADDR;
        for level in (1..=4u32).rev() {
            let e = self
                .mem
                .read_u64(Hpa(t + ((va >> (12 + 9 * (level - 1))) & 511) * 8))
                .unwrap();
            if e & P == 0 {
                return Err(if write { 2 | 4 } else { 4 });
            }
            if level == 1 || e & PS != 0 {
                if write && e & RW == 0 {
                    return Err(1 | 2 | 4);
                }
                // The MMU sets A (and D for a write) in the shadow leaf.
                let at = Hpa(t + ((va >> (12 + 9 * (level - 1))) & 511) * 8);
                let want = if write { 0x60 } else { 0x20 };
                if e & want != want {
                    let _ = self.mem.compare_exchange_u64(at, e, e | want);
                }
                return Ok(Hpa((e & ADDR) + (va & 0xfff)));
            }
            t = e & ADDR;
        }
        unreachable!()
    }
    /// Sends `req` through `abi::dispatch` as encoded bytes, as the kernel
    /// does, and decodes the reply.
    fn call(&self, req: &MmuRequest) -> MmuReply {
        let mut inb = [0u8; MAX_MESSAGE];
        let mut out = [0u8; MAX_MESSAGE];
        let n = encode(req, &mut inb).unwrap();
        let m = abi::dispatch(self.server, &inb[..n], &mut out);
        decode(&out[..m]).unwrap()
    }

    /// One user access; returns the faults it took.
    fn access(&self, v: u32, va: u64, write: bool) -> u32 {
        for faults in 0..16 {
            match self.walk(v, va, write) {
                Ok(hpa) => {
                    if write {
                        self.mem.write_u64(hpa, va).unwrap();
                    } else {
                        black_box(self.mem.read_u64(hpa).unwrap());
                    }
                    return faults;
                }
                Err(ec) => {
                    // The kernel's path: the request and the reply cross
                    // the wire encoded.
                    let r = self.call(&MmuRequest::PageFault {
                        vcpu: VcpuId(v),
                        pcpu: PcpuId(v),
                        gva: Gva(va),
                        error_code: PfErrorCode(ec),
                    });
                    match r {
                        MmuReply::Resume { .. } => {}
                        MmuReply::LoadShadowRoot { .. } => self.take_root(v, r),
                        MmuReply::EmulateWrite { gpa, .. } => {
                            ok(self.server.emulated_write(VcpuId(v), PcpuId(v), gpa, va, 8));
                            return faults + 1;
                        }
                        other => panic!("access {va:#x}: {other:?}"),
                    }
                }
            }
        }
        panic!("access {va:#x} makes no progress")
    }
    fn get_and_clear_all(&self) -> usize {
        let mut start = Gfn(0);
        let mut dirty = 0;
        loop {
            match self.server.get_and_clear_dirty(DOM, start) {
                MmuReply::DirtyBitmap { chunk, .. } => {
                    dirty += chunk.dirty().count();
                    match chunk.next {
                        Some(n) => start = n,
                        None => return dirty,
                    }
                }
                other => panic!("GetAndClearDirty: {other:?}"),
            }
        }
    }
}

fn ok(r: MmuReply) {
    assert!(
        !matches!(r, MmuReply::Error { .. }),
        "request failed: {r:?}"
    );
}

fn server<'m>(name: &str, mem: &'m dyn PhysMem) -> Box<dyn MmuServer + 'm> {
    registry::create(name, mem).expect("registered implementation")
}

const USER: u64 = 0x4000_0000;

/// Dirty-logging rounds: the guest writes `pages` pages after each
/// get-and-clear. Returns the mean time per round.
fn dirty_rounds(name: &str, pages: u64, rounds: u32) -> Duration {
    let guest = pages + pages / 256 + 64;
    let sim = machine(guest, pages / 256 + 256);
    let srv = server(name, &sim);
    let hw = Hw::new(&*srv, &sim, guest, 1);
    let mut b = Builder {
        mem: &sim,
        next: 0,
        frames: guest,
    };
    let cr3 = b.space();
    let data: Vec<u64> = (0..pages).map(|_| b.alloc()).collect();
    for (i, &g) in data.iter().enumerate() {
        b.map(cr3, USER + ((i as u64) << 12), g);
    }
    hw.schedule(0);
    hw.cr3(0, cr3);
    for i in 0..pages {
        hw.access(0, USER + (i << 12), true);
    }
    ok(srv.enable_dirty_log(DOM));
    let mut total = Duration::ZERO;
    for r in 0..=rounds {
        let t = ThreadTime::now();
        let n = hw.get_and_clear_all();
        for i in 0..pages {
            hw.access(0, USER + (i << 12), true);
        }
        if r > 0 {
            assert_eq!(n as u64, pages, "{name}: every written page is dirty");
            total += t.elapsed();
        }
    }
    total / rounds
}

/// Zap-all latency with `n` shadow page tables live.
fn zap_latency(name: &str, n: u64) -> Duration {
    // n L1 tables, one page mapped in each (all to one data frame).
    let guest = n + n / 512 + 16;
    let sim = machine(guest, n + n / 256 + 64);
    let srv = server(name, &sim);
    let hw = Hw::new(&*srv, &sim, guest, 1);
    let mut b = Builder {
        mem: &sim,
        next: 0,
        frames: guest,
    };
    let cr3 = b.space();
    let data = b.alloc();
    for i in 0..n {
        b.map(cr3, USER + (i << 21), data);
    }
    hw.schedule(0);
    hw.cr3(0, cr3);
    for i in 0..n {
        hw.access(0, USER + (i << 21), false);
    }
    let t = ThreadTime::now();
    ok(srv.zap_all(DOM));
    t.elapsed()
}

/// CR3 switching among 64 processes of `pages` pages each: (time per
/// switch including touching the pages, shadow frames allocated per switch).
fn cr3_switching(name: &str, procs: u64, pages: u64, rounds: u32) -> (Duration, f64) {
    let guest = procs * (pages + 8) + 16;
    let sim = machine(guest, procs * 8 + 256);
    let mem = Counting {
        mem: &sim,
        allocs: AtomicU64::new(0),
    };
    let srv = server(name, &mem);
    let hw = Hw::new(&*srv, &sim, guest, 1);
    let mut b = Builder {
        mem: &sim,
        next: 0,
        frames: guest,
    };
    let spaces: Vec<u64> = (0..procs)
        .map(|_| {
            let cr3 = b.space();
            for i in 0..pages {
                let g = b.alloc();
                b.map(cr3, USER + (i << 12), g);
            }
            cr3
        })
        .collect();
    hw.schedule(0);
    let round = || {
        for &cr3 in &spaces {
            hw.cr3(0, cr3);
            for i in 0..pages {
                hw.access(0, USER + (i << 12), i % 2 == 0);
            }
        }
    };
    round();
    let a0 = mem.allocs.load(Ordering::Relaxed);
    let t = ThreadTime::now();
    for _ in 0..rounds {
        round();
    }
    let switches = (procs * rounds as u64) as u32;
    let built = (mem.allocs.load(Ordering::Relaxed) - a0) as f64 / switches as f64;
    (t.elapsed() / switches, built)
}

/// Write faults on dirty-logged pages per second, `threads` vCPUs on one
/// domain (one host thread each, one address space, disjoint pages).
fn fault_throughput(name: &str, threads: u32, pages: u64, rounds: u32) -> f64 {
    let total = pages * threads as u64;
    let guest = total + total / 256 + 64;
    let sim = machine(guest, total / 256 + 256);
    let srv = server(name, &sim);
    let hw = Hw::new(&*srv, &sim, guest, threads);
    let mut b = Builder {
        mem: &sim,
        next: 0,
        frames: guest,
    };
    let cr3 = b.space();
    for i in 0..total {
        let g = b.alloc();
        b.map(cr3, USER + (i << 12), g);
    }
    for v in 0..threads {
        hw.schedule(v);
        hw.cr3(v, cr3);
    }
    for i in 0..total {
        hw.access((i / pages) as u32, USER + (i << 12), true);
    }
    ok(srv.enable_dirty_log(DOM));
    let mut faults = 0u64;
    let mut busy = Duration::ZERO;
    for _ in 0..rounds {
        hw.get_and_clear_all();
        // Each thread measures its own CPU time; the round takes as long as
        // the slowest thread (spinning on a contended lock counts, being
        // preempted by the machine's other tenants does not).
        let (n, slowest) = std::thread::scope(|s| {
            let hs: Vec<_> = (0..threads)
                .map(|v| {
                    let hw = &hw;
                    s.spawn(move || {
                        let t = ThreadTime::now();
                        let base = v as u64 * pages;
                        let n = (0..pages)
                            .map(|i| u64::from(hw.access(v, USER + ((base + i) << 12), true)))
                            .sum::<u64>();
                        (n, t.elapsed())
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap())
                .fold((0, Duration::ZERO), |(n, m), (k, d)| (n + k, m.max(d)))
        });
        busy += slowest;
        faults += n;
    }
    faults as f64 / busy.as_secs_f64()
}

/// Encode + decode of one message, alone (to see where codec time goes).
fn codec_one<T: serde::Serialize + serde::de::DeserializeOwned>(msg: &T, iters: u32) -> Duration {
    let mut buf = [0u8; MAX_MESSAGE];
    let t = ThreadTime::now();
    for _ in 0..iters {
        let n = encode(black_box(msg), &mut buf).unwrap();
        let r: T = decode(black_box(&buf[..n])).unwrap();
        black_box(r);
    }
    t.elapsed() / iters
}

/// Encode + decode of a page-fault request and of its reply.
fn codec_round_trip(iters: u32) -> Duration {
    let req = MmuRequest::PageFault {
        vcpu: VcpuId(3),
        pcpu: PcpuId(5),
        gva: Gva(0x7fff_dead_b000),
        error_code: PfErrorCode(7),
    };
    let rep = MmuReply::Resume { flush: None };
    let mut buf = [0u8; MAX_MESSAGE];
    let t = ThreadTime::now();
    for _ in 0..iters {
        let n = encode(black_box(&req), &mut buf).unwrap();
        let r: MmuRequest = decode(black_box(&buf[..n])).unwrap();
        black_box(r);
        let n = encode(black_box(&rep), &mut buf).unwrap();
        let r: MmuReply = decode(black_box(&buf[..n])).unwrap();
        black_box(r);
    }
    t.elapsed() / iters
}

/// One encoded page fault through `dispatch` to a server and back, on a
/// page that is already mapped writable (the shortest server path).
fn dispatch_round_trip(name: &str, iters: u32) -> Duration {
    let guest = 64;
    let sim = machine(guest, 64);
    let srv = server(name, &sim);
    let hw = Hw::new(&*srv, &sim, guest, 1);
    let mut b = Builder {
        mem: &sim,
        next: 0,
        frames: guest,
    };
    let cr3 = b.space();
    let g = b.alloc();
    b.map(cr3, USER, g);
    hw.schedule(0);
    hw.cr3(0, cr3);
    hw.access(0, USER, true);
    let req = MmuRequest::PageFault {
        vcpu: VcpuId(0),
        pcpu: PcpuId(0),
        gva: Gva(USER),
        error_code: PfErrorCode(7),
    };
    let mut inb = [0u8; MAX_MESSAGE];
    let mut out = [0u8; MAX_MESSAGE];
    let t = ThreadTime::now();
    for _ in 0..iters {
        let n = encode(&req, &mut inb).unwrap();
        let m = abi::dispatch(&*srv, &inb[..n], &mut out);
        let r: MmuReply = decode(&out[..m]).unwrap();
        black_box(r);
    }
    t.elapsed() / iters
}

fn us(d: Duration) -> String {
    format!("{:.1} us", d.as_secs_f64() * 1e6)
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn main() {
    // `cargo bench` passes `--bench`; `--quick` scales the workloads down,
    // `--only FIGURE` (dirty, zap, cr3, faults, codec) runs one figure.
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let only = args
        .iter()
        .position(|a| a == "--only")
        .map(|i| args.get(i + 1).cloned().unwrap_or_default());
    const FIGURES: [&str; 5] = ["dirty", "zap", "cr3", "faults", "codec"];
    if let Some(o) = only.as_deref().filter(|o| !FIGURES.contains(o)) {
        eprintln!("bench: --only takes one of {FIGURES:?}, not {o:?}");
        std::process::exit(2);
    }
    let want = |figure: &str| only.as_deref().is_none_or(|o| o == figure);
    let scale = if quick { 4 } else { 1 };
    let mut summary: Vec<String> = Vec::new();
    fn line(
        summary: &mut Vec<String>,
        figure: &str,
        fast: f64,
        reference: f64,
        unit: &str,
        lower_is_better: bool,
    ) {
        let ratio = if lower_is_better {
            reference / fast.max(1e-12)
        } else {
            fast / reference.max(1e-12)
        };
        summary.push(format!(
            "{figure}: fast {fast:.3}{unit} vs reference {reference:.3}{unit} = {ratio:.2}x"
        ));
    }

    if want("dirty") {
        println!(
            "# dirty-logging rounds ({} pages written per round)",
            8192 / scale
        );
        let mut dl = Vec::new();
        for name in IMPLS {
            let t = dirty_rounds(name, 8192 / scale, 5);
            println!("{name:>12}: {} per round", ms(t));
            dl.push(t);
        }
        line(
            &mut summary,
            "dirty-log round, write-protect + lockless fault (ms)",
            dl[0].as_secs_f64() * 1e3,
            dl[REF].as_secs_f64() * 1e3,
            " ms",
            true,
        );
        // The best registered server at this figure (every one but the
        // reference is a candidate).
        let (best, t) = IMPLS
            .iter()
            .zip(&dl)
            .take(REF)
            .min_by_key(|(_, t)| **t)
            .expect("fast servers measured");
        line(
            &mut summary,
            &format!("dirty-log round, best registered server `{best}` (ms)"),
            t.as_secs_f64() * 1e3,
            dl[REF].as_secs_f64() * 1e3,
            " ms",
            true,
        );
    }

    if want("zap") {
        println!("# zap-all latency");
        let sizes: &[u64] = if quick {
            &[1_000, 10_000]
        } else {
            &[1_000, 10_000, 100_000]
        };
        let mut zl: Vec<Vec<Duration>> = Vec::new();
        for name in IMPLS.into_iter().filter(|n| *n != DBITS) {
            let mut row = Vec::new();
            for &n in sizes {
                let t = zap_latency(name, n);
                println!("{name:>12}: {n:>6} shadow pages: {}", us(t));
                row.push(t);
            }
            zl.push(row);
        }
        for (i, &n) in sizes.iter().enumerate() {
            line(
                &mut summary,
                &format!("zap-all at {n} shadow pages (us)"),
                zl[0][i].as_secs_f64() * 1e6,
                zl[2][i].as_secs_f64() * 1e6,
                " us",
                true,
            );
        }
        let growth = |row: &Vec<Duration>| {
            row.last().unwrap().as_secs_f64() / row[0].as_secs_f64().max(1e-12)
        };
        println!(
            "zap-all growth {}..{}: fast-shared {:.2}x, fast-percpu {:.2}x, reference {:.2}x",
            sizes[0],
            sizes.last().unwrap(),
            growth(&zl[0]),
            growth(&zl[1]),
            growth(&zl[2])
        );
    }

    if want("cr3") {
        println!("# CR3 switching among 64 processes (8 pages each)");
        let mut cs = Vec::new();
        for name in IMPLS.into_iter().filter(|n| *n != DBITS) {
            let (t, built) = cr3_switching(name, 64, 8, 20 / scale as u32);
            println!(
                "{name:>12}: {} per switch, {built:.2} shadow pages built per switch",
                us(t)
            );
            cs.push((t, built));
        }
        for (i, figure) in [
            "CR3 switch + 8 touches (us)",
            "CR3 switch, per-pCPU L4 (us)",
        ]
        .into_iter()
        .enumerate()
        {
            let (fast, reference) = (cs[i].0, cs[2].0);
            let us = |t: Duration| t.as_secs_f64() * 1e6;
            line(&mut summary, figure, us(fast), us(reference), " us", true);
        }
        summary.push(format!(
            "shadow pages rebuilt per CR3 switch: fast {:.2} (per-pCPU {:.2}) vs reference {:.2}",
            cs[0].1, cs[1].1, cs[2].1
        ));
    }

    if want("faults") {
        println!("# page-fault throughput (dirty-logging write faults, one domain, per CPU-second of the slowest thread)");
        for threads in [1u32, 2, 4, 8] {
            let mut tp = Vec::new();
            // (fast-dbit takes no fault on these writes at all.)
            for name in IMPLS.into_iter().filter(|n| *n != DBITS) {
                let f = fault_throughput(name, threads, 2048 / scale, 4);
                println!("{name:>12}: {threads} threads: {:.0} faults/s", f);
                tp.push(f);
            }
            line(
                &mut summary,
                &format!("fault throughput, {threads} threads (kfaults/s)"),
                tp[0] / 1e3,
                tp[2] / 1e3,
                "k",
                false,
            );
        }
    }

    if want("codec") {
        println!("# encode + decode round trip");
        let c = codec_round_trip(1_000_000 / scale as u32);
        let req = MmuRequest::PageFault {
            vcpu: VcpuId(3),
            pcpu: PcpuId(5),
            gva: Gva(0x7fff_dead_b000),
            error_code: PfErrorCode(7),
        };
        let rq = codec_one(&req, 1_000_000 / scale as u32);
        let rp = codec_one(&MmuReply::Resume { flush: None }, 1_000_000 / scale as u32);
        println!(
            "codec parts: PageFault request {:.1} ns, Resume reply {:.1} ns (sizes: MmuRequest {} B, MmuReply {} B in memory)",
            rq.as_secs_f64() * 1e9,
            rp.as_secs_f64() * 1e9,
            std::mem::size_of::<MmuRequest>(),
            std::mem::size_of::<MmuReply>()
        );
        println!(
            "codec (PageFault request + Resume reply): {:.1} ns",
            c.as_secs_f64() * 1e9
        );
        let mut dr = Vec::new();
        for name in IMPLS.into_iter().filter(|n| *n != DBITS) {
            let d = dispatch_round_trip(name, 200_000 / scale as u32);
            println!(
                "{name:>12}: encoded fault through dispatch and back: {:.1} ns",
                d.as_secs_f64() * 1e9
            );
            dr.push(d);
        }
        line(
            &mut summary,
            "codec round trip (ns, same abi code)",
            c.as_secs_f64() * 1e9,
            c.as_secs_f64() * 1e9,
            " ns",
            true,
        );
        line(
            &mut summary,
            "dispatch round trip, mapped page (ns)",
            dr[0].as_secs_f64() * 1e9,
            dr[2].as_secs_f64() * 1e9,
            " ns",
            true,
        );
    }

    println!();
    println!("# summary (ratio = how many times better fast is)");
    for l in &summary {
        println!("{l}");
    }
}
