//! Shadow-L4 policies (seed 000): one shared shadow root per guest L4
//! (KVM's way) or a per-pCPU copy of it (Xen's pt-shadow). The server is
//! generic over [`L4Policy`]; the registry picks one per name.

use abi::mem::PhysMem;
use abi::mmu::MmuError;
use abi::{CpuSet, Hpa, Mfn, PcpuId};

/// The canonical shadow L4 a vCPU needs: cache id, zap generation and frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RootRef {
    /// The server's shadow page id.
    pub sp: u32,
    /// Its zap generation.
    pub gen: u64,
    /// Its domain.
    pub domain: u32,
    /// Its frame (the canonical L4 entries live here).
    pub frame: Mfn,
}

/// How shadow L4s are handed to pCPUs.
pub trait L4Policy: Send + 'static {
    /// A policy with no state yet.
    fn new() -> Self;
    /// The root `pcpu` must load to run on the canonical shadow L4 `l4`.
    fn root(&mut self, mem: &dyn PhysMem, pcpu: PcpuId, l4: RootRef) -> Result<Hpa, MmuError>;
    /// Entry `idx` of the canonical L4 `l4` now holds `value`: bring every
    /// copy up to date. Returns the pCPUs whose copy changed.
    fn l4_written(&mut self, mem: &dyn PhysMem, l4: RootRef, idx: usize, value: u64) -> CpuSet;
    /// The canonical L4s of `domain` are gone (zapped, obsolete or the
    /// domain destroyed): drop every copy of them.
    fn forget_domain(&mut self, domain: u32);
    /// The pCPUs whose copy shadows `l4` (all pCPUs for a shared root).
    fn holders(&self, l4: RootRef) -> CpuSet;
    /// Pool pressure: returns to the pool the private frames of the pCPUs
    /// in `idle` (none of them runs a vCPU) that copy nothing valid.
    /// Returns how many frames were freed.
    fn release_idle(&mut self, mem: &dyn PhysMem, idle: CpuSet) -> usize;
    /// Frames the policy itself took from the pool and gave back (its own,
    /// beside the shadow pages), for `GetCounters`.
    fn frames_counted(&self) -> (u64, u64) {
        (0, 0)
    }
}

/// KVM's way: every vCPU whose guest CR3 names the same L4 runs on the same
/// shadow root; a change to it is seen by every pCPU at once.
#[derive(Debug, Default)]
pub struct SharedRoots;

impl L4Policy for SharedRoots {
    fn new() -> Self {
        SharedRoots
    }
    fn root(&mut self, _mem: &dyn PhysMem, _pcpu: PcpuId, l4: RootRef) -> Result<Hpa, MmuError> {
        Ok(l4.frame.base())
    }
    fn l4_written(&mut self, _: &dyn PhysMem, _: RootRef, _: usize, _: u64) -> CpuSet {
        CpuSet::EMPTY
    }
    fn forget_domain(&mut self, _domain: u32) {}
    fn holders(&self, _l4: RootRef) -> CpuSet {
        CpuSet(u64::MAX)
    }
    fn release_idle(&mut self, _mem: &dyn PhysMem, _idle: CpuSet) -> usize {
        0
    }
}

/// Xen's pt-shadow: each pCPU runs on its own copy of the canonical shadow
/// L4. Switching to the L4 a pCPU already copies is free; otherwise the 512
/// entries are copied. A write to a canonical L4 is pushed into every copy
/// of it, and only those pCPUs (intersected with the domain's dirty mask by
/// the caller) are asked to flush.
///
/// Invariant C1: while `copies[p]` names `l4`, the copy frame of `p` holds
/// exactly the 512 entries of `l4.frame` (every canonical L4 write goes
/// through [`L4Policy::l4_written`]).
#[derive(Debug)]
pub struct PerPcpuCopies {
    frames: [Option<Mfn>; 64],
    copies: [Option<RootRef>; 64],
    /// Copy frames taken from the pool and given back, ever.
    counted: (u64, u64),
}

impl L4Policy for PerPcpuCopies {
    fn new() -> Self {
        Self {
            frames: [None; 64],
            copies: [None; 64],
            counted: (0, 0),
        }
    }
    fn root(&mut self, mem: &dyn PhysMem, pcpu: PcpuId, l4: RootRef) -> Result<Hpa, MmuError> {
        let p = pcpu.0 as usize;
        if p >= 64 {
            return Err(MmuError::InvalidPcpu(pcpu));
        }
        let frame = match self.frames[p] {
            Some(f) => f,
            None => match mem.alloc_frame() {
                Some(f) => {
                    self.frames[p] = Some(f);
                    self.counted.0 += 1;
                    f
                }
                // No frame for a private copy: run on the canonical L4 (the
                // copy would mirror it exactly anyway).
                None => return Ok(l4.frame.base()),
            },
        };
        if self.copies[p] != Some(l4) {
            for i in 0..512u64 {
                let v = mem.read_u64(Hpa(l4.frame.base().0 + 8 * i))?;
                mem.write_u64(Hpa(frame.base().0 + 8 * i), v)?;
            }
            self.copies[p] = Some(l4);
        }
        Ok(frame.base())
    }
    fn l4_written(&mut self, mem: &dyn PhysMem, l4: RootRef, idx: usize, value: u64) -> CpuSet {
        let mut changed = CpuSet::EMPTY;
        for p in 0..64 {
            if self.copies[p] == Some(l4) {
                if let Some(f) = self.frames[p] {
                    // A failing write leaves the copy stale: drop it, so the
                    // next schedule re-copies.
                    if mem
                        .write_u64(Hpa(f.base().0 + 8 * idx as u64), value)
                        .is_err()
                    {
                        self.copies[p] = None;
                    }
                    changed.insert(PcpuId(p as u32));
                }
            }
        }
        changed
    }
    fn forget_domain(&mut self, domain: u32) {
        for c in self.copies.iter_mut() {
            if c.is_some_and(|r| r.domain == domain) {
                *c = None;
            }
        }
    }
    fn release_idle(&mut self, mem: &dyn PhysMem, idle: CpuSet) -> usize {
        let mut n = 0;
        for p in idle.iter() {
            let p = p.0 as usize;
            if p < 64 && self.copies[p].is_none() {
                if let Some(f) = self.frames[p].take() {
                    let ok = mem.free_frame(f).is_ok();
                    self.counted.1 += u64::from(ok);
                    n += usize::from(ok);
                }
            }
        }
        n
    }
    fn frames_counted(&self) -> (u64, u64) {
        self.counted
    }
    fn holders(&self, l4: RootRef) -> CpuSet {
        let mut s = CpuSet::EMPTY;
        for (p, c) in self.copies.iter().enumerate() {
            if *c == Some(l4) {
                s.insert(PcpuId(p as u32));
            }
        }
        s
    }
}
