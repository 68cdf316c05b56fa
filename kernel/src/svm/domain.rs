//! A domain: one guest with its own contiguous guest-physical memory, loaded
//! like a bootloader would: a private copy of the image (the guest kernels,
//! crate `guests`, are code in it, mapped at the same addresses), page tables in guest memory
//! (image + a 2 MiB-page direct map of all guest memory), GDT, IDT with the
//! guest's #PF gate, and per-vCPU info blocks and stacks.

use super::host;
use super::platform::{Devices, GuestControl, ModeError};
use abi::guest::{self as gl, pte, DomainInfo, VcpuInfo};
use abi::DomainId;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use spin::Mutex;

/// The mode a vCPU starts in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootMode {
    /// 64-bit long mode on the loader's page tables (Umbra's own guests).
    Long,
    /// 32-bit protected mode with paging off, EAX and EBX as a Multiboot
    /// loader leaves them (an unmodified Multiboot kernel).
    Multiboot {
        /// The bootloader magic.
        eax: u32,
        /// The Multiboot info's gpa.
        ebx: u32,
    },
}

impl BootMode {
    /// The CR0, CR4 and EFER a vCPU starting in this mode reads back (the
    /// hardware values follow from them).
    pub const fn control(&self) -> GuestControl {
        match self {
            BootMode::Long => GuestControl::LONG_MODE_BOOT,
            BootMode::Multiboot { .. } => GuestControl::MULTIBOOT_ENTRY,
        }
    }

    /// The guest CR3 it starts with: the loader's L4, or 0 with paging off.
    pub const fn cr3(&self) -> u64 {
        match self {
            BootMode::Long => gl::L4_GPA,
            BootMode::Multiboot { .. } => 0,
        }
    }
}

/// An unmodified Multiboot v1 kernel to run as a domain: its file, its
/// command line and its modules (the image takes them from the boot
/// modules).
#[derive(Clone, Copy, Debug)]
pub struct MultibootGuest {
    /// The kernel file (ELF32, ELF64 or a.out kludge).
    pub image: &'static [u8],
    /// Its command line.
    pub cmdline: &'static str,
    /// Its modules, in order.
    pub modules: &'static [mboot::Module<'static>],
}

/// Where a vCPU starts: its registers as the loader set them.
#[derive(Clone, Copy, Debug)]
pub struct VcpuBoot {
    /// The mode it starts in.
    pub mode: BootMode,
    /// Entry point.
    pub rip: u64,
    /// Stack top.
    pub rsp: u64,
    /// First argument (the VcpuInfo gva).
    pub rdi: u64,
    /// GS base (the VcpuInfo gva).
    pub gs_base: u64,
}

/// [`Domain::exit_status`] before any write to the exit port.
pub const NO_EXIT_STATUS: u64 = u64::MAX;

/// What the kernel needs to load and run one guest (what a workload means
/// and how its verdict is read is the image's business, not the kernel's).
#[derive(Clone, Copy, Debug)]
pub struct DomainSpec {
    /// Name in reports.
    pub name: &'static str,
    /// vCPUs (vCPU i runs on pCPU (first_pcpu + i) % pCPUs).
    pub vcpus: u32,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// Where its vCPU 0 runs.
    pub first_pcpu: u32,
    /// The kernel zaps the domain on its own clock while it runs.
    pub kernel_zaps: bool,
    /// Where every vCPU starts (an address in the image, which each guest
    /// gets a private copy of at the same addresses).
    pub entry: u64,
    /// The guest's #PF handler (installed in its IDT).
    pub pf_entry: u64,
    /// Scheduler weights of its vCPUs, cycled (empty: the default weight).
    pub weights: &'static [u16],
    /// Written to the guest's `DomainInfo::workload`.
    pub index: u64,
    /// The partner of a split-driver pair: the index of its spec in the
    /// run's list (its domain is `DomainId(peer + 1)`), written to the
    /// guest's `DomainInfo::peer`.
    pub peer: Option<u32>,
    /// An unmodified Multiboot kernel to load instead of one of Umbra's own
    /// guests (`entry`, `pf_entry` and `index` are then unused; one vCPU).
    pub multiboot: Option<&'static MultibootGuest>,
}

