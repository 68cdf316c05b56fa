//! The guest workloads: small 64-bit guest kernels that each exercise one
//! shadow-paging path, check their own results and report by hypercall.
//!
//! They run inside guests (see `rt`): only guest memory, no kernel statics.

use crate::rt::*;
use crate::split;
use abi::guest::{hc, pte, WORK_BASE};
use abi::sched::DEFAULT_WEIGHT;
use core::sync::atomic::Ordering;

/// One workload: its name, vCPU count, guest memory, and the entry.
pub struct Workload {
    /// Name in the report.
    pub name: &'static str,
    /// vCPUs (vCPU i's home pCPU is (first_pcpu + i) % pCPUs: where it
    /// always runs under the in-kernel loop and `pinned`, the placement
    /// hint for other scheduler policies).
    pub vcpus: u32,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// Where its vCPU 0 runs.
    pub first_pcpu: u32,
    /// The guest's code.
    pub run: fn(u64) -> !,
    /// True when the workload ends by a deliberate triple fault after its
    /// report (the hostile guest): the kernel must stop it and go on.
    pub ends_in_shutdown: bool,
    /// True when the kernel zaps the domain on its own clock while it runs.
    pub kernel_zaps: bool,
    /// The scheduler weights of its vCPUs (`1..=abi::sched::MAX_WEIGHT`),
    /// repeated over the vCPUs: vCPU `i` has `weights[i % len]` (see
    /// [`Workload::weight`]). Empty: every vCPU has
    /// `abi::sched::DEFAULT_WEIGHT` (equal weights).
    pub weights: &'static [u16],
    /// True when the workload is meant for a scheduler policy: more vCPUs
    /// than pCPUs kept runnable for a fixed window, so its run time depends
    /// on time slicing. A run without a scheduler server may leave it out
    /// (it would pass, but slowly, and slow every workload beside it).
    pub needs_scheduler: bool,
    /// The partner of a split-driver pair (frontend or backend): its index
    /// in [`WORKLOADS`]. The loader names the partner's domain in
    /// `DomainInfo::peer`; the two start together.
    pub peer: Option<usize>,
    /// True for the split-driver workloads (grant tables): they run only
    /// in grant runs, and grant runs run only them.
    pub grant: bool,
}

impl Workload {
    /// vCPU `vcpu`'s scheduler weight (see [`Workload::weights`]).
    pub fn weight(&self, vcpu: u32) -> u32 {
        match self.weights.len() {
            0 => DEFAULT_WEIGHT,
            n => u32::from(self.weights[vcpu as usize % n]).max(1),
        }
    }
}

