//! The hardware model: a TLB per pCPU and the shadow walk behind it.
//!
//! A guest access on a pCPU first consults that pCPU's TLB model (entries
//! tagged with the vCPU, as with one ASID per vCPU); on a miss it walks the
//! shadow tables from the root the server handed out, setting shadow A/D
//! bits as the MMU does, and caches the result. A fault goes to the server
//! as `PageFault`; its reply is carried out (flush, resume, inject, emulate
//! the write). Flushes happen only when an obligation says so, or for the
//! faulting address when a fault is taken on a TLB entry.

use super::{Machine, Outcome, Res, BY_EMULATION, BY_GUEST, MAX_RETRY};
use crate::arch::{self, fault_code, walk, Access, Ctrl, Walk, PF_P};
use crate::tlb::Entry;
use abi::{Gpa, Gva, MmuReply, MmuRequest, PcpuId, PfErrorCode};
use alloc::format;
use alloc::string::String;

impl<'m> Machine<'m> {
    /// The TLB tag of vCPU `v` (its id: one ASID per vCPU id).
    pub(super) fn key(&self, v: usize) -> u32 {
        self.vcpus[v].id.0
    }

    /// The paging controls the hardware walks the shadow tables with: the
    /// guest's EFER.NXE, and CR0.WP always set (as KVM does: a guest with
    /// WP=0 gets supervisor-writable, user-inaccessible shadow entries, so
    /// write protection of guest page tables also stops supervisor writes).
    pub fn hw_ctrl(&self, v: usize) -> Ctrl {
        Ctrl {
            wp: true,
            nxe: self.vcpus[v].ctrl.nxe,
            // The shadow is 4-level in every mode (paging off runs in
            // compatibility mode on an identity shadow).
            paging: true,
            mmio: false,
        }
    }

    /// What the shadow hardware does for `acc` at `gva`: a host address, or
    /// the fault error code it raises.
    fn hw(&mut self, v: usize, p: usize, gva: u64, acc: Access) -> Res<Result<u64, u64>> {
        let ctrl = self.hw_ctrl(v);
        let key = self.key(v);
        if let Some(e) = self.pcpus[p].tlb.lookup(key, gva) {
            if e.rights.allows(acc, ctrl) {
                if !acc.write || e.dirty {
                    self.op.push_str(" [tlb]");
                    return Ok(Ok(e.hpa + (gva & (e.size.bytes() - 1))));
                }
            } else {
                self.pcpus[p].tlb.drop_va(key, gva);
                return Ok(Err(PF_P | arch::access_bits(acc, ctrl)));
            }
        }
        let Some(root) = self.vcpus[v].root else {
            return Err(self.fail(
                "vCPU has a shadow root",
                Some(gva),
                String::from("a root"),
                String::from("none"),
            ));
        };
        let ram = self.ram;
        let w = walk(&|a| ram.read(a), root, gva, ctrl);
        match w {
            Walk::Ok(leaf) if leaf.rights.allows(acc, ctrl) => {
                for i in 0..leaf.depth {
                    let a = leaf.path[i];
                    let mut val = ram.read(a).unwrap_or(0) | arch::A;
                    if i + 1 == leaf.depth && acc.write {
                        val |= arch::D;
                    }
                    ram.write(a, val);
                }
                let hpa = leaf.phys(gva);
                let e = Entry {
                    vcpu: key,
                    va: gva & !(leaf.size.bytes() - 1),
                    size: leaf.size,
                    hpa: leaf.base,
                    rights: leaf.rights,
                    dirty: acc.write || leaf.vals[leaf.depth - 1] & arch::D != 0,
                };
                self.check_translation(v, e.va, e.size, e.hpa, e.rights, "shadow walk")?;
                self.op.push_str(" [shadow]");
                self.pcpus[p].tlb.insert(e);
                Ok(Ok(hpa))
            }
            Walk::Outside { addr, .. } => Err(self.fail(
                "shadow tables stay in memory",
                Some(gva),
                String::from("shadow entries inside the host block"),
                format!("shadow walk from root {root:#x} reads {addr:#x}"),
            )),
            w => Ok(Err(fault_code(&w, acc, ctrl).unwrap_or(0))),
        }
    }