impl DomainSpec {
    /// The one domain of an unmodified Multiboot guest `guest`: one vCPU
    /// on pCPU 0, `mem_mib` of memory, no kernel zaps.
    pub const fn unmodified(guest: &'static MultibootGuest, mem_mib: u64) -> DomainSpec {
        DomainSpec {
            name: "multiboot",
            vcpus: 1,
            mem_mib,
            first_pcpu: 0,
            kernel_zaps: false,
            entry: 0,
            pf_entry: 0,
            weights: &[],
            index: 0,
            peer: None,
            multiboot: Some(guest),
        }
    }
}

/// A guest and everything the kernel knows about it.
pub struct Domain {
    /// Its id on the wire.
    pub id: DomainId,
    /// What it was loaded from.
    pub spec: DomainSpec,
    /// Host-physical base of its (contiguous) guest memory; gpa 0 is here.
    pub mem_pa: u64,
    /// Bytes of guest memory.
    pub mem_bytes: u64,
    /// Its ASID (1..=15: TCG offers 16).
    pub asid: u32,
    /// Wire id of its vCPU 0 (vCPU i is first_vcpu + i).
    pub first_vcpu: u32,
    /// pCPUs its vCPUs are pinned to.
    pub pcpus: u64,
    /// Set when the domain was stopped (shutdown, unhandled exit, failure).
    pub stopped: AtomicBool,
    /// Why it was stopped.
    pub stop_reason: Mutex<Option<(&'static str, u64)>>,
    /// 0: no report yet, 1: reported pass, 2: reported fail.
    pub reported: AtomicU8,
    /// The detail word of the report.
    pub detail: AtomicU64,
    /// vCPUs that ended through the exit port with code 0.
    pub exited_ok: AtomicU32,
    /// vCPUs that ended any other way.
    pub exited_bad: AtomicU32,
    /// The last 32-bit value written to the exit port (isa-debug-exit), or
    /// [`NO_EXIT_STATUS`]: what a run of an unmodified guest exits with.
    pub exit_status: AtomicU64,
    /// Its emulated devices (COM1, PIC masks, fw_cfg, the shutdown port).
    pub devices: Mutex<Devices>,
    /// Dirty logging is on.
    pub dirty_on: AtomicBool,
    /// Bumped on every `AllReloadRoots` obligation: a vCPU whose root is
    /// older asks for a new one before it next runs.
    pub root_gen: AtomicU64,
    /// Shootdown IPIs caused by this domain's obligations.
    pub shootdown_ipis: AtomicU64,
    /// Exits taken by the domain's vCPUs.
    pub exits: AtomicU64,
    /// Dirty pages logged but not written (extra, harmless).
    pub dirty_extra: AtomicU64,
    /// #PF exits.
    pub pf_exits: AtomicU64,
    /// #PF exits the server fixed (Resume).
    pub fixed: AtomicU64,
    /// #PF exits turned into an injected guest #PF.
    pub injected: AtomicU64,
    /// Page-table writes emulated.
    pub emulated: AtomicU64,
    /// Zaps of this domain (its own hypercalls and the kernel's timer zaps).
    pub zaps: AtomicU64,
    /// vCPUs that have ended (any way).
    pub ended: AtomicU32,
    /// Serializes emulated writes (read-modify-write emulation).
    pub emul_lock: Mutex<()>,
    /// Dirty pages harvested from the server's log since the guest's last
    /// round started, one bit per gfn (the kernel harvests on its own clock
    /// too, while the guest writes).
    pub harvest: Mutex<alloc::vec::Vec<u64>>,
    /// Harvests the kernel made on its own clock.
    pub harvests: AtomicU64,
    /// Paging-mode changes (CR0.WP / CR4.PGE writes) sent to the server.
    pub mode_changes: AtomicU64,
    /// Exits by report bucket (`exit::BUCKETS`).
    pub exits_by: [AtomicU64; super::exit::BUCKETS],
    /// Flush obligations carried out for it.
    pub obligations: AtomicU64,
    /// pCPUs told to flush for it (the local one included).
    pub cpus_flushed: AtomicU64,
    /// Flush obligations of `VcpuScheduled` right after a migration.
    pub migration_flushes: AtomicU64,
    /// The measurement window the guest announced with `PHASE_BEGIN`
    /// (TSC; `window_end` 0: none): the scheduler counts each vCPU's CPU
    /// time inside it.
    pub window: AtomicU64,
    /// The end of the window.
    pub window_end: AtomicU64,
    /// The exit count at the guest's `PHASE_BEGIN`.
    pub phase_begin: AtomicU64,
    /// Exits strictly between `PHASE_BEGIN` and `PHASE_END` (0: no phase).
    pub phase_exits: AtomicU64,
    /// Faults the guest counted in its phase (`PHASE_END`'s argument).
    pub phase_faults: AtomicU64,
    /// Grant hypercalls it made.
    pub grant_calls: AtomicU64,
    /// Of those, calls (or unmap entries) the grant server refused.
    pub grant_errors: AtomicU64,
    /// Flush obligations of grant replies carried out for its calls.
    pub grant_obligations: AtomicU64,
    /// Shootdown IPIs those obligations sent.
    pub grant_ipis: AtomicU64,
    /// pCPUs those obligations flushed (the local one included).
    pub grant_cpus_flushed: AtomicU64,
    /// Bytes the kernel copied for its grant copies.
    pub grant_copied: AtomicU64,
    /// Accesses outside RAM emulated as MMIO (the local APIC, or no
    /// device).
    pub mmio: AtomicU64,
}

impl Domain {
    /// A domain's kernel record, every counter zero, not yet run.
    fn new(
        id: DomainId,
        spec: DomainSpec,
        mem_pa: u64,
        mem_bytes: u64,
        asid: u32,
        first_vcpu: u32,
        pcpus: u64,
    ) -> Domain {
        Domain {
            id,
            spec,
            mem_pa,
            mem_bytes,
            asid,
            first_vcpu,
            pcpus,
            stopped: AtomicBool::new(false),
            stop_reason: Mutex::new(None),
            reported: AtomicU8::new(0),
            detail: AtomicU64::new(0),
            exited_ok: AtomicU32::new(0),
            exited_bad: AtomicU32::new(0),
            dirty_on: AtomicBool::new(false),
            root_gen: AtomicU64::new(0),
            shootdown_ipis: AtomicU64::new(0),
            exits: AtomicU64::new(0),
            dirty_extra: AtomicU64::new(0),
            pf_exits: AtomicU64::new(0),
            fixed: AtomicU64::new(0),
            injected: AtomicU64::new(0),
            emulated: AtomicU64::new(0),
            zaps: AtomicU64::new(0),
            ended: AtomicU32::new(0),
            emul_lock: Mutex::new(()),
            harvest: Mutex::new(alloc::vec![0; (mem_bytes / 4096).div_ceil(64) as usize]),
            harvests: AtomicU64::new(0),
            mode_changes: AtomicU64::new(0),
            exits_by: [const { AtomicU64::new(0) }; super::exit::BUCKETS],
            obligations: AtomicU64::new(0),
            cpus_flushed: AtomicU64::new(0),
            migration_flushes: AtomicU64::new(0),
            window: AtomicU64::new(0),
            window_end: AtomicU64::new(0),
            phase_begin: AtomicU64::new(0),
            phase_exits: AtomicU64::new(0),
            phase_faults: AtomicU64::new(0),
            grant_calls: AtomicU64::new(0),
            grant_errors: AtomicU64::new(0),
            grant_obligations: AtomicU64::new(0),
            grant_ipis: AtomicU64::new(0),
            grant_cpus_flushed: AtomicU64::new(0),
            grant_copied: AtomicU64::new(0),
            exit_status: AtomicU64::new(NO_EXIT_STATUS),
            devices: Mutex::new(Devices::new(mem_bytes)),
            mmio: AtomicU64::new(0),
        }
    }