/// Every workload, in report order.
pub const WORKLOADS: &[Workload] = &[
    Workload {
        name: "demand-64M",
        vcpus: 1,
        mem_mib: 72,
        first_pcpu: 1,
        run: demand64,
        ends_in_shutdown: false,
        kernel_zaps: true,
        weights: &[],
        needs_scheduler: false,
        peer: None,
        grant: false,
    },
    Workload {
        name: "linux-32M",
        vcpus: 1,
        mem_mib: 40,
        first_pcpu: 4,
        run: linux32,
        ends_in_shutdown: false,
        kernel_zaps: false,
        weights: &[],
        needs_scheduler: false,
        peer: None,
        grant: false,
    },
    Workload {
        name: "procs-16",
        vcpus: 1,
        mem_mib: 8,
        first_pcpu: 2,
        run: procs16,
        ends_in_shutdown: false,
        kernel_zaps: false,
        weights: &[],
        needs_scheduler: false,
        peer: None,
        grant: false,
    },
    Workload {
        name: "downgrade",
        vcpus: 4,
        mem_mib: 8,
        first_pcpu: 4,
        run: downgrade,
        ends_in_shutdown: false,
        kernel_zaps: false,
        weights: &[],
        needs_scheduler: false,
        peer: None,
        grant: false,
    },
    Workload {
        name: "unmap-reuse",
        vcpus: 1,
        mem_mib: 8,
        first_pcpu: 3,
        run: unmap_reuse,
        ends_in_shutdown: false,
        kernel_zaps: false,
        weights: &[],
        needs_scheduler: false,
        peer: None,
        grant: false,
    },
    Workload {
        name: "touch-16M",
        vcpus: 1,
        mem_mib: 24,
        first_pcpu: 3,
        run: touch16,
        ends_in_shutdown: false,
        kernel_zaps: false,
        weights: &[],
        needs_scheduler: false,
        peer: None,
        grant: false,
    },
    Workload {
        name: "wp-toggle",
        vcpus: 1,
        mem_mib: 4,
        first_pcpu: 2,
        run: wp_toggle,
        ends_in_shutdown: false,
        kernel_zaps: false,
        weights: &[],
        needs_scheduler: false,
        peer: None,
        grant: false,
    },
    Workload {
        name: "huge-2M",
        vcpus: 1,
        mem_mib: 16,
        first_pcpu: 5,
        run: huge2m,
        ends_in_shutdown: false,
        kernel_zaps: false,
        weights: &[],
        needs_scheduler: false,
        peer: None,
        grant: false,
    },
    Workload {
        name: "dirty-log",
        vcpus: 1,
        mem_mib: 8,
        first_pcpu: 6,
        run: dirty_log,
        ends_in_shutdown: false,
        kernel_zaps: false,
        weights: &[],
        needs_scheduler: false,
        peer: None,
        grant: false,
    },
    Workload {
        name: "zap-all",
        vcpus: 1,
        mem_mib: 8,
        first_pcpu: 7,
        run: zap_all,
        ends_in_shutdown: false,
        kernel_zaps: false,
        weights: &[],
        needs_scheduler: false,
        peer: None,
        grant: false,
    },
    Workload {
        name: "smp-8",
        vcpus: 8,
        mem_mib: 16,
        first_pcpu: 0,
        run: smp8,
        ends_in_shutdown: false,
        kernel_zaps: true,
        weights: &[],
        needs_scheduler: false,
        peer: None,
        grant: false,
    },
    Workload {
        name: "hostile",
        vcpus: 1,
        mem_mib: 4,
        first_pcpu: 0,
        run: hostile,
        ends_in_shutdown: true,
        kernel_zaps: false,
        weights: &[],
        needs_scheduler: false,
        peer: None,
        grant: false,
    },
    Workload {
        name: "platform",
        vcpus: 1,
        mem_mib: 4,
        first_pcpu: 5,
        run: crate::platform::platform,
        ends_in_shutdown: false,
        kernel_zaps: false,
        weights: &[],
        needs_scheduler: false,
        peer: None,
        grant: false,
    },
    Workload {
        name: "fair-24",
        vcpus: 24,
        mem_mib: 8,
        first_pcpu: 0,
        run: spin_window,
        ends_in_shutdown: false,
        kernel_zaps: false,
        weights: &[],
        needs_scheduler: true,
        peer: None,
        grant: false,
    },
    Workload {
        name: "weighted-12",
        vcpus: 12,
        mem_mib: 8,
        first_pcpu: 0,
        run: spin_window,
        ends_in_shutdown: false,
        kernel_zaps: false,
        // 1x, 2x, 4x the default weight: vCPUs 0, 3, 6, 9 at 1x; 1, 4, 7,
        // 10 at 2x; 2, 5, 8, 11 at 4x.
        weights: &[
            DEFAULT_WEIGHT as u16,
            2 * DEFAULT_WEIGHT as u16,
            4 * DEFAULT_WEIGHT as u16,
        ],
        needs_scheduler: true,
        peer: None,
        grant: false,
    },
    split_driver("blk-front", 0, split::blk_front, BLK_BACK),
    split_driver("blk-back", 2, split::blk_back, BLK_FRONT),
    split_driver("net-front", 4, split::net_front, NET_BACK),
    split_driver("net-back", 6, split::net_back, NET_FRONT),
];

/// Indices of the split-driver workloads in [`WORKLOADS`] (checked below).
const BLK_FRONT: usize = 15;
const BLK_BACK: usize = 16;
const NET_FRONT: usize = 17;
const NET_BACK: usize = 18;

/// A split-driver workload: two vCPUs from `first_pcpu` on, 8 MiB, run
/// only in grant runs, partnered with `WORKLOADS[peer]`.
const fn split_driver(
    name: &'static str,
    first_pcpu: u32,
    run: fn(u64) -> !,
    peer: usize,
) -> Workload {
    Workload {
        name,
        vcpus: 2,
        mem_mib: 8,
        first_pcpu,
        run,
        ends_in_shutdown: false,
        kernel_zaps: false,
        weights: &[],
        needs_scheduler: false,
        peer: Some(peer),
        grant: true,
    }
}

