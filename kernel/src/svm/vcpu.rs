//! A vCPU: its VMCB and registers, the run loop of one scheduling slice, and
//! the handling of every exit (forwarding page-table events to the MMU
//! server and carrying out its replies; emulating the PC of `platform`:
//! the guest's own CR0/CR4/EFER, CPUID, MSRs, ports and string I/O).

use super::decode::{self, Op, RegFile};
use super::domain::{BootMode, Domain, VcpuBoot};
use super::exit::ExitReason;
use super::lapic::Lapic;
use super::platform::{
    self, cr0, efer, GuestControl, ModeError, MsrKind, PortEffect, APIC_BASE_BSP_RESET,
    APIC_BASE_WRITABLE,
};
use super::stats::{self, bump, STATS};
use super::vmcb::{self, misc1, misc2, off, Segment, Vmcb};
use super::world::{self, GuestGprs};
use super::{host, svm};
use abi::guest::hc;
use abi::sched::StopReason;
use abi::{GuestCr3, Gva, MmuReply, MmuRequest, PcpuId, PfErrorCode, VcpuId};
use core::sync::atomic::{AtomicBool, Ordering};

/// What a pCPU remembers between slices.
pub struct PcpuState {
    /// The page for VMSAVE/VMLOAD of host state.
    pub host_vmcb: u64,
    /// ASIDs (bit per ASID mod 64) whose TLB must be flushed before the next
    /// VMRUN here.
    pub pending: u64,
    /// The vCPU that last ran here.
    pub last: Option<VcpuId>,
}

/// How a slice ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slice {
    /// The vCPU can run again later.
    Yield,
    /// The vCPU has ended (exited, failed, or its domain stopped).
    Done,
}

enum Step {
    Continue,
    Preempt,
    Yield,
    Done,
}

/// One virtual CPU, pinned to a pCPU.
pub struct Vcpu {
    id: VcpuId,
    index: u32,
    dom: &'static Domain,
    vmcb: Vmcb,
    gprs: GuestGprs,
    guest_cr3: u64,
    /// The CR0, CR4 and EFER the guest wrote (what it reads back).
    ctl: GuestControl,
    /// The guest's APIC_BASE MSR (stored and read back).
    apic_base: u64,
    /// Its local APIC's registers (MMIO at the APIC base).
    lapic: Lapic,
    root_gen: Option<u64>,
    flush_next: bool,
    /// TSC at the last #PF exit, until the next VMRUN records its cost.
    pf_exit_at: Option<u64>,
    /// The scheduler moved it to another pCPU: the next `VcpuScheduled`'s
    /// flush obligation is counted as a migration's.
    migrated: bool,
    line: [u8; 120],
    line_len: usize,
    /// EXITINTINFO of the exit being handled: the event the CPU was
    /// delivering when the exit came (valid bit clear: none).
    delivering: u64,
}