    /// Host pointer to guest-physical `gpa`, if `len` bytes from it are inside
    /// guest memory.
    pub fn gpa_ptr(&self, gpa: u64, len: u64) -> Option<*mut u8> {
        let end = gpa.checked_add(len)?;
        if end > self.mem_bytes {
            return None;
        }
        Some(host::va(self.mem_pa + gpa))
    }

    /// Reads a u64 of guest memory (None outside it).
    pub fn read_u64(&self, gpa: u64) -> Option<u64> {
        let p = self.gpa_ptr(gpa, 8)?;
        // SAFETY: in guest memory (checked); the guest may be writing it
        // concurrently, so read volatile (a torn value only harms the guest).
        Some(unsafe { p.cast::<u64>().read_volatile() })
    }

    /// The paging mode the MMU server gets for a vCPU of this domain in
    /// guest state `ctl`: an unmodified guest's accesses outside its RAM
    /// are MMIO (its local APIC); Umbra's own guests keep getting a #PF
    /// for them.
    pub fn server_mode(&self, ctl: &GuestControl) -> Result<abi::PagingMode, ModeError> {
        let mode = ctl.paging_mode()?;
        Ok(match self.spec.multiboot {
            Some(_) => abi::PagingMode(mode.0 | abi::PagingMode::MMIO),
            None => mode,
        })
    }