const fn same_name(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

// The split-driver indices name the right workloads; partners name each
// other, are both grant workloads with as many vCPUs (vCPU i talks to
// vCPU i); workloads outside grant runs have no partner.
const _: () = {
    assert!(same_name(WORKLOADS[BLK_FRONT].name, "blk-front"));
    assert!(same_name(WORKLOADS[BLK_BACK].name, "blk-back"));
    assert!(same_name(WORKLOADS[NET_FRONT].name, "net-front"));
    assert!(same_name(WORKLOADS[NET_BACK].name, "net-back"));
    let mut i = 0;
    while i < WORKLOADS.len() {
        let w = &WORKLOADS[i];
        match w.peer {
            Some(p) => {
                let q = &WORKLOADS[p];
                assert!(p != i && w.grant && q.grant && w.vcpus == q.vcpus);
                assert!(matches!(q.peer, Some(back) if back == i));
            }
            None => assert!(!w.grant),
        }
        i += 1;
    }
};

// Every scheduler workload fits the spin count slots; every weight is at
// least 1 (a weight of 0 would be refused by the scheduler).
const _: () = {
    let mut i = 0;
    while i < WORKLOADS.len() {
        let w = &WORKLOADS[i];
        assert!(!w.needs_scheduler || w.vcpus as usize <= 32 - SPIN_COUNTS);
        let mut j = 0;
        while j < w.weights.len() {
            assert!(w.weights[j] >= 1);
            j += 1;
        }
        i += 1;
    }
};

/// The entry every vCPU starts at: RDI = its VcpuInfo gva, then the
/// workload's own function.
pub extern "C" fn guest_main(_vcpu_info: u64) -> ! {
    let d = domain();
    let w = &WORKLOADS[d.workload as usize];
    vcpu().cur_l4 = d.l4_gpa;
    (w.run)(vcpu().index)
}

fn pattern(a: u64, b: u64) -> u64 {
    (a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.rotate_left(17)) | 1
}

/// Guest-level demand paging over 64 MiB: every page of the region is first
/// touched unmapped, the guest's #PF handler maps it, and every value is
/// checked afterwards. The handler writes PTEs without A and D (as a
/// simple kernel does).
fn demand64(_: u64) -> ! {
    demand("demand-64M", 64 * 256, 0)
}

/// Linux-like demand paging over 32 MiB: as [`demand64`], but the handler
/// writes each PTE with A and D already set, as Linux's protection maps do
/// for a present PTE and its anonymous write fault does for D. A server
/// that prefetches from such an entry on the emulated PTE write can make
/// the retried access exit-free: the floor of two exits per demand fault
/// under shadow paging (the injected #PF, the emulated PTE write).
fn linux32(_: u64) -> ! {
    demand("linux-32M", 32 * 256, pte::A | pte::D)
}

/// Demand paging of `pages` pages with PTE bits `flags` added by the
/// handler; the touch loop is the measured phase (one guest demand fault
/// per page).
fn demand(name: &str, pages: u64, flags: u64) -> ! {
    let v = vcpu();
    v.demand_lo = WORK_BASE;
    v.demand_hi = WORK_BASE + pages * 4096;
    v.demand_pte_flags = flags;
    hypercall(hc::PHASE_BEGIN, 0, 0, 0);
    for i in 0..pages {
        let a = WORK_BASE + i * 4096 + (i % 512) * 8;
        // SAFETY: the demand region is mapped on first touch by the handler.
        unsafe { (a as *mut u64).write_volatile(pattern(i, 1)) };
    }
    hypercall(hc::PHASE_END, v.demand_fixed, 0, 0);
    for i in 0..pages {
        let a = WORK_BASE + i * 4096 + (i % 512) * 8;
        // SAFETY: mapped above.
        let got = unsafe { (a as *const u64).read_volatile() };
        if got != pattern(i, 1) {
            fail("demand: wrong value at", a);
        }
    }
    if v.demand_fixed != pages {
        fail("demand: demand faults != pages:", v.demand_fixed);
    }
    puts(name);
    puts(": ");
    putdec(pages);
    puts(" pages faulted in and checked\n");
    finish(true, pages)
}

/// Shadow demand paging: 16 MiB the guest maps itself (present PTEs), then
/// touches once per page: every touch is a shadow miss the server fixes.
/// The guest prints the exits the touch phase took per page.
fn touch16(_: u64) -> ! {
    const PAGES: u64 = 16 * 256;
    let l4 = domain().l4_gpa;
    let Some(base) = domain().alloc(PAGES * 4096, 4096) else {
        fail("touch-16M: no memory", 0)
    };
    for p in 0..PAGES {
        map4k(l4, WORK_BASE + p * 4096, base + p * 4096, pte::W);
    }
    hypercall(hc::PHASE_BEGIN, 0, 0, 0);
    for p in 0..PAGES {
        // SAFETY: mapped above.
        unsafe { ((WORK_BASE + p * 4096 + 32) as *mut u64).write_volatile(pattern(p, 3)) };
    }
    hypercall(hc::PHASE_END, PAGES, 0, 0);
    for p in 0..PAGES {
        if rd(base + p * 4096 + 32) != pattern(p, 3) {
            fail("touch-16M: direct map disagrees at page", p);
        }
    }
    puts("touch-16M: 4096 first touches of mapped pages checked\n");
    finish(true, PAGES)
}

/// CR0.WP toggling: a supervisor write to a read-only page faults with
/// CR0.WP=1 and succeeds with CR0.WP=0; every toggle is a paging-mode change
/// the server must apply to the shadows it already built.
fn wp_toggle(_: u64) -> ! {
    const WP: u64 = 1 << 16;
    let l4 = domain().l4_gpa;
    let cr0 = read_cr0();
    if cr0 & WP == 0 {
        fail("wp-toggle: CR0.WP is off at start, CR0", cr0);
    }
    for round in 0..8u64 {
        let gva = WORK_BASE + (round % 3) * 4096;
        let page = alloc_page();
        map4k(l4, gva, page, 0);
        invlpg(gva);
        if probe_write(gva, 1).is_ok() {
            fail(
                "wp-toggle: write to a read-only page with CR0.WP=1 did not fault, round",
                round,
            );
        }
        write_cr0(cr0 & !WP);
        if read_cr0() & WP != 0 {
            fail("wp-toggle: CR0.WP did not clear", read_cr0());
        }
        if probe_write(gva, pattern(round, 4)).is_err() {
            fail(
                "wp-toggle: supervisor write with CR0.WP=0 faulted, round",
                round,
            );
        }
        if rd(page) != pattern(round, 4) {
            fail(
                "wp-toggle: the write with CR0.WP=0 did not land, round",
                round,
            );
        }
        write_cr0(cr0);
        if probe_write(gva, 2).is_ok() {
            fail(
                "wp-toggle: write after setting CR0.WP again did not fault, round",
                round,
            );
        }
        if rd(page) != pattern(round, 4) {
            fail("wp-toggle: a faulting write changed memory, round", round);
        }
    }
    puts("wp-toggle: 8 rounds of CR0.WP off/on, read-only page honoured\n");
    finish(true, 8)
}

/// 16 processes (address spaces) sharing the kernel half, each with private
/// pages at the same addresses; many rounds of CR3 switches.
fn procs16(_: u64) -> ! {
    const PROCS: usize = 16;
    const PAGES: u64 = 4;
    let boot = domain().l4_gpa;
    let mut l4s = [0u64; PROCS];
    for (p, l4) in l4s.iter_mut().enumerate() {
        *l4 = alloc_page();
        for i in 0..512 {
            let e = rd(boot + i * 8);
            if e & pte::P != 0 && i != crate::rt::index(WORK_BASE, 4) {
                wr(*l4 + i * 8, e);
            }
        }
        for j in 0..PAGES {
            let page = alloc_page();
            map4k(*l4, WORK_BASE + j * 4096, page, pte::W);
            if j == 0 {
                wr(page, pattern(p as u64, 0));
            }
        }
    }
    for round in 1..=24u64 {
        for (p, &l4) in l4s.iter().enumerate() {
            write_cr3(l4);
            if read_cr3() != l4 {
                fail("procs-16: CR3 read back wrong:", read_cr3());
            }
            for j in 0..PAGES {
                let a = (WORK_BASE + j * 4096) as *mut u64;
                // SAFETY: every process maps these pages.
                let got = unsafe { a.read_volatile() };
                let want = if j == 0 {
                    pattern(p as u64, round - 1)
                } else if round == 1 {
                    0
                } else {
                    round - 1
                };
                if got != want {
                    puts("procs-16: proc ");
                    puthex(p as u64);
                    puts(" page ");
                    puthex(j);
                    puts(" read ");
                    puthex(got);
                    puts(" want ");
                    puthex(want);
                    puts("\n");
                    fail("procs-16: a process saw wrong data, round", round);
                }
                // SAFETY: as above.
                unsafe {
                    a.write_volatile(if j == 0 {
                        pattern(p as u64, round)
                    } else {
                        round
                    })
                };
            }
        }
    }
    write_cr3(boot);
    puts("procs-16: 16 address spaces x 24 rounds isolated\n");
    finish(true, 16 * 24)
}

/// vCPU 0 write-protects a shared page and INVLPGs; the other vCPUs, told by
/// a flag, INVLPG too; from then on every vCPU's write must fault while reads
/// still work. Several rounds.
fn downgrade(me: u64) -> ! {
    const ROUNDS: u64 = 6;
    let d = domain();
    let n = d.vcpus;
    let l4 = d.l4_gpa;
    for round in 0..ROUNDS {
        let gva = WORK_BASE + round * 4096;
        if me == 0 {
            pt_lock();
            let page = alloc_page();
            map4k(l4, gva, page, pte::W);
            pt_unlock();
            d.shared[0].store(round + 1, Ordering::Release); // mapped
        }
        wait_for(0, round + 1);
        if probe_write(gva + me * 8, pattern(me, round)).is_err() {
            fail("downgrade: write before downgrade faulted, vcpu", me);
        }
        barrier(1, round + 1);
        if me == 0 {
            let e = pte_gpa(l4, gva);
            wr(e, rd(e) & !pte::W);
            invlpg(gva);
            d.shared[2].store(round + 1, Ordering::Release); // downgraded
        }
        wait_for(2, round + 1);
        invlpg(gva);
        let before = vcpu().faults;
        if probe_write(gva + me * 8, 0xBAD).is_ok() {
            fail(
                "downgrade: write after downgrade+INVLPG did not fault, vcpu",
                me,
            );
        }
        if vcpu().faults != before + 1 || vcpu().last_fault_err & 3 != 3 {
            fail(
                "downgrade: expected a write protection fault, err",
                vcpu().last_fault_err,
            );
        }
        for k in 0..n {
            match probe_read(gva + k * 8) {
                Ok(v) if v == pattern(k, round) => {}
                _ => fail("downgrade: read after downgrade wrong, slot", k),
            }
        }
        barrier(3, round + 1);
    }
    if me != 0 {
        exit(0)
    }
    puts("downgrade: write-protect + INVLPG seen by all vCPUs in every round\n");
    finish(true, ROUNDS * n)
}

/// Map, write, unmap (INVLPG), check the fault, remap the same frame
/// elsewhere, and reuse a small pool of frames round after round.
fn unmap_reuse(_: u64) -> ! {
    const POOL: usize = 8;
    let l4 = domain().l4_gpa;
    let mut pool = [0u64; POOL];
    for f in pool.iter_mut() {
        *f = alloc_page();
    }
    for round in 0..96u64 {
        let frame = pool[(round as usize) % POOL];
        let x = WORK_BASE + 0x10_0000 + (round % 5) * 4096;
        let y = WORK_BASE + 0x20_0000 + (round % 7) * 4096;
        map4k(l4, x, frame, pte::W);
        if probe_write(x, pattern(round, 7)).is_err() {
            fail("unmap-reuse: mapped write faulted at", x);
        }
        let e = pte_gpa(l4, x);
        wr(e, 0);
        invlpg(x);
        if probe_read(x).is_ok() {
            fail("unmap-reuse: read after unmap+INVLPG did not fault at", x);
        }
        map4k(l4, y, frame, pte::W);
        invlpg(y);
        match probe_read(y) {
            Ok(v) if v == pattern(round, 7) => {}
            _ => fail("unmap-reuse: frame remapped elsewhere reads wrong at", y),
        }
        let other = pool[(round as usize + 1) % POOL];
        wr(other, round);
        map4k(l4, x, other, pte::W);
        match probe_read(x) {
            Ok(v) if v == round => {}
            _ => fail("unmap-reuse: reused address reads old frame at", x),
        }
        wr(pte_gpa(l4, y), 0);
        invlpg(y);
        wr(pte_gpa(l4, x), 0);
        invlpg(x);
    }
    puts("unmap-reuse: 96 rounds of unmap, fault, remap, reuse\n");
    finish(true, 96)
}

/// 2 MiB pages: map four, write every 4 KiB inside, check through the direct
/// map, then replace one by a 4 KiB table mapping its frames in reverse.
fn huge2m(_: u64) -> ! {
    const HUGE: u64 = 4;
    let l4 = domain().l4_gpa;
    let Some(base) = domain().alloc(HUGE << 21, 1 << 21) else {
        fail("huge-2M: no 2 MiB memory", 0)
    };
    for h in 0..HUGE {
        let e = entry_gpa(l4, WORK_BASE + (h << 21), 2);
        wr(e, (base + (h << 21)) | pte::P | pte::W | pte::PS);
    }
    for p in 0..HUGE * 512 {
        let a = (WORK_BASE + p * 4096 + 8) as *mut u64;
        // SAFETY: mapped by the 2 MiB entries above.
        unsafe { a.write_volatile(pattern(p, 2)) };
    }
    for p in 0..HUGE * 512 {
        if rd(base + p * 4096 + 8) != pattern(p, 2) {
            fail("huge-2M: direct map disagrees at page", p);
        }
    }
    // Split huge page 1 into a reversed 4 KiB table.
    let pt = alloc_page();
    for j in 0..512 {
        wr(
            pt + j * 8,
            (base + (1 << 21) + (511 - j) * 4096) | pte::P | pte::W,
        );
    }
    let e = entry_gpa(l4, WORK_BASE + (1 << 21), 2);
    wr(e, pt | pte::P | pte::W);
    invlpg(WORK_BASE + (1 << 21));
    for j in 0..512 {
        let a = (WORK_BASE + (1 << 21) + j * 4096 + 8) as *const u64;
        // SAFETY: mapped by the new table.
        let got = unsafe { a.read_volatile() };
        if got != pattern(512 + 511 - j, 2) {
            fail("huge-2M: split page reads wrong frame at", j);
        }
    }
    puts("huge-2M: 4 huge pages written, checked, one split in reverse\n");
    finish(true, HUGE)
}

/// Dirty logging: in each round the guest writes a random subset of its
/// pages and asks the kernel to compare its own record with the server's
/// dirty bitmap.
fn dirty_log(_: u64) -> ! {
    const PAGES: u64 = 256;
    let l4 = domain().l4_gpa;
    let Some(base) = domain().alloc(PAGES * 4096, 4096) else {
        fail("dirty-log: no memory", 0)
    };
    let record = alloc_page();
    for p in 0..PAGES {
        map4k(l4, WORK_BASE + p * 4096, base + p * 4096, pte::W);
        wr(base + p * 4096, 0);
    }
    let mut rng = Rng(0x1234_5678_9ABC_DEF1);
    let mut missing_total = 0;
    for _round in 0..8 {
        hypercall(hc::DIRTY_START, 0, 0, 0);
        for w in 0..PAGES / 64 {
            wr(record + w * 8, 0);
        }
        for p in 0..PAGES {
            if rng.next_u64().is_multiple_of(3) {
                let a = (WORK_BASE + p * 4096 + 16) as *mut u64;
                // SAFETY: mapped above.
                unsafe { a.write_volatile(p) };
                let w = record + (p / 64) * 8;
                wr(w, rd(w) | 1 << (p % 64));
            }
        }
        missing_total += hypercall(hc::DIRTY_CHECK, record, base >> 12, PAGES);
    }
    if missing_total != 0 {
        fail("dirty-log: pages written but not logged:", missing_total);
    }
    puts("dirty-log: 8 rounds, every written page logged\n");
    finish(true, 8)
}

/// Data written before a zap-all must read back after it, twice.
fn zap_all(_: u64) -> ! {
    const PAGES: u64 = 512;
    let l4 = domain().l4_gpa;
    for p in 0..PAGES {
        let page = alloc_page();
        map4k(l4, WORK_BASE + p * 4096, page, pte::W);
    }
    for round in 0..3u64 {
        for p in 0..PAGES {
            let a = (WORK_BASE + p * 4096 + 24) as *mut u64;
            // SAFETY: mapped above.
            unsafe { a.write_volatile(pattern(p, round)) };
        }
        hypercall(hc::ZAP_ALL, 0, 0, 0);
        for p in 0..PAGES {
            let a = (WORK_BASE + p * 4096 + 24) as *const u64;
            // SAFETY: mapped above.
            if unsafe { a.read_volatile() } != pattern(p, round) {
                fail("zap-all: data lost across a zap, page", p);
            }
        }
    }
    puts("zap-all: 3 zaps mid-run, all data intact\n");
    finish(true, 3)
}

/// Eight vCPUs sharing one L4: each demand-faults its own slice, then they
/// count together with atomics and check each other's slices.
fn smp8(me: u64) -> ! {
    const SLICE: u64 = 64 * 4096;
    let d = domain();
    let n = d.vcpus;
    let v = vcpu();
    v.demand_lo = WORK_BASE;
    v.demand_hi = WORK_BASE + n * SLICE;
    let mine = WORK_BASE + me * SLICE;
    for p in 0..SLICE / 4096 {
        // SAFETY: the demand region is mapped on first touch.
        unsafe { ((mine + p * 4096) as *mut u64).write_volatile(pattern(me, p)) };
    }
    for _ in 0..500 {
        d.shared[4].fetch_add(1, Ordering::AcqRel);
    }
    barrier(5, 1);
    if d.shared[4].load(Ordering::Acquire) != 500 * n {
        fail(
            "smp-8: shared counter wrong:",
            d.shared[4].load(Ordering::Acquire),
        );
    }
    for k in 0..n {
        for p in 0..SLICE / 4096 {
            // SAFETY: every slice was faulted in before the barrier.
            let got = unsafe { ((WORK_BASE + k * SLICE + p * 4096) as *const u64).read_volatile() };
            if got != pattern(k, p) {
                fail("smp-8: slice of another vCPU reads wrong, vcpu", k);
            }
        }
    }
    barrier(6, 1);
    if me != 0 {
        exit(0)
    }
    puts("smp-8: 8 vCPUs on one L4: demand faults, atomics, cross-checks\n");
    finish(true, n)
}

/// A hostile guest: page tables pointing outside its memory, reserved bits,
/// and tables that loop on themselves. Every access outside must fault; the
/// loop must read back the guest's own tables. Then it triple-faults on
/// purpose; the kernel must stop it and go on.
fn hostile(_: u64) -> ! {
    let d = domain();
    let l4 = d.l4_gpa;
    let mem = d.mem_bytes;
    let outside = [
        mem,
        mem + (1 << 30),
        0x000F_FFFF_FFFF_F000,
        0x0000_00FF_0000_0000,
    ];
    for (i, &gpa) in outside.iter().enumerate() {
        let gva = WORK_BASE + (i as u64) * 4096;
        map4k(l4, gva, gpa, pte::W);
        if probe_read(gva).is_ok() || probe_write(gva, 1).is_ok() {
            fail(
                "hostile: access outside guest memory did not fault, gpa",
                gpa,
            );
        }
    }
    // A 2 MiB page beyond memory, and one with a reserved bit set.
    let e = entry_gpa(l4, WORK_BASE + (8 << 21), 2);
    wr(
        e,
        ((mem + (2 << 20)) & !((2 << 20) - 1)) | pte::P | pte::W | pte::PS,
    );
    if probe_read(WORK_BASE + (8 << 21)).is_ok() {
        fail("hostile: 2 MiB page outside memory did not fault", mem);
    }
    let gva = WORK_BASE + 0x40_0000;
    map4k(l4, gva, alloc_page() | (1 << 51), pte::W);
    if probe_read(gva).is_ok() || vcpu().last_fault_err & 8 == 0 {
        fail(
            "hostile: reserved bit did not give an RSVD fault, err",
            vcpu().last_fault_err,
        );
    }
    // Self-referencing L4 (slot 3): walking it four times lands on the L4
    // itself, so that address must read the L4's own first entry.
    wr(l4 + 3 * 8, l4 | pte::P | pte::W);
    let selfref = (3u64 << 39) | (3 << 30) | (3 << 21) | (3 << 12);
    match probe_read(selfref) {
        Ok(v) if v == rd(l4) => {}
        Ok(v) => fail("hostile: self-map read something else:", v),
        Err(_) => fail("hostile: self-map faulted, err", vcpu().last_fault_err),
    }
    // A PD whose entry points back at the PDPT above it: a loop of tables.
    let pd_e = entry_gpa(l4, WORK_BASE + (1 << 30), 2);
    let pdpt_e = entry_gpa(l4, WORK_BASE + (1 << 30), 3);
    wr(pd_e, (rd(pdpt_e) & pte::ADDR) | pte::P | pte::W);
    let _ = probe_read(WORK_BASE + (1 << 30));
    puts("hostile: every access outside memory faulted; now triple-faulting\n");
    hypercall(hc::REPORT, 1, 0, 0);
    // Deliberate triple fault: an empty IDT, then a fault.
    let empty_idt = [0u16; 5];
    // SAFETY: this ends the guest; that is the point.
    unsafe { core::arch::asm!("lidt [{}]", "ud2", in(reg) empty_idt.as_ptr(), options(noreturn)) }
}

/// How long each vCPU of a scheduler workload stays runnable.
const SPIN_WINDOW_MS: u64 = 1_500;
/// Fewer iterations than this in a whole window: the vCPU barely ran.
const SPIN_MIN_ITERATIONS: u64 = 1_000;
/// `shared` slot counting the vCPUs that finished their window.
const SPIN_DONE: usize = 0;
/// `shared` slot with the longest TSC gap any vCPU saw between two
/// iterations (time it was not running).
const SPIN_GAP: usize = 1;
/// `shared` slot counting the vCPUs that reached the start barrier.
const SPIN_ARRIVED: usize = 2;
/// `shared` slot holding the common deadline (TSC), 0 until set.
const SPIN_DEADLINE: usize = 3;
/// First `shared` slot of the per-vCPU iteration counts (one per vCPU).
const SPIN_COUNTS: usize = 8;

/// CPU-bound vCPUs for the scheduler (`fair-24`, `weighted-12`): once every
/// vCPU has reached a start barrier (waiting there yields, so any scheduler
/// gets them all there), all spin on the TSC until one common deadline
/// [`SPIN_WINDOW_MS`] later, counting iterations, so all stay runnable
/// through the same window and the CPU time a vCPU got in it shows in its
/// count (the kernel measures the shares inside the window it is told of
/// with `PHASE_BEGIN`; the guest prints its own view). vCPU 0 waits for all, checks that each
/// did its work (at least [`SPIN_MIN_ITERATIONS`]) and prints the counts
/// and the longest gap a vCPU saw (its longest wait while runnable).
fn spin_window(me: u64) -> ! {
    let d = domain();
    let n = d.vcpus;
    let name = WORKLOADS[d.workload as usize].name;
    if n > (d.shared.len() - SPIN_COUNTS) as u64 {
        fail("spin: more vCPUs than count slots:", n);
    }
    let per_ms = tsc_per_ms();
    // One common window: every vCPU waits (yielding) at a barrier; the
    // last to arrive opens the window and tells the kernel (PHASE_BEGIN
    // with its length), so the kernel can count each vCPU's CPU time
    // inside it: the window over which fairness and shares are judged.
    if d.shared[SPIN_ARRIVED].fetch_add(1, Ordering::AcqRel) + 1 == n {
        let deadline = rdtsc() + SPIN_WINDOW_MS * per_ms;
        hypercall(hc::PHASE_BEGIN, SPIN_WINDOW_MS * 1000, 0, 0);
        d.shared[SPIN_DEADLINE].store(deadline, Ordering::Release);
    }
    while d.shared[SPIN_DEADLINE].load(Ordering::Acquire) == 0 {
        yield_now();
    }
    let deadline = d.shared[SPIN_DEADLINE].load(Ordering::Acquire);
    let start = rdtsc();
    let (mut iterations, mut last, mut gap) = (0u64, start, 0u64);
    loop {
        let now = rdtsc();
        iterations += 1;
        // The TSC may step back a little after a migration (per-pCPU
        // offsets); only forward gaps count.
        gap = gap.max(now.saturating_sub(last));
        last = now;
        if now >= deadline {
            break;
        }
    }
    d.shared[SPIN_COUNTS + me as usize].store(iterations, Ordering::Release);
    d.shared[SPIN_GAP].fetch_max(gap, Ordering::AcqRel);
    d.shared[SPIN_DONE].fetch_add(1, Ordering::AcqRel);
    if me != 0 {
        exit(0)
    }
    wait_for(SPIN_DONE, n);
    let (mut min, mut max, mut total) = (u64::MAX, 0u64, 0u64);
    puts(name);
    puts(": iterations per vCPU:");
    for k in 0..n as usize {
        let c = d.shared[SPIN_COUNTS + k].load(Ordering::Acquire);
        puts(" ");
        putdec(c);
        (min, max, total) = (min.min(c), max.max(c), total.saturating_add(c));
    }
    puts("\n");
    for k in 0..n as usize {
        if d.shared[SPIN_COUNTS + k].load(Ordering::Acquire) < SPIN_MIN_ITERATIONS {
            fail("spin: a vCPU barely ran in its window, vcpu", k as u64);
        }
    }
    puts(name);
    puts(": ");
    putdec(n);
    puts(" vCPUs runnable ");
    putdec(SPIN_WINDOW_MS);
    puts(" ms each; iterations min ");
    putdec(min);
    puts(" max ");
    putdec(max);
    puts("; longest gap ");
    putdec(d.shared[SPIN_GAP].load(Ordering::Acquire) * 1000 / per_ms);
    puts(" us\n");
    finish(true, total)
}