    /// A guest access of `acc` at `gva` on vCPU `v` (a write stores `value`).
    pub fn access(&mut self, v: usize, gva: u64, acc: Access, value: u64) -> Res<Outcome> {
        self.begin(format!(
            "{} {gva:#x}{} by vCPU {}",
            acc.name(),
            if acc.write {
                format!(" <- {value:#x}")
            } else {
                String::new()
            },
            self.vcpus[v].id.0
        ));
        self.stats.accesses += 1;
        let out = self.access_inner(v, gva, acc, value)?;
        self.check()?;
        Ok(out)
    }

    fn access_inner(&mut self, v: usize, gva: u64, acc: Access, value: u64) -> Res<Outcome> {
        let p = self.pcpu_of(v)?;
        let d = self.vcpus[v].dom;
        let gva = gva & !7;
        self.cur_access = Some((v, gva, acc));
        let w = self.guest_walk_now(v, gva);
        self.cur_path = (w.path().to_vec(), matches!(w, Walk::Ok(_)));
        for _ in 0..MAX_RETRY {
            if self.vcpus[v].need_root {
                let r = self.call(&MmuRequest::VcpuScheduled {
                    vcpu: self.vcpus[v].id,
                    pcpu: PcpuId(p as u32),
                })?;
                if let MmuReply::Error { reason, flush } = r {
                    // E.g. no pool frame for the new root: the vCPU cannot
                    // run now (the kernel would retry later).
                    self.flush(d, flush);
                    return Ok(Outcome::Refused(reason));
                }
                self.take_root(v, r, "VcpuScheduled (reload)")?;
            }
            let ec = match self.hw(v, p, gva, acc)? {
                Ok(hpa) => return self.complete(v, d, gva, acc, value, hpa),
                Err(ec) => ec,
            };
            if self.vcpus[v].stale_root {
                // The exit for this fault is where the kernel notices the
                // void root: reload it and retry before bothering the server.
                self.exit(v);
                continue;
            }
            self.stats.faults += 1;
            self.op.push_str(&format!(" [#PF {ec:#x}]"));
            let r = self.call(&MmuRequest::PageFault {
                vcpu: self.vcpus[v].id,
                pcpu: PcpuId(p as u32),
                gva: Gva(gva),
                error_code: PfErrorCode(ec as u32),
            })?;
            match r {
                MmuReply::Resume { flush } => self.flush(d, flush),
                MmuReply::LoadShadowRoot { .. } => self.take_root(v, r, "PageFault")?,
                MmuReply::InjectPageFault {
                    error_code,
                    address,
                    flush,
                } => {
                    self.flush(d, flush);
                    self.stats.injected += 1;
                    self.judge_injection(v, gva, acc, u64::from(error_code.0), address.0)?;
                    return Ok(Outcome::Fault(u64::from(error_code.0)));
                }
                MmuReply::EmulateWrite { gpa, flush } => {
                    self.flush(d, flush);
                    return self.emulate(v, d, p, gva, acc, value, gpa.0);
                }
                MmuReply::Error { reason, flush } => {
                    self.flush(d, flush);
                    return Ok(Outcome::Refused(reason));
                }
                MmuReply::Mmio { gpa, write, flush } => {
                    self.flush(d, flush);
                    self.op.push_str(" [mmio]");
                    self.stats.mmio += 1;
                    self.judge_mmio(v, gva, acc, gpa.0, write)?;
                    self.check_guest_ad(v, gva, acc)?;
                    return Ok(Outcome::Mmio(gpa.0));
                }
                other => {
                    self.flush(d, other.flush());
                    return Err(self.fail(
                        "PageFault reply",
                        Some(gva),
                        String::from(
                            "Resume, InjectPageFault, EmulateWrite, LoadShadowRoot, Mmio or Error",
                        ),
                        format!("{other:?}"),
                    ));
                }
            }
        }
        let w = self.guest_walk_now(v, gva);
        Err(self.fail(
            "progress",
            Some(gva),
            format!("the access completes or faults within {MAX_RETRY} tries (guest walk: {w:?})"),
            format!(
                "still faulting on the shadow tables ({} access)",
                acc.name()
            ),
        ))
    }