    /// Writes a u64 of guest memory; false outside it.
    pub fn write_u64(&self, gpa: u64, v: u64) -> bool {
        let Some(p) = self.gpa_ptr(gpa, 8) else {
            return false;
        };
        // SAFETY: in guest memory (checked); the guest may race the write,
        // which only harms the guest. Volatile: the guest reads it.
        unsafe { p.cast::<u64>().write_volatile(v) };
        true
    }

    /// Host-physical range `[hpa, hpa + len)` lies in this domain's memory.
    pub fn holds(&self, hpa: u64, len: u64) -> bool {
        hpa >= self.mem_pa
            && hpa
                .checked_add(len)
                .is_some_and(|end| end <= self.mem_pa + self.mem_bytes)
    }

    /// Stops the domain with a reason (first reason wins).
    pub fn stop(&self, why: &'static str, value: u64) {
        let mut r = self.stop_reason.lock();
        if r.is_none() {
            *r = Some((why, value));
        }
        self.stopped.store(true, Ordering::Release);
    }

    /// Walks the guest's own page tables (4-level, read-only: no A/D
    /// updates) for `gva` under guest CR3 `cr3`; the gpa, or None if not
    /// mapped or the tables leave guest memory.
    pub fn guest_translate(&self, cr3: u64, gva: u64) -> Option<u64> {
        let mut table = cr3 & pte::ADDR;
        for level in (1..=4u32).rev() {
            let idx = (gva >> (12 + 9 * (level - 1))) & 511;
            let e = self.read_u64(table + idx * 8)?;
            if e & pte::P == 0 {
                return None;
            }
            let size_bits = 12 + 9 * (level - 1);
            if level == 1 || (level <= 3 && e & pte::PS != 0) {
                let base = e & pte::ADDR & !((1u64 << size_bits) - 1);
                return Some(base | (gva & ((1u64 << size_bits) - 1)));
            }
            table = e & pte::ADDR;
        }
        None
    }

    /// The gpa of guest-linear `gva`: through the guest's page tables at
    /// `cr3` when its paging is on (`Some`), else the address itself.
    pub fn translate_linear(&self, cr3: Option<u64>, gva: u64) -> Option<u64> {
        match cr3 {
            Some(cr3) => self.guest_translate(cr3, gva),
            None => Some(gva),
        }
    }