impl Vcpu {
    /// A vCPU at the loader's entry point, with the guest's control
    /// registers as the loader chose (64-bit code segments).
    pub fn new(
        id: VcpuId,
        index: u32,
        dom: &'static Domain,
        boot: &VcpuBoot,
        iopm_pa: u64,
        msrpm_pa: u64,
    ) -> Result<Vcpu, &'static str> {
        let pa = host::alloc_zeroed(1)?;
        // SAFETY: a fresh zeroed page, owned by this vCPU from now on.
        let mut v = unsafe { Vmcb::from_page(host::va(pa), pa) };
        // Reads of CR0, CR3, CR4 and writes of CR0, CR3, CR4: the guest
        // sees its own values, the hardware runs with the shadow's.
        v.write32(
            off::INTERCEPT_CR,
            1 << 0 | 1 << 3 | 1 << 4 | 1 << 16 | 1 << 19 | 1 << 20,
        );
        // Only #PF: every other exception the guest raises (#UD, #GP, #DE,
        // #BP, #DB, INT1 included) is delivered to its own IDT.
        v.write32(off::INTERCEPT_EXCEPTIONS, 1 << 14);
        v.write32(
            off::INTERCEPT_MISC1,
            misc1::INTR
                | misc1::NMI
                | misc1::SMI
                | misc1::INIT
                | misc1::CPUID
                | misc1::INVD
                | misc1::HLT
                | misc1::INVLPG
                | misc1::INVLPGA
                | misc1::IOIO_PROT
                | misc1::MSR_PROT
                | misc1::TASK_SWITCH
                | misc1::SHUTDOWN,
        );
        v.write32(
            off::INTERCEPT_MISC2,
            misc2::VMRUN
                | misc2::VMMCALL
                | misc2::VMLOAD
                | misc2::VMSAVE
                | misc2::STGI
                | misc2::CLGI
                | misc2::SKINIT
                | misc2::RDTSCP
                | misc2::WBINVD
                | misc2::MONITOR
                | misc2::MWAIT
                | misc2::XSETBV,
        );
        v.write64(off::IOPM_BASE_PA, iopm_pa);
        v.write64(off::MSRPM_BASE_PA, msrpm_pa);
        v.write32(off::GUEST_ASID, dom.asid);
        v.write64(off::INT_CTL, vmcb::V_INTR_MASKING);
        // The hardware always runs long mode with paging (see `platform`).
        let ctl = boot.mode.control();
        let hw = ctl.hardware();
        v.write64(off::CR0, hw.cr0);
        v.write64(off::CR4, hw.cr4);
        v.write64(off::EFER, hw.efer);
        v.write64(off::RFLAGS, 0x2);
        v.write64(off::DR6, 0xFFFF_0FF0);
        v.write64(off::DR7, 0x400);
        v.write64(off::G_PAT, 0x0007_0406_0007_0406);
        v.set_segment(off::CS, Segment::CODE64);
        for s in [off::DS, off::ES, off::SS] {
            v.set_segment(s, Segment::DATA);
        }
        v.set_segment(off::FS, Segment::NULL);
        v.set_segment(
            off::GS,
            Segment {
                base: boot.gs_base,
                ..Segment::NULL
            },
        );
        v.set_segment(off::TR, Segment::tss(0));
        v.set_segment(
            off::GDTR,
            Segment {
                selector: 0,
                attrib: 0,
                limit: 23,
                base: abi::guest::DIRECT_BASE + abi::guest::GDT_GPA,
            },
        );
        v.set_segment(
            off::IDTR,
            Segment {
                selector: 0,
                attrib: 0,
                limit: 4095,
                base: abi::guest::DIRECT_BASE + abi::guest::IDT_GPA,
            },
        );
        v.set_rip(boot.rip);
        v.set_rsp(boot.rsp);
        let mut gprs = GuestGprs {
            rdi: boot.rdi,
            ..GuestGprs::default()
        };
        if let BootMode::Multiboot { eax, ebx } = boot.mode {
            // As a Multiboot loader leaves it: flat 32-bit code and data,
            // EAX the magic, EBX the info. The hardware stays in long mode
            // (compatibility mode: CS.L = 0) on the MMU server's identity
            // shadow; the guest's own GDT and IDT come later.
            v.set_segment(off::CS, Segment::CODE32);
            for s in [off::DS, off::ES, off::SS, off::FS, off::GS] {
                v.set_segment(s, Segment::DATA);
            }
            for s in [off::GDTR, off::IDTR] {
                v.set_segment(s, Segment::NULL);
            }
            v.set_rax(u64::from(eax));
            gprs.rbx = u64::from(ebx);
        }
        Ok(Vcpu {
            id,
            index,
            dom,
            vmcb: v,
            gprs,
            guest_cr3: boot.mode.cr3(),
            ctl,
            lapic: Lapic::new(index),
            apic_base: if index == 0 {
                APIC_BASE_BSP_RESET
            } else {
                APIC_BASE_BSP_RESET & !(1 << 8)
            },
            root_gen: None,
            flush_next: true,
            pf_exit_at: None,
            migrated: false,
            line: [0; 120],
            line_len: 0,
            delivering: 0,
        })
    }

    /// Its wire id.
    pub fn id(&self) -> VcpuId {
        self.id
    }

    /// Marks that the scheduler moved it to another pCPU (see `migrated`).
    pub fn mark_migrated(&mut self) {
        self.migrated = true;
    }

    /// The domain the vCPU belongs to.
    pub fn domain(&self) -> &'static Domain {
        self.dom
    }

    fn pcpu(&self) -> PcpuId {
        PcpuId(host::cpu_index() as u32)
    }

    /// Asks the server for this vCPU's shadow root on this pCPU.
    fn schedule(&mut self) -> bool {
        let gen = self.dom.root_gen.load(Ordering::Acquire);
        let Ok(reply) = svm().mmu(
            Some(self.dom),
            &MmuRequest::VcpuScheduled {
                vcpu: self.id,
                pcpu: self.pcpu(),
            },
        ) else {
            return false;
        };
        if core::mem::take(&mut self.migrated) && reply.flush().is_some() {
            bump(&self.dom.migration_flushes);
        }
        match reply {
            MmuReply::LoadShadowRoot { root, .. } => {
                self.vmcb.write64(off::CR3, root.0);
                self.root_gen = Some(gen);
                self.flush_next = true;
                true
            }
            other => {
                self.fail_reply("VcpuScheduled", &other);
                false
            }
        }
    }

    fn deschedule(&mut self) {
        if self.root_gen.take().is_some() {
            // A stopped server has stopped the domain already.
            let _ = svm().mmu(
                Some(self.dom),
                &MmuRequest::VcpuDescheduled {
                    vcpu: self.id,
                    pcpu: self.pcpu(),
                },
            );
        }
    }

    /// Runs the vCPU until it yields, is preempted with others waiting, or
    /// ends (the in-kernel pinned loop, without a scheduler server).
    pub fn run_slice(&mut self, pcpu: &mut PcpuState, others_waiting: bool) -> Slice {
        self.run(pcpu, &mut |preempt| preempt && others_waiting).0
    }

    /// Runs the vCPU for a scheduler decision: until it yields (HLT), ends,
    /// uses up `budget` TSC ticks (checked at each exit: the timer's exit
    /// bounds the overrun to one tick), or `kick` is raised. Returns how
    /// it stopped, as the scheduler protocol names it.
    pub fn run_for(
        &mut self,
        pcpu: &mut PcpuState,
        budget: u64,
        kick: &AtomicBool,
    ) -> (Slice, StopReason) {
        let start = crate::apic::tsc();
        let mut why = StopReason::Yielded;
        let (slice, stopped) = self.run(pcpu, &mut |_| {
            if kick.load(Ordering::Acquire) {
                why = StopReason::Preempted;
                true
            } else if crate::apic::tsc() - start >= budget {
                why = StopReason::SliceExpired;
                true
            } else {
                false
            }
        });
        match (slice, stopped) {
            (Slice::Done, _) => (Slice::Done, StopReason::Blocked),
            (Slice::Yield, true) => (Slice::Yield, why),
            (Slice::Yield, false) => (Slice::Yield, StopReason::Yielded),
        }
    }

    /// The run loop: enters the guest and handles its exits until it
    /// yields or ends, or `stop_now` (asked after every exit with whether
    /// the exit was a timer preemption point) says to stop. Returns how it
    /// ended and whether `stop_now` ended it.
    fn run(
        &mut self,
        pcpu: &mut PcpuState,
        stop_now: &mut dyn FnMut(bool) -> bool,
    ) -> (Slice, bool) {
        if pcpu.last != Some(self.id) {
            self.flush_next = true;
            pcpu.last = Some(self.id);
        }
        loop {
            if self.dom.stopped.load(Ordering::Acquire) {
                self.deschedule();
                self.end_console_line();
                self.dom.exited_bad.fetch_add(1, Ordering::Relaxed);
                return (Slice::Done, false);
            }
            if self.root_gen != Some(self.dom.root_gen.load(Ordering::Acquire)) && !self.schedule()
            {
                continue;
            }
            world::clgi();
            pcpu.pending |= host::take_guest_flushes();
            let asid_bit = 1u64 << (self.dom.asid % 64);
            let flush = self.flush_next || pcpu.pending & asid_bit != 0;
            if flush {
                // TLB_CONTROL=1 flushes every ASID (TCG has no flush-by-ASID).
                pcpu.pending = 0;
                self.flush_next = false;
            }
            self.vmcb.write8(
                off::TLB_CONTROL,
                if flush { vmcb::TLB_FLUSH_ALL } else { 0 },
            );
            if let Some(t) = self.pf_exit_at.take() {
                stats::record_pf_exit(host::cpu_index(), crate::apic::tsc() - t);
            }
            // SAFETY: SVM is on (pcpu_main), GIF=0 (clgi above), the VMCBs are
            // ours, and the guest state only reaches the guest's frames
            // through the server's shadow root.
            unsafe { world::world_switch(self.vmcb.pa(), pcpu.host_vmcb, &mut self.gprs) };
            if self.vmcb.exit_code() == 0x4E {
                self.pf_exit_at = Some(crate::apic::tsc());
            }
            self.vmcb.write64(off::EVENTINJ, 0);
            self.delivering = self.vmcb.read64(off::EXITINTINFO);
            let step = self.handle_exit();
            self.redeliver();
            match step {
                Step::Continue if stop_now(false) => {
                    self.deschedule();
                    return (Slice::Yield, true);
                }
                Step::Continue => {}
                Step::Preempt if stop_now(true) => {
                    self.deschedule();
                    return (Slice::Yield, true);
                }
                Step::Preempt => {}
                Step::Yield => {
                    self.deschedule();
                    return (Slice::Yield, false);
                }
                Step::Done => {
                    self.deschedule();
                    self.end_console_line();
                    return (Slice::Done, false);
                }
            }
        }
    }

    /// Delivers again, at the next entry, the event the exit interrupted
    /// (EXITINTINFO: e.g. a #PF on the guest's stack or IDT while the CPU
    /// pushed a #DB or an injected #PF), unless the handler queued its own.
    /// A trap such as single-step #DB is not raised again by re-executing
    /// anything, so it would be lost; a fault would come again, one exit
    /// later. Software interrupts (INT n, INT3, INTO: type 4) are left to
    /// re-execution: without NRIPS the VMCB RIP is the INT instruction's,
    /// and an injected one would return to it.
    fn redeliver(&mut self) {
        const TYPE_SOFTWARE_INT: u64 = 4 << 8;
        let event = core::mem::take(&mut self.delivering);
        if event & vmcb::EVENTINJ_VALID == 0
            || event & (7 << 8) == TYPE_SOFTWARE_INT
            || self.vmcb.read64(off::EVENTINJ) & vmcb::EVENTINJ_VALID != 0
        {
            return;
        }
        // The format is EVENTINJ's; bits 12..30 are reserved in both.
        self.vmcb.write64(off::EVENTINJ, event & !(0x7_FFFF << 12));
    }

    /// The #PF the server asks to inject, combined with the exception
    /// being delivered when it came, as the CPU combines them: a #PF
    /// while delivering a #PF is a #DF, a fault while delivering a #DF
    /// shuts the guest down (a triple fault); after any other event the
    /// #PF is delivered alone.
    fn inject_page_fault(&mut self, address: u64, error_code: u32) -> Step {
        const TYPE_EXCEPTION: u64 = vmcb::EVENTINJ_TYPE_EXCEPTION;
        let event = self.delivering;
        let exception = event & vmcb::EVENTINJ_VALID != 0 && event & (7 << 8) == TYPE_EXCEPTION;
        match (exception, event & 0xFF) {
            (true, 14) => {
                self.vmcb.write64(off::CR2, address);
                self.vmcb.inject_exception(8, Some(0));
            }
            (true, 8) => return self.stop("triple fault: a #PF while delivering #DF, at", address),
            _ => self.vmcb.inject_page_fault(address, error_code),
        }
        Step::Continue
    }

    fn stop(&mut self, why: &'static str, value: u64) -> Step {
        crate::kprintln!(
            "[d{} v{}] stopped: {why} {value:#x} (rip {:#x})",
            self.dom.id.0,
            self.index,
            self.vmcb.rip()
        );
        self.dom.stop(why, value);
        // Kick the domain's other vCPUs out of guest mode so they see it.
        host::kick(self.dom.pcpus);
        Step::Done
    }

    fn fail_reply(&mut self, what: &'static str, reply: &MmuReply) -> Step {
        crate::kprintln!(
            "[d{} v{}] MMU server: {what}: {reply:?}",
            self.dom.id.0,
            self.index
        );
        self.stop("MMU server refused", 0)
    }

    fn regs(&self) -> RegFile {
        let g = &self.gprs;
        RegFile {
            r: [
                self.vmcb.rax(),
                g.rcx,
                g.rdx,
                g.rbx,
                self.vmcb.rsp(),
                g.rbp,
                g.rsi,
                g.rdi,
                g.r8,
                g.r9,
                g.r10,
                g.r11,
                g.r12,
                g.r13,
                g.r14,
                g.r15,
            ],
            fs_base: self.vmcb.segment_base(off::FS),
            gs_base: self.vmcb.segment_base(off::GS),
        }
    }

    fn set_regs(&mut self, r: &RegFile) {
        self.vmcb.set_rax(r.r[0]);
        self.vmcb.set_rsp(r.r[4]);
        let g = &mut self.gprs;
        [g.rcx, g.rdx, g.rbx] = [r.r[1], r.r[2], r.r[3]];
        [g.rbp, g.rsi, g.rdi] = [r.r[5], r.r[6], r.r[7]];
        [g.r8, g.r9, g.r10, g.r11] = [r.r[8], r.r[9], r.r[10], r.r[11]];
        [g.r12, g.r13, g.r14, g.r15] = [r.r[12], r.r[13], r.r[14], r.r[15]];
    }

    /// The guest's code size in bits (16, 32 or 64).
    fn code_bits(&self) -> u32 {
        self.vmcb.code_bits(self.ctl.efer & efer::LMA != 0)
    }

    /// The guest CR3 to translate linear addresses with, None while the
    /// guest's paging is off (linear = guest-physical).
    fn linear_cr3(&self) -> Option<u64> {
        (self.ctl.cr0 & cr0::PG != 0).then_some(self.guest_cr3)
    }

    /// The base of segment `seg` (0 ES, 1 CS, 2 SS, 3 DS, 4 FS, 5 GS) for
    /// code of `bits`: 0 in 64-bit code except FS and GS.
    fn segment_base(&self, seg: usize, bits: u32) -> u64 {
        if bits == 64 && seg < 4 {
            0
        } else {
            self.vmcb.segment_base(off::ES + 16 * seg)
        }
    }

    /// Fetches and decodes the instruction at guest RIP, in the guest's
    /// code size (CS.L, CS.D).
    fn decode_at_rip(&self) -> Result<decode::Decoded, &'static str> {
        let rip = self.vmcb.rip();
        let bits = self.code_bits();
        let linear = match bits {
            64 => rip,
            _ => self.segment_base(1, bits).wrapping_add(rip) & 0xFFFF_FFFF,
        };
        let mut bytes = [0u8; 15];
        let n = self.dom.read_linear(self.linear_cr3(), linear, &mut bytes);
        if n == 0 {
            return Err("instruction at RIP is not mapped by the guest");
        }
        decode::decode(&bytes[..n], rip, bits, &self.regs()).map_err(|e| match e {
            decode::DecodeError::Invalid => "invalid instruction at RIP",
            decode::DecodeError::Unsupported => "instruction form not emulated",
        })
    }

    fn advance(&mut self, len: u8) {
        let rip = self.vmcb.rip();
        self.vmcb.set_rip(rip + len as u64);
    }

    fn handle_exit(&mut self) -> Step {
        let code = self.vmcb.exit_code();
        let reason = ExitReason::from_code(code);
        let me = host::cpu_index();
        bump(&STATS[me].exits[reason.bucket()]);
        bump(&self.dom.exits_by[reason.bucket()]);
        self.dom.exits.fetch_add(1, Ordering::Relaxed);
        let (info1, info2) = (self.vmcb.exit_info1(), self.vmcb.exit_info2());
        match reason {
            ExitReason::PageFault => self.page_fault(info1, info2),
            ExitReason::Cr3Write
            | ExitReason::Cr3Read
            | ExitReason::Invlpg
            | ExitReason::CrWrite(_)
            | ExitReason::CrRead(_) => self.paging_instruction(),
            ExitReason::Cpuid => self.cpuid(),
            ExitReason::Msr => self.msr(info1 == 1),
            ExitReason::CacheFlush => match self.decode_at_rip() {
                Ok(d) => {
                    self.advance(d.len);
                    Step::Continue
                }
                Err(e) => self.stop(e, self.vmcb.rip()),
            },
            ExitReason::NotOffered(_) | ExitReason::Vmrun | ExitReason::Invlpga => {
                self.vmcb.inject_ud();
                Step::Continue
            }
            ExitReason::Vmmcall => self.hypercall(),
            ExitReason::Hlt => {
                self.advance(1);
                Step::Yield
            }
            ExitReason::Ioio => self.ioio(info1, info2),
            ExitReason::Intr | ExitReason::Nmi => {
                // The interrupt itself was delivered to the host after STGI.
                host::serve_shootdowns();
                if super::past_deadline() {
                    return self.stop(
                        "watchdog: the run took longer than seconds:",
                        super::run::deadline_seconds(),
                    );
                }
                super::timer_work();
                Step::Preempt
            }
            ExitReason::Shutdown => self.stop("shutdown", self.vmcb.rip()),
            ExitReason::Invalid => self.stop("VMRUN refused the guest state, exit code", code),
            _ => self.stop("unhandled exit, code", code),
        }
    }

    fn page_fault(&mut self, err: u64, gva: u64) -> Step {
        let me = host::cpu_index();
        let req = MmuRequest::PageFault {
            vcpu: self.id,
            pcpu: self.pcpu(),
            gva: Gva(gva),
            error_code: PfErrorCode(err as u32),
        };
        let Ok(reply) = svm().mmu(Some(self.dom), &req) else {
            return Step::Done;
        };
        bump(&self.dom.pf_exits);
        match reply {
            MmuReply::Resume { .. } => {
                bump(&STATS[me].fixed);
                bump(&self.dom.fixed);
                Step::Continue
            }
            MmuReply::InjectPageFault {
                error_code,
                address,
                ..
            } => {
                bump(&STATS[me].injected);
                bump(&self.dom.injected);
                self.inject_page_fault(address.0, error_code.0)
            }
            MmuReply::LoadShadowRoot { root, .. } => {
                self.vmcb.write64(off::CR3, root.0);
                self.flush_next = true;
                Step::Continue
            }
            MmuReply::EmulateWrite { gpa, .. } | MmuReply::Mmio { gpa, .. }
                if self.delivering & vmcb::EVENTINJ_VALID != 0 =>
            {
                // The access is the CPU's push of an event frame (or its
                // IDT/GDT read), not the instruction at RIP: nothing to
                // decode and emulate.
                self.stop(
                    "event delivery touched a write-protected or MMIO page, gpa",
                    gpa.0,
                )
            }
            MmuReply::EmulateWrite { gpa, .. } => self.emulate_write(gpa.0, gva),
            MmuReply::Mmio { gpa, .. } => self.mmio(gpa.0),
            other => self.fail_reply("PageFault", &other),
        }
    }

    /// An access to guest-physical `gpa`, outside the guest's RAM (the MMU
    /// server answered `Mmio`): the local APIC's register page, or no
    /// device (reads all ones, writes ignored, as on a PC). The instruction
    /// at RIP is decoded (a MOV load or store) and emulated.
    fn mmio(&mut self, gpa: u64) -> Step {
        let d = match self.decode_at_rip() {
            Ok(d) => d,
            Err(e) => return self.stop(e, self.vmcb.rip()),
        };
        let apic = (self.apic_base & 1 << 11 != 0).then_some(self.apic_base & !0xFFF);
        let in_apic = |a: u64| apic.is_some_and(|base| a & !0xFFF == base);
        // A 32-bit read of an APIC register, else no device: all ones.
        let lapic = &self.lapic;
        let read = |size: u8| match (in_apic(gpa), size) {
            (true, 4) => u64::from(lapic.read(gpa & 0xFFF)),
            _ => decode::size_mask(size),
        };
        bump(&self.dom.mmio);
        match d.op {
            Op::Write { value, size, .. } => {
                if in_apic(gpa) && size == 4 {
                    self.lapic.write(gpa & 0xFFF, value as u32);
                }
            }
            Op::Read { size, dest, .. } => {
                let value = read(size);
                let mut r = self.regs();
                if r.set(dest, value).is_err() {
                    return self.stop("MMIO read into an unsupported register", dest as u64);
                }
                self.set_regs(&r);
            }
            Op::ReadAlu {
                size,
                alu,
                other,
                dest,
                mem_first,
                ..
            } => {
                let (value, flags) = decode::alu_apply(alu, size, read(size), other, mem_first);
                if let (Some(reg), Some(v)) = (dest, value) {
                    let mut r = self.regs();
                    if r.set(reg, v).is_err() {
                        return self.stop("MMIO ALU into an unsupported register", reg as u64);
                    }
                    self.set_regs(&r);
                }
                let rf = self.vmcb.read64(off::RFLAGS);
                self.vmcb.write64(
                    off::RFLAGS,
                    (rf & !decode::ARITH_FLAGS) | (flags & decode::ARITH_FLAGS),
                );
            }
            _ => {
                crate::kprintln!(
                    "[d{} v{}] MMIO access at gpa {gpa:#x} by {:?}",
                    self.dom.id.0,
                    self.index,
                    d.mnemonic
                );
                return self.stop(
                    "MMIO access by an instruction not emulated, rip",
                    self.vmcb.rip(),
                );
            }
        }
        self.advance(d.len);
        Step::Continue
    }

    fn emulate_write(&mut self, fault_gpa: u64, fault_gva: u64) -> Step {
        let d = match self.decode_at_rip() {
            Ok(d) => d,
            Err(e) => return self.stop(e, self.vmcb.rip()),
        };
        let (gva, size) = match d.op {
            Op::Write { gva, size, .. } | Op::ReadModifyWrite { gva, size, .. } => (gva, size),
            _ => {
                crate::kprintln!(
                    "[d{} v{}] protected write at gpa {fault_gpa:#x} by {:?}",
                    self.dom.id.0,
                    self.index,
                    d.mnemonic
                );
                return self.stop(
                    "write to a protected page by an instruction not emulated, rip",
                    self.vmcb.rip(),
                );
            }
        };
        let last = gva.wrapping_add(size as u64 - 1);
        if gva >> 12 != fault_gva >> 12 || last >> 12 != gva >> 12 {
            // Not split: Umbra's guests never write a page table across pages.
            return self.stop("emulated write crosses a page, at", gva);
        }
        let gpa = (fault_gpa & !0xFFF) | (gva & 0xFFF);
        // Emulated writes of a domain are serialized, so a read-modify-write
        // sees no other emulated write between its read and its store (the
        // page is write-protected: other guest writes trap here too).
        let _guard = self.dom.emul_lock.lock();
        let mut regs = self.regs();
        let (value, result) = match d.op {
            Op::Write { value, .. } => (Some(value), None),
            Op::ReadModifyWrite { kind, src, reg, .. } => {
                let Some(p) = self.dom.gpa_ptr(gpa & !7, 8) else {
                    return self.stop("emulated write outside guest memory, gpa", gpa);
                };
                // SAFETY: inside guest memory (checked); the 8-byte aligned
                // word holding the operand (size <= 8, not crossing it when
                // naturally aligned; misaligned operands read the word the
                // first byte is in and are refused below).
                let word = unsafe { p.cast::<u64>().read_volatile() };
                if (gpa & 7) + size as u64 > 8 {
                    return self.stop("misaligned read-modify-write of a page table, gpa", gpa);
                }
                let old = word >> ((gpa & 7) * 8);
                let r = decode::rmw_apply(kind, size, old, src, reg, &regs);
                (r.store, Some(r))
            }
            _ => (None, None),
        };
        if let Some(value) = value {
            if let Err(step) = self.emulated_write(gpa, value, size) {
                return step;
            }
            bump(&STATS[host::cpu_index()].emulated);
            bump(&self.dom.emulated);
        }
        if let Some(r) = result {
            if let Some((reg, v)) = r.reg_write {
                if regs.set(reg, v).is_err() {
                    return self.stop("read-modify-write into an unsupported register", reg as u64);
                }
                self.set_regs(&regs);
            }
            if let Some(f) = r.flags {
                let rf = self.vmcb.read64(off::RFLAGS);
                self.vmcb
                    .write64(off::RFLAGS, (rf & !r.flags_mask) | (f & r.flags_mask));
            }
        }
        self.advance(d.len);
        Step::Continue
    }

    fn paging_instruction(&mut self) -> Step {
        let d = match self.decode_at_rip() {
            Ok(d) => d,
            Err(e) => return self.stop(e, self.vmcb.rip()),
        };
        match d.op {
            Op::Cr3Write { value } => {
                self.guest_cr3 = value;
                let req = MmuRequest::WriteCr3 {
                    vcpu: self.id,
                    pcpu: self.pcpu(),
                    cr3: GuestCr3(value),
                };
                let Ok(reply) = svm().mmu(Some(self.dom), &req) else {
                    return Step::Done;
                };
                match reply {
                    MmuReply::LoadShadowRoot { root, .. } => self.vmcb.write64(off::CR3, root.0),
                    MmuReply::Done { .. } => {}
                    other => return self.fail_reply("WriteCr3", &other),
                }
                // A MOV to CR3 flushes the guest's non-global translations.
                self.flush_next = true;
            }
            Op::Cr3Read { dest } => {
                let mut r = self.regs();
                if r.set(dest, self.guest_cr3).is_err() {
                    return self.stop("CR3 read into an unsupported register", dest as u64);
                }
                self.set_regs(&r);
            }
            Op::Invlpg { gva } => {
                let req = MmuRequest::Invlpg {
                    vcpu: self.id,
                    pcpu: self.pcpu(),
                    gva: Gva(gva),
                };
                let Ok(reply) = svm().mmu(Some(self.dom), &req) else {
                    return Step::Done;
                };
                match reply {
                    MmuReply::Done { .. } | MmuReply::Resume { .. } => {}
                    MmuReply::LoadShadowRoot { root, .. } => self.vmcb.write64(off::CR3, root.0),
                    other => return self.fail_reply("Invlpg", &other),
                }
                // The guest's own INVLPG never ran: invalidate locally.
                self.flush_next = true;
            }
            Op::CrWrite { cr, value } => {
                let next = if cr == 0 {
                    self.ctl.write_cr0(value, self.code_bits() == 64)
                } else {
                    self.ctl.write_cr4(value)
                };
                let Ok(next) = next else {
                    // The guest's #GP(0); RIP stays at the instruction.
                    self.vmcb.inject_gp(0);
                    return Step::Continue;
                };
                if let Err(step) = self.set_control(next) {
                    return step;
                }
            }
            Op::Clts | Op::Lmsw { .. } => {
                // CLTS clears TS; LMSW loads PE, MP, EM, TS but never
                // clears PE.
                let cr0 = match d.op {
                    Op::Lmsw { value } => {
                        (self.ctl.cr0 & !0xF) | (value & 0xF) | (self.ctl.cr0 & cr0::PE)
                    }
                    _ => self.ctl.cr0 & !cr0::TS,
                };
                let Ok(next) = self.ctl.write_cr0(cr0, self.code_bits() == 64) else {
                    self.vmcb.inject_gp(0);
                    return Step::Continue;
                };
                if let Err(step) = self.set_control(next) {
                    return step;
                }
            }
            Op::CrRead { cr, dest } => {
                let value = if cr == 0 { self.ctl.cr0 } else { self.ctl.cr4 };
                let mut r = self.regs();
                if r.set(dest, value).is_err() {
                    return self.stop("CR read into an unsupported register", dest as u64);
                }
                self.set_regs(&r);
            }
            _ => return self.stop("CR access not emulated, rip", self.vmcb.rip()),
        }
        self.advance(d.len);
        Step::Continue
    }

    /// Makes `next` the guest's control state: the hardware values into
    /// the VMCB and, if the way the guest's page tables are read changed,
    /// the new mode to the server (SetPagingMode) and a local TLB flush.
    /// 32-bit paging, which the protocol cannot express, stops the domain.
    fn set_control(&mut self, next: GuestControl) -> Result<(), Step> {
        let changed = self.ctl.paging_changed(&next);
        self.ctl = next;
        let hw = next.hardware();
        self.vmcb.write64(off::CR0, hw.cr0);
        self.vmcb.write64(off::CR4, hw.cr4);
        self.vmcb.write64(off::EFER, hw.efer);
        if !changed {
            return Ok(());
        }
        let mode = match self.dom.server_mode(&next) {
            Ok(mode) => mode,
            Err(ModeError::Paging32) => {
                return Err(self.stop(
                    "32-bit paging, which the MMU protocol has no mode for yet; CR0",
                    next.cr0,
                ))
            }
        };
        let req = MmuRequest::SetPagingMode {
            vcpu: self.id,
            pcpu: self.pcpu(),
            mode,
        };
        let Ok(reply) = svm().mmu(Some(self.dom), &req) else {
            return Err(Step::Done);
        };
        match reply {
            MmuReply::Done { .. } => {}
            MmuReply::LoadShadowRoot { root, .. } => self.vmcb.write64(off::CR3, root.0),
            other => return Err(self.fail_reply("SetPagingMode", &other)),
        }
        bump(&self.dom.mode_changes);
        self.flush_next = true;
        Ok(())
    }

    /// CPUID: the host's answer through the platform filter.
    fn cpuid(&mut self) -> Step {
        let (leaf, subleaf) = (self.vmcb.rax() as u32, self.gprs.rcx as u32);
        let host = core::arch::x86_64::__cpuid_count(leaf, subleaf);
        let [a, b, c, d] = platform::filter_cpuid(
            leaf,
            subleaf,
            [host.eax, host.ebx, host.ecx, host.edx],
            self.index,
        );
        self.vmcb.set_rax(u64::from(a));
        self.gprs.rbx = u64::from(b);
        self.gprs.rcx = u64::from(c);
        self.gprs.rdx = u64::from(d);
        self.advance(2);
        Step::Continue
    }

    /// RDMSR or WRMSR (`write`) of the MSR in ECX, through the platform's
    /// table; any MSR outside it, or a value it refuses, gets #GP(0).
    fn msr(&mut self, write: bool) -> Step {
        let ecx = self.gprs.rcx as u32;
        if write {
            let value = self.gprs.rdx << 32 | (self.vmcb.rax() & 0xFFFF_FFFF);
            match self.wrmsr(ecx, value) {
                Ok(true) => {}
                Ok(false) => {
                    self.vmcb.inject_gp(0);
                    return Step::Continue;
                }
                Err(step) => return step,
            }
        } else {
            let Some(value) = self.rdmsr(ecx) else {
                self.vmcb.inject_gp(0);
                return Step::Continue;
            };
            self.vmcb.set_rax(value & 0xFFFF_FFFF);
            self.gprs.rdx = value >> 32;
        }
        self.advance(2);
        Step::Continue
    }

    /// The guest's value of MSR `ecx`, or None (#GP).
    fn rdmsr(&self, ecx: u32) -> Option<u64> {
        Some(match platform::msr_kind(ecx) {
            MsrKind::Efer => self.ctl.efer,
            MsrKind::ApicBase => self.apic_base,
            MsrKind::Tsc => crate::apic::tsc().wrapping_add(self.vmcb.read64(off::TSC_OFFSET)),
            MsrKind::Pat => self.vmcb.read64(off::G_PAT),
            MsrKind::Vmcb { offset, .. } => self.vmcb.read64(offset),
            MsrKind::Ignored => 0,
            MsrKind::Unknown => return None,
        })
    }

    /// Writes MSR `ecx`: Ok(true) done, Ok(false) refused (#GP), or the
    /// step that ends the vCPU (an EFER write the server refused).
    fn wrmsr(&mut self, ecx: u32, value: u64) -> Result<bool, Step> {
        match platform::msr_kind(ecx) {
            MsrKind::Efer => match self.ctl.write_efer(value) {
                Ok(next) => self.set_control(next)?,
                Err(_) => return Ok(false),
            },
            MsrKind::ApicBase if value & !APIC_BASE_WRITABLE == 0 => self.apic_base = value,
            MsrKind::Tsc => {
                // The guest's TSC becomes `value` now: an offset from the host's.
                let offset = value.wrapping_sub(crate::apic::tsc());
                self.vmcb.write64(off::TSC_OFFSET, offset);
            }
            MsrKind::Pat if platform::valid_pat(value) => self.vmcb.write64(off::G_PAT, value),
            MsrKind::Vmcb { offset, canonical } if !canonical || platform::canonical(value) => {
                self.vmcb.write64(offset, value)
            }
            MsrKind::Ignored => {}
            MsrKind::ApicBase | MsrKind::Pat | MsrKind::Vmcb { .. } | MsrKind::Unknown => {
                return Ok(false)
            }
        }
        Ok(true)
    }

    fn hypercall(&mut self) -> Step {
        let nr = self.vmcb.rax();
        let (a, b, c) = (self.gprs.rdi, self.gprs.rsi, self.gprs.rdx);
        let ret = match nr {
            hc::REPORT => {
                self.dom
                    .reported
                    .store(if a == 1 { 1 } else { 2 }, Ordering::Release);
                self.dom.detail.store(b, Ordering::Relaxed);
                0
            }
            hc::DIRTY_START => {
                if !self.dom.dirty_on.swap(true, Ordering::AcqRel) {
                    let Ok(reply) = svm().mmu(
                        Some(self.dom),
                        &MmuRequest::EnableDirtyLog {
                            domain: self.dom.id,
                        },
                    ) else {
                        return Step::Done;
                    };
                    if !matches!(reply, MmuReply::Done { .. }) {
                        return self.fail_reply("EnableDirtyLog", &reply);
                    }
                } else {
                    let mut bits = self.dom.harvest.lock();
                    let r = super::harvest_dirty(self.dom, &mut bits);
                    bits.iter_mut().for_each(|w| *w = 0);
                    drop(bits);
                    if let Err(reply) = r {
                        return self.fail_reply("GetAndClearDirty", &reply);
                    }
                }
                0
            }
            hc::DIRTY_CHECK => match self.dirty_check(a, b, c) {
                Some(missing) => missing,
                None => return Step::Done,
            },
            hc::ZAP_ALL => {
                if let Err(reply) = super::zap(self.dom) {
                    return self.fail_reply("ZapAll", &reply);
                }
                0
            }
            hc::EXITS => self.dom.exits.load(Ordering::Relaxed),
            hc::PHASE_BEGIN => {
                let now = self.dom.exits.load(Ordering::Relaxed);
                self.dom.phase_begin.store(now, Ordering::Relaxed);
                if a != 0 {
                    // A measurement window of `a` µs from now.
                    let t = crate::apic::tsc();
                    let len = a.saturating_mul(crate::apic::tsc_per_ms()) / 1000;
                    self.dom.window.store(t, Ordering::Relaxed);
                    self.dom
                        .window_end
                        .store(t.saturating_add(len), Ordering::Release);
                }
                0
            }
            hc::PHASE_END => {
                // Both hypercalls are counted in `exits`: leave them out.
                let now = self.dom.exits.load(Ordering::Relaxed);
                let begin = self.dom.phase_begin.load(Ordering::Relaxed);
                let between = now.saturating_sub(begin).saturating_sub(1);
                self.dom.phase_exits.store(between, Ordering::Relaxed);
                self.dom.phase_faults.store(a, Ordering::Relaxed);
                0
            }
            hc::GRANT => match super::grant::guest_call(svm(), self.dom, a) {
                Ok(status) => status,
                Err(_) => return Step::Done,
            },
            _ => u64::MAX,
        };
        self.vmcb.set_rax(ret);
        self.advance(3);
        Step::Continue
    }

    /// Compares the guest's record of written pages (a bitmap at gpa
    /// `record` for gfns first..first+count) with what the kernel harvested
    /// from the server's dirty log during the round plus a final harvest;
    /// returns how many written pages the log missed, and starts the next
    /// round empty.
    fn dirty_check(&mut self, record: u64, first: u64, count: u64) -> Option<u64> {
        let mut bits = self.dom.harvest.lock();
        if first
            .checked_add(count)
            .is_none_or(|end| end > bits.len() as u64 * 64)
        {
            drop(bits);
            self.stop("dirty check outside guest memory, first gfn", first);
            return None;
        }
        if let Err(reply) = super::harvest_dirty(self.dom, &mut bits) {
            drop(bits);
            self.fail_reply("GetAndClearDirty", &reply);
            return None;
        }
        let mut missing = 0;
        let mut extra = 0;
        for i in 0..count {
            let g = first + i;
            let Some(word) = self.dom.read_u64(record + (i / 64) * 8) else {
                drop(bits);
                self.stop("dirty record outside guest memory", record);
                return None;
            };
            let written = word & (1 << (i % 64)) != 0;
            let logged = bits[(g / 64) as usize] & (1 << (g % 64)) != 0;
            missing += (written && !logged) as u64;
            extra += (logged && !written) as u64;
        }
        bits.iter_mut().for_each(|w| *w = 0);
        self.dom.dirty_extra.fetch_add(extra, Ordering::Relaxed);
        Some(missing)
    }

    /// IN/OUT (EXITINFO1: port, direction, size, string/REP, address
    /// size; EXITINFO2: the next RIP) to the platform's devices.
    fn ioio(&mut self, info1: u64, next_rip: u64) -> Step {
        let port = (info1 >> 16) as u16;
        let is_in = info1 & 1 != 0;
        let size: u8 = match (info1 >> 4) & 7 {
            1 => 1,
            2 => 2,
            _ => 4,
        };
        if info1 & 4 != 0 {
            return self.string_io(info1, port, is_in, size, next_rip);
        }
        let rax = self.vmcb.rax();
        if is_in {
            let v = u64::from(self.dom.devices.lock().read(port, size));
            // A 32-bit IN zero-extends into RAX; narrower ones merge.
            let mask = decode::size_mask(size);
            let merged = if size == 4 { v } else { (rax & !mask) | v };
            self.vmcb.set_rax(merged);
        } else {
            let effect = self.dom.devices.lock().write(port, size, rax as u32);
            if let Some(step) = self.port_effect(effect) {
                return step;
            }
        }
        self.vmcb.set_rip(next_rip);
        Step::Continue
    }

    /// Carries out what a port write asks of the vCPU; Some ends it.
    fn port_effect(&mut self, effect: PortEffect) -> Option<Step> {
        match effect {
            PortEffect::None => None,
            PortEffect::Console(b) => {
                self.console_byte(b);
                None
            }
            PortEffect::Exit(status) => {
                self.dom
                    .exit_status
                    .store(u64::from(status), Ordering::Release);
                if status == 0 {
                    self.dom.exited_ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.dom.exited_bad.fetch_add(1, Ordering::Relaxed);
                }
                Some(Step::Done)
            }
            PortEffect::PowerOff => Some(self.stop(
                "the guest powered off through the shutdown port",
                u64::from(platform::SHUTDOWN_PORT),
            )),
        }
    }

    /// One byte of the console line: printed, prefixed, at a newline or
    /// when the line is full.
    fn console_byte(&mut self, b: u8) {
        if b != b'\n' && self.line_len < self.line.len() {
            self.line[self.line_len] = b;
            self.line_len += 1;
        }
        if b == b'\n' || self.line_len == self.line.len() {
            self.print_console_line();
        }
    }

    /// Prints what the guest wrote after its last newline, when the vCPU
    /// ends: a guest's last words often have none (kvm-unit-tests' `dummy`
    /// ends on "Dummy Hello World!", which its runner looks for, and
    /// `access_test` prints a dot without a newline every 65,536 cases).
    fn end_console_line(&mut self) {
        if self.line_len > 0 {
            self.print_console_line();
        }
    }

    fn print_console_line(&mut self) {
        let text = core::str::from_utf8(&self.line[..self.line_len]).unwrap_or("<non-utf8>");
        crate::kprintln!("[d{} v{}] {text}", self.dom.id.0, self.index);
        self.line_len = 0;
    }

    /// INS/OUTS, with or without REP: each element moves between the port
    /// and guest memory at ES:rDI (INS) or seg:rSI (OUTS, the segment from
    /// EXITINFO1, DS when it names ES), read through the guest's own
    /// translation; INS stores go to the MMU server as emulated writes so
    /// its shadows and dirty log stay right. At most `STRING_IO_BATCH`
    /// elements per exit: a longer REP resumes at the same instruction with
    /// rCX and rSI/rDI updated, as the hardware allows. An element the
    /// guest has not mapped gets the guest #PF (not present).
    fn string_io(&mut self, info1: u64, port: u16, is_in: bool, size: u8, next_rip: u64) -> Step {
        const STRING_IO_BATCH: u64 = 4096;
        const DF: u64 = 1 << 10;
        let rep = info1 & 8 != 0;
        let amask: u64 = match (info1 >> 7) & 7 {
            1 => 0xFFFF,
            2 => 0xFFFF_FFFF,
            _ => u64::MAX,
        };
        let bits = self.code_bits();
        let seg = match (is_in, ((info1 >> 10) & 7) as usize) {
            (true, _) => 0,
            (false, 0) => 3,
            (false, s) => s.min(5),
        };
        let base = self.segment_base(seg, bits);
        let lmask = if bits == 64 { u64::MAX } else { 0xFFFF_FFFF };
        let delta = if self.vmcb.read64(off::RFLAGS) & DF != 0 {
            (size as u64).wrapping_neg()
        } else {
            size as u64
        };
        let mut remaining = if rep { self.gprs.rcx & amask } else { 1 };
        let mut batch = 0;
        while remaining > 0 && batch < STRING_IO_BATCH {
            let index = if is_in { self.gprs.rdi } else { self.gprs.rsi };
            let gva = base.wrapping_add(index & amask) & lmask;
            let moved = if is_in {
                let v = self.dom.devices.lock().read(port, size);
                self.store_linear(gva, u64::from(v), size)
            } else {
                let mut buf = [0u8; 4];
                let n = self
                    .dom
                    .read_linear(self.linear_cr3(), gva, &mut buf[..size as usize]);
                if n < size as usize {
                    Err(Some(gva.wrapping_add(n as u64)))
                } else {
                    let effect = self
                        .dom
                        .devices
                        .lock()
                        .write(port, size, u32::from_le_bytes(buf));
                    if let Some(step) = self.port_effect(effect) {
                        return step;
                    }
                    Ok(())
                }
            };
            match moved {
                Ok(()) => {}
                Err(Some(unmapped)) => {
                    let mut err = if is_in { PfErrorCode::W } else { 0 };
                    if self.vmcb.read64(off::CPL & !7) >> ((off::CPL & 7) * 8) & 3 == 3 {
                        err |= PfErrorCode::U;
                    }
                    self.vmcb.inject_page_fault(unmapped, err);
                    return Step::Continue;
                }
                Err(None) => return Step::Done,
            }
            let next = |r: u64| (r & !amask) | (r.wrapping_add(delta) & amask);
            if is_in {
                self.gprs.rdi = next(self.gprs.rdi);
            } else {
                self.gprs.rsi = next(self.gprs.rsi);
            }
            if rep {
                let rcx = self.gprs.rcx;
                self.gprs.rcx = (rcx & !amask) | (rcx.wrapping_sub(1) & amask);
            }
            remaining -= 1;
            batch += 1;
        }
        if remaining == 0 {
            self.vmcb.set_rip(next_rip);
        }
        Step::Continue
    }

    /// Stores the low `size` bytes of `value` at guest-linear `gva` as an
    /// emulated write (the server keeps its shadows and dirty log right):
    /// Err(Some(gva)) where the guest has no mapping (its #PF), Err(None)
    /// when the vCPU has ended (the server refused, or is gone).
    fn store_linear(&mut self, gva: u64, value: u64, size: u8) -> Result<(), Option<u64>> {
        let last = gva.wrapping_add(u64::from(size) - 1);
        let Some(gpa) = self.dom.translate_linear(self.linear_cr3(), gva) else {
            return Err(Some(gva));
        };
        if last >> 12 != gva >> 12 {
            self.stop("string I/O store crosses a page, at", gva);
            return Err(None);
        }
        if self.dom.gpa_ptr(gpa, u64::from(size)).is_none() {
            self.stop("string I/O store outside guest memory, gpa", gpa);
            return Err(None);
        }
        self.emulated_write(gpa, value, size).map_err(|_| None)
    }

    /// Has the server write the low `size` bytes of `value` at `gpa`
    /// (EmulatedWrite); Err is the step that ends the vCPU (the server
    /// refused, or is gone).
    fn emulated_write(&mut self, gpa: u64, value: u64, size: u8) -> Result<(), Step> {
        let req = MmuRequest::EmulatedWrite {
            vcpu: self.id,
            pcpu: self.pcpu(),
            gpa: abi::Gpa(gpa),
            value,
            size,
        };
        let Ok(reply) = svm().mmu(Some(self.dom), &req) else {
            return Err(Step::Done);
        };
        if !matches!(reply, MmuReply::WriteDone { .. }) {
            return Err(self.fail_reply("EmulatedWrite", &reply));
        }
        Ok(())
    }
}