    fn complete(
        &mut self,
        v: usize,
        d: usize,
        gva: u64,
        acc: Access,
        value: u64,
        hpa: u64,
    ) -> Res<Outcome> {
        self.check_guest_ad(v, gva, acc)?;
        if !acc.write {
            return Ok(Outcome::Ok(self.ram.read(hpa).unwrap_or(0)));
        }
        let gfn = self.doms[d].gfn_of(hpa >> 12).ok_or_else(|| {
            self.fail(
                "write lands in guest memory",
                Some(gva),
                String::from("a guest frame"),
                format!("hpa {hpa:#x}"),
            )
        })?;
        let gpa = (gfn << 12) | (hpa & 0xfff);
        let old = self.ram.read(hpa).unwrap_or(0);
        self.ram.write(hpa, value);
        self.doms[d].hist.record(gpa, old);
        self.epoch += 1;
        if self.doms[d].dirty_on {
            self.doms[d].dirty_pending.insert(gfn);
            *self.doms[d].dirty_by.entry(gfn).or_default() |= BY_GUEST;
        }
        Ok(Outcome::Ok(value))
    }

    #[allow(clippy::too_many_arguments)]
    fn emulate(
        &mut self,
        v: usize,
        d: usize,
        p: usize,
        gva: u64,
        acc: Access,
        value: u64,
        gpa: u64,
    ) -> Res<Outcome> {
        if !acc.write {
            return Err(self.fail(
                "EmulateWrite only for writes",
                Some(gva),
                String::from("no EmulateWrite for a read"),
                format!("EmulateWrite at gpa {gpa:#x}"),
            ));
        }
        // The guest's own tables must allow the write and name this gpa.
        let ctrl = self.vcpus[v].ctrl;
        let want = gpa & !7;
        let dd = &self.doms[d];
        let ok = self.search(v, gva, &mut |w| match w {
            Walk::Ok(l) => {
                l.rights.allows(acc, ctrl) && l.phys(gva) == want && dd.mfn(want >> 12).is_some()
            }
            _ => false,
        });
        if !ok {
            let w = self.guest_walk_now(v, gva);
            return Err(self.fail(
                "EmulateWrite names the gpa the guest tables give, for an allowed write",
                Some(gva),
                format!("guest walk {w:?}"),
                format!("EmulateWrite at gpa {gpa:#x}"),
            ));
        }
        let old = self.peek(d, want).unwrap_or(0);
        self.stats.emulated += 1;
        let r = self.call(&MmuRequest::EmulatedWrite {
            vcpu: self.vcpus[v].id,
            pcpu: PcpuId(p as u32),
            gpa: Gpa(want),
            value,
            size: 8,
        })?;
        match r {
            MmuReply::WriteDone { flush } => self.flush(d, flush),
            other => {
                self.flush(d, other.flush());
                return Err(self.fail(
                    "EmulatedWrite",
                    Some(gva),
                    String::from("WriteDone"),
                    format!("{other:?}"),
                ));
            }
        }
        self.cur_emulated.push((d, want, value));
        self.op.push_str(" [emulated]");
        let now = self.peek(d, want).unwrap_or(0);
        if now != value {
            return Err(self.fail(
                "emulated write lands",
                Some(gva),
                format!("{value:#x} at gpa {want:#x}"),
                format!("{now:#x}"),
            ));
        }
        self.doms[d].hist.record(want, old);
        self.epoch += 1;
        if self.doms[d].dirty_on {
            self.doms[d].dirty_pending.insert(want >> 12);
            *self.doms[d].dirty_by.entry(want >> 12).or_default() |= BY_EMULATION;
        }
        Ok(Outcome::Ok(value))
    }
}