    /// Reads up to `buf.len()` bytes of guest-linear memory (see
    /// [`Domain::translate_linear`]); returns how many could be read.
    pub fn read_linear(&self, cr3: Option<u64>, gva: u64, buf: &mut [u8]) -> usize {
        for (i, b) in buf.iter_mut().enumerate() {
            let Some(gpa) = self.translate_linear(cr3, gva.wrapping_add(i as u64)) else {
                return i;
            };
            let Some(p) = self.gpa_ptr(gpa, 1) else {
                return i;
            };
            // SAFETY: inside guest memory (checked by gpa_ptr).
            *b = unsafe { p.read_volatile() };
        }
        buf.len()
    }
}

/// Builds guest memory page by page.
struct Loader {
    pa: u64,
    bytes: u64,
    next: u64,
}

impl Loader {
    fn w64(&self, gpa: u64, v: u64) {
        assert!(
            gpa + 8 <= self.bytes,
            "loader write at gpa {gpa:#x} outside guest memory"
        );
        // SAFETY: inside the zeroed guest memory this loader owns.
        unsafe { host::va(self.pa + gpa).cast::<u64>().write(v) }
    }
    fn r64(&self, gpa: u64) -> u64 {
        assert!(
            gpa + 8 <= self.bytes,
            "loader read at gpa {gpa:#x} outside guest memory"
        );
        // SAFETY: as w64.
        unsafe { host::va(self.pa + gpa).cast::<u64>().read() }
    }
    fn page(&mut self) -> u64 {
        let g = self.next;
        self.next += 4096;
        assert!(
            self.next <= self.bytes,
            "guest memory too small for the loader"
        );
        g
    }
    /// Maps gva -> gpa with a leaf at `level` (1: 4 KiB, 2: 2 MiB).
    fn map(&mut self, gva: u64, gpa: u64, flags: u64, level: u32) {
        let mut table = gl::L4_GPA;
        for l in (level + 1..=4).rev() {
            let e = table + ((gva >> (12 + 9 * (l - 1))) & 511) * 8;
            let mut v = self.r64(e);
            if v & pte::P == 0 {
                v = self.page() | pte::P | pte::W;
                self.w64(e, v);
            }
            table = v & pte::ADDR;
        }
        let e = table + ((gva >> (12 + 9 * (level - 1))) & 511) * 8;
        let leaf = if level > 1 { pte::PS } else { 0 };
        self.w64(e, gpa | flags | leaf | pte::P);
    }
}

/// Creates a domain's memory and loads it. Returns the domain and each
/// vCPU's starting registers.
pub fn load(
    id: DomainId,
    spec: DomainSpec,
    first_vcpu: u32,
    asid: u32,
    pcpus: u64,
) -> Result<(Domain, alloc::vec::Vec<VcpuBoot>), &'static str> {
    let bytes = spec.mem_mib << 20;
    let pa = host::alloc_zeroed(bytes / 4096)?;
    if let Some(mb) = spec.multiboot {
        return match load_multiboot(mb, pa, bytes) {
            Ok(boot) => Ok((
                Domain::new(id, spec, pa, bytes, asid, first_vcpu, pcpus),
                alloc::vec![boot],
            )),
            Err(e) => {
                crate::kprintln!("svm: the Multiboot kernel cannot be loaded: {e}");
                host::free(pa, bytes / 4096);
                Err("the Multiboot kernel cannot be loaded")
            }
        };
    }
    let mut ld = Loader {
        pa,
        bytes,
        next: gl::LOADER_ALLOC_GPA,
    };

    // The image copy, mapped at the addresses the kernel runs it at.
    let (img_start, img_end) = host::image_span();
    let img_bytes = img_end - img_start;
    let img_gpa = bytes - img_bytes - 4096;
    // SAFETY: source is the loaded image (identity-mapped, readable);
    // destination is guest memory inside the allocation.
    unsafe {
        core::ptr::copy_nonoverlapping(
            img_start as *const u8,
            host::va(pa + img_gpa),
            img_bytes as usize,
        )
    };
    for off in (0..img_bytes).step_by(4096) {
        ld.map(img_start + off, img_gpa + off, pte::W, 1);
    }
    // The direct map: all guest memory with 2 MiB pages.
    for off in (0..bytes).step_by(2 << 20) {
        ld.map(gl::DIRECT_BASE + off, off, pte::W | pte::NX, 2);
    }
    // GDT: null, 64-bit code (0x08), data (0x10).
    ld.w64(gl::GDT_GPA + 8, 0x00AF_9A00_0000_FFFF);
    ld.w64(gl::GDT_GPA + 16, 0x00CF_9200_0000_FFFF);
    // IDT: the #PF gate (interrupt gate, present, DPL 0, selector 0x08).
    let h = spec.pf_entry;
    let lo = (h & 0xFFFF) | 0x08 << 16 | 0x8E00 << 32 | ((h >> 16) & 0xFFFF) << 48;
    ld.w64(gl::IDT_GPA + 14 * 16, lo);
    ld.w64(gl::IDT_GPA + 14 * 16 + 8, h >> 32);

    // Per-vCPU info and stacks.
    let mut boots = alloc::vec::Vec::new();
    for v in 0..spec.vcpus as u64 {
        let info = ld.page();
        let stack_lo = ld.next;
        for _ in 0..gl::STACK_BYTES / 4096 {
            ld.page();
        }
        let info_gva = gl::DIRECT_BASE + info;
        // SAFETY: the info page is inside guest memory, zeroed, unshared yet.
        let vi = unsafe { &mut *host::va(pa + info).cast::<VcpuInfo>() };
        vi.self_gva = info_gva;
        vi.index = v;
        vi.domain_gva = gl::DIRECT_BASE + gl::DOMAIN_INFO_GPA;
        vi.cur_l4 = gl::L4_GPA;
        boots.push(VcpuBoot {
            mode: BootMode::Long,
            rip: spec.entry,
            rsp: gl::DIRECT_BASE + stack_lo + gl::STACK_BYTES - 8,
            rdi: info_gva,
            gs_base: info_gva,
        });
    }
    // SAFETY: gpa 0 is inside guest memory, zeroed, unshared yet.
    let di = unsafe { &mut *host::va(pa + gl::DOMAIN_INFO_GPA).cast::<DomainInfo>() };
    di.mem_bytes = bytes;
    di.alloc_end = img_gpa; // the image copy at the top is not the guest's to allocate
    di.vcpus = spec.vcpus as u64;
    di.workload = spec.index;
    di.l4_gpa = gl::L4_GPA;
    di.tsc_per_ms = crate::apic::tsc_per_ms();
    di.domain_id = u64::from(id.0);
    di.peer = spec.peer.map_or(0, |i| u64::from(i) + 1);
    di.next_free.store(ld.next, Ordering::Relaxed);

    let domain = Domain::new(id, spec, pa, bytes, asid, first_vcpu, pcpus);
    Ok((domain, boots))
}

/// Loads an unmodified Multiboot kernel into the zeroed guest memory at
/// host-physical `pa` (`bytes` long): its segments, its modules, the
/// Multiboot info; returns where its vCPU starts (32-bit protected mode,
/// paging off, EAX/EBX as the Multiboot spec says).
fn load_multiboot(mb: &MultibootGuest, pa: u64, bytes: u64) -> Result<VcpuBoot, mboot::LoadError> {
    // SAFETY: `pa` is a fresh allocation of `bytes` zeroed, contiguous,
    // identity-mapped bytes that nothing else references until the domain
    // exists; the slice lives only during the load.
    let mem = unsafe { core::slice::from_raw_parts_mut(host::va(pa), bytes as usize) };
    let kernel = mboot::parse(mb.image)?;
    kernel.check_fits(bytes)?;
    kernel.load(mb.image, mem)?;
    let entry = mboot::build_info(mem, &kernel, mb.cmdline, mb.modules)?;
    Ok(VcpuBoot {
        mode: BootMode::Multiboot {
            eax: entry.eax,
            // The info lies in the low area (below 64 KiB).
            ebx: entry.ebx.0 as u32,
        },
        rip: entry.eip.0,
        rsp: 0,
        rdi: 0,
        gs_base: 0,
    })
}
