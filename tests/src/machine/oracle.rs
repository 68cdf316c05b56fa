//! The oracle: judges the server after every step against the guest's tables.
//!
//! Checked after every step (see [`Machine::check`]):
//! - every translation a running vCPU could use, through its pCPU's TLB or
//!   through the shadow tables under its root, is one the guest's own tables
//!   allow now or allowed at some moment since that vCPU last flushed that
//!   address (a real TLB may still hold it); rights never wider; the frame is
//!   the one the memory map gives;
//! - an injected #PF is one the guest tables give, with the exact error code;
//! - the server wrote guest memory only to set A/D bits on the path of the
//!   access being served (D only on its leaf, only for a write), or to carry
//!   out an emulated write exactly;
//! - after an access through a translation whose guest entries did not change
//!   since the vCPU's last flush, the guest's A bits are set on every level
//!   and D on the leaf for a write;
//! - dirty logging is exact: every guest frame whose bytes changed since the
//!   previous harvest (by anyone: guest stores, the server's A/D updates in
//!   guest page tables, emulated writes) is in the next bitmap, compared by
//!   a digest of each frame's contents taken at every harvest; frames in
//!   the bitmap that did not change are allowed, counted
//!   ([`Stats`](super::Stats)) and listed ([`Machine::last_harvest`]); every
//!   frame the guest wrote (even with the value it held) is in it too;
//! - shadow tables live only in pool frames the server holds.

use super::{Harvest, Machine, Res, BY_EMULATION, BY_GUEST, BY_SERVER_AD};
use crate::arch::{self, fault_code, walk, Access, Rights, Size, Walk, PF_P};
use crate::ram::Ram;
use crate::tlb::Entry;
use alloc::collections::BTreeSet;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::Ordering;

/// A 64-bit digest of the 4 KiB frame `mfn` (0 if unreadable): the exact
/// dirty-log check compares frames by it, so it keeps 8 bytes per frame
/// (the image runs the same check over real frames, with a small heap).
pub(super) fn frame_digest(ram: Ram<'_>, mfn: u64) -> u64 {
    let mut h = 0x243f_6a88_85a3_08d3u64;
    for i in 0..512u64 {
        let w = ram.read((mfn << 12) + 8 * i).unwrap_or(0);
        h = (h.rotate_left(29) ^ w).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
    // SplitMix64's finaliser: every input bit reaches every output bit.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

fn rights_key(r: Rights) -> u8 {
    r.write as u8 | (r.user as u8) << 1 | (r.nx as u8) << 2
}

impl<'m> Machine<'m> {
    fn guest_read(&self, d: usize, k: Option<usize>) -> impl Fn(u64) -> Option<u64> + '_ {
        let dom = &self.doms[d];
        let ram = self.ram;
        move |gpa: u64| {
            let m = dom.mfn(gpa >> 12)?;
            let cur = ram.read((m << 12) | (gpa & 0xff8))?;
            Some(match k {
                Some(k) => dom.hist.value_at(gpa, k, cur),
                None => cur,
            })
        }
    }

    fn guest_walk_at(&self, v: usize, gva: u64, k: Option<usize>) -> Walk {
        let vc = &self.vcpus[v];
        walk(&self.guest_read(vc.dom, k), vc.cr3, gva, vc.ctrl)
    }

    /// The guest walk for `gva` on vCPU `v` now.
    pub fn guest_walk_now(&self, v: usize, gva: u64) -> Walk {
        self.guest_walk_at(v, gva, None)
    }

    fn window_start(&self, v: usize, gva: u64) -> usize {
        self.window_start_sized(v, gva, Size::K4)
    }

    /// The history state from which a translation of `gva` through a guest
    /// leaf of `size` may still be cached by vCPU `v`: its last full flush,
    /// or an INVLPG of any address inside that leaf's page (INVLPG drops the
    /// entries of every page size that contain its operand).
    fn window_start_sized(&self, v: usize, gva: u64, size: Size) -> usize {
        let vc = &self.vcpus[v];
        let base = gva & !(size.bytes() - 1);
        vc.invl
            .range(base..base + size.bytes())
            .map(|(_, &s)| s)
            .max()
            .unwrap_or(0)
            .max(vc.flush_seq)
    }

    /// Whether `pred` holds for the guest walk of `gva` in some state a TLB
    /// of vCPU `v` may still hold a translation from: the current one, or one
    /// that lasted until after the vCPU last flushed that address (for the
    /// page size the walk ends in). Returns the last state the walk it held
    /// for lasted to.
    fn search_state(
        &self,
        v: usize,
        gva: u64,
        pred: &mut dyn FnMut(&Walk) -> bool,
    ) -> Option<usize> {
        let d = self.vcpus[v].dom;
        let hist = &self.doms[d].hist;
        let now = hist.now();
        if pred(&self.guest_walk_at(v, gva, None)) {
            return Some(now);
        }
        let start = self.window_start(v, gva);
        let lasted = |w: &Walk, end: usize| match w {
            Walk::Ok(l) if l.size != Size::K4 => end >= self.window_start_sized(v, gva, l.size),
            _ => true,
        };
        let mut found = None;
        let mut w = self.guest_walk_at(v, gva, Some(start));
        for s in start..now {
            let a = hist.addr_of(s);
            if w.path().contains(&a) {
                // `w` held for states up to `s`.
                if lasted(&w, s) && pred(&w) {
                    found = Some(s);
                }
                w = self.guest_walk_at(v, gva, Some(s + 1));
            }
        }
        if lasted(&w, now) && pred(&w) {
            found = Some(now);
        }
        found
    }

    pub(super) fn search(&self, v: usize, gva: u64, pred: &mut dyn FnMut(&Walk) -> bool) -> bool {
        self.search_state(v, gva, pred).is_some()
    }

    /// Checks one usable translation `va` (aligned to `size`) -> `hpa` with
    /// `rights` of vCPU `v`.
    pub(super) fn check_translation(
        &mut self,
        v: usize,
        va: u64,
        size: Size,
        hpa: u64,
        rights: Rights,
        via: &str,
    ) -> Res<()> {
        let ctrl = self.vcpus[v].ctrl;
        let hw = self.hw_ctrl(v);
        let d = self.vcpus[v].dom;
        if size != Size::K4 {
            // Whole-leaf fast path: the guest maps the range with a leaf at
            // least as large, contiguous in the memory map.
            if let Walk::Ok(l) = self.guest_walk_now(v, va) {
                if l.size >= size && rights.within(hw, l.rights, ctrl) {
                    let gpa = l.phys(va);
                    let pages = size.bytes() >> 12;
                    if let Some((m, n)) = self.doms[d].contiguous(gpa >> 12, pages) {
                        if n == pages && m << 12 == hpa {
                            return Ok(());
                        }
                    }
                }
            }
            let sub = if size == Size::G1 { Size::M2 } else { Size::K4 };
            for i in 0..512u64 {
                let off = i * sub.bytes();
                self.check_translation(v, va + off, sub, hpa + off, rights, via)?;
            }
            return Ok(());
        }
        let key = (v, va, hpa, rights_key(rights));
        if self
            .cache
            .get(&key)
            .is_some_and(|&(k, sz)| k >= self.window_start_sized(v, va, sz))
        {
            return Ok(());
        }
        let dom = &self.doms[d];
        let mut leaf_size = Size::K4;
        let found = self.search_state(v, va, &mut |w| match w {
            Walk::Ok(l) => {
                let ok = rights.within(hw, l.rights, ctrl)
                    && dom.mfn(l.phys(va) >> 12) == Some(hpa >> 12);
                if ok {
                    leaf_size = l.size;
                }
                ok
            }
            _ => false,
        });
        match found {
            Some(k) => {
                self.cache.insert(key, (k, leaf_size));
                Ok(())
            }
            None => {
                let w = self.guest_walk_now(v, va);
                let expected = match w {
                    Walk::Ok(l) => {
                        let gpa = l.phys(va);
                        match dom.mfn(gpa >> 12) {
                            Some(m) => format!(
                                "gpa {gpa:#x} = hpa {:#x}, rights {} at most",
                                m << 12,
                                l.rights
                            ),
                            None => format!("no mapping: gpa {gpa:#x} is outside guest memory"),
                        }
                    }
                    Walk::Fault { ec, .. } => {
                        format!("no mapping: the guest walk faults (ec {ec:#x})")
                    }
                    Walk::Outside { addr, .. } => format!(
                        "no mapping: the guest walk reads gpa {addr:#x} outside guest memory"
                    ),
                };
                Err(self.fail(
                    &format!(
                        "translation allowed by the guest tables ({via}, vCPU {})",
                        self.vcpus[v].id.0
                    ),
                    Some(va),
                    expected,
                    format!(
                        "hpa {hpa:#x}{}, rights {rights}, {size:?}",
                        if dom.gfn_of(hpa >> 12).is_none() {
                            " (not a frame of this guest)"
                        } else {
                            ""
                        }
                    ),
                ))
            }
        }
    }

    pub(super) fn judge_injection(
        &self,
        v: usize,
        gva: u64,
        acc: Access,
        ec: u64,
        addr: u64,
    ) -> Res<()> {
        let ctrl = self.vcpus[v].ctrl;
        let now = self.guest_walk_now(v, gva);
        let dom = &self.doms[self.vcpus[v].dom];
        // A leaf outside guest memory: any #PF, unless the kernel emulates
        // MMIO (then only the permission fault the walk gives).
        let outside_leaf = |w: &Walk| {
            !ctrl.emulates_mmio()
                && matches!(w, Walk::Ok(l) if dom.mfn(l.phys(gva) >> 12).is_none())
        };
        let ok = addr == gva
            && if ec & PF_P == 0 {
                fault_code(&now, acc, ctrl) == Some(ec)
                    || matches!(now, Walk::Outside { .. })
                    || outside_leaf(&now)
            } else {
                self.search(v, gva, &mut |w| {
                    fault_code(w, acc, ctrl) == Some(ec)
                        || matches!(w, Walk::Outside { .. })
                        || outside_leaf(w)
                })
            };
        if ok {
            return Ok(());
        }
        let expected = match fault_code(&now, acc, ctrl) {
            Some(e) => format!("#PF ec {e:#x} at {gva:#x}"),
            None => format!("no fault ({} allowed: {now:?})", acc.name()),
        };
        Err(self.fail(
            "injected #PF is the one the guest tables give",
            Some(gva),
            expected,
            format!("#PF ec {ec:#x} at {addr:#x}"),
        ))
    }

    /// Judges an `Mmio` reply for `acc` at `gva`: the kernel must have asked
    /// for MMIO emulation (or paging is off), and the guest translation (now,
    /// or in a state a TLB may still hold) must allow the access and name
    /// `gpa`, which is not guest memory. `write` must be the access's.
    pub(super) fn judge_mmio(
        &self,
        v: usize,
        gva: u64,
        acc: Access,
        gpa: u64,
        write: bool,
    ) -> Res<()> {
        let ctrl = self.vcpus[v].ctrl;
        let dom = &self.doms[self.vcpus[v].dom];
        let ok = ctrl.emulates_mmio()
            && write == acc.write
            && dom.mfn(gpa >> 12).is_none()
            && self.search(v, gva, &mut |w| match w {
                Walk::Ok(l) => l.rights.allows(acc, ctrl) && l.phys(gva) == gpa,
                _ => false,
            });
        if ok {
            return Ok(());
        }
        let now = self.guest_walk_now(v, gva);
        let expected = match now {
            _ if !ctrl.emulates_mmio() => {
                String::from("no Mmio: the kernel did not ask for MMIO emulation")
            }
            Walk::Ok(l) if l.rights.allows(acc, ctrl) => match dom.mfn(l.phys(gva) >> 12) {
                Some(_) => format!("gpa {:#x} is guest RAM: a mapping", l.phys(gva)),
                None => format!("Mmio {{ gpa: {:#x}, write: {} }}", l.phys(gva), acc.write),
            },
            w => format!("#PF ec {:#x?} ({w:?})", fault_code(&w, acc, ctrl)),
        };
        Err(self.fail(
            "Mmio names the gpa the guest translation gives, outside RAM",
            Some(gva),
            expected,
            format!("Mmio {{ gpa: {gpa:#x}, write: {write} }}"),
        ))
    }

    /// After an access through a translation the guest tables give now and
    /// that did not change since the vCPU's last flush, the guest's A bits
    /// are set on every level and D on the leaf for a write.
    pub(super) fn check_guest_ad(&self, v: usize, gva: u64, acc: Access) -> Res<()> {
        let d = self.vcpus[v].dom;
        let Walk::Ok(l) = self.guest_walk_now(v, gva) else {
            return Ok(());
        };
        if !l.rights.allows(acc, self.vcpus[v].ctrl) {
            return Ok(());
        }
        let start = self.window_start(v, gva);
        let hist = &self.doms[d].hist;
        if l.path[..l.depth]
            .iter()
            .any(|&a| hist.last_write(a).is_some_and(|s| s >= start))
        {
            return Ok(());
        }
        for i in 0..l.depth {
            let e = self.peek(d, l.path[i]).unwrap_or(0);
            let leaf = i + 1 == l.depth;
            if e & arch::A == 0 || (leaf && acc.write && e & arch::D == 0) {
                return Err(self.fail(
                    "guest A/D bits set as hardware would",
                    Some(gva),
                    format!(
                        "A{} set in the guest entry at gpa {:#x}",
                        if leaf && acc.write { " and D" } else { "" },
                        l.path[i]
                    ),
                    format!("entry {e:#x}"),
                ));
            }
        }
        Ok(())
    }

    /// Judges the server's writes to guest memory during this step.
    fn check_foreign(&mut self) -> Res<()> {
        for fw in self.phys.take_foreign() {
            let mfn = fw.hpa >> 12;
            let Some((d, gfn)) = self
                .doms
                .iter()
                .enumerate()
                .find_map(|(i, dm)| dm.gfn_of(mfn).map(|g| (i, g)))
            else {
                return Err(self.fail(
                    "server writes only shadow pool and guest frames",
                    None,
                    String::from("no write here"),
                    format!("wrote {:#x} -> {:#x} at hpa {:#x}", fw.old, fw.new, fw.hpa),
                ));
            };
            let gpa = (gfn << 12) | (fw.hpa & 0xfff);
            if self
                .cur_emulated
                .iter()
                .any(|&(ed, eg, val)| ed == d && eg == gpa && val == fw.new)
            {
                continue;
            }
            let changed = fw.old ^ fw.new;
            let ad_only = changed & !(arch::A | arch::D) == 0 && fw.new & changed == changed;
            let on_path = self.cur_access.and_then(|(v, _, acc)| {
                if self.vcpus[v].dom != d {
                    return None;
                }
                let (path, ok) = &self.cur_path;
                let pos = path.iter().rposition(|&a| a == gpa)?;
                Some(*ok && pos + 1 == path.len() && acc.write)
            });
            let ok = ad_only
                && match on_path {
                    Some(d_ok) => changed & arch::D == 0 || d_ok,
                    None => false,
                };
            if ok && self.doms[d].dirty_on {
                *self.doms[d].dirty_by.entry(gfn).or_default() |= BY_SERVER_AD;
            }
            if !ok {
                return Err(self.fail(
                    "server changes guest memory only by setting A/D on the walked path",
                    self.cur_access.map(|c| c.1),
                    String::from("A on entries of this access's walk, D on its leaf for a write"),
                    format!("gpa {gpa:#x}: {:#x} -> {:#x}", fw.old, fw.new),
                ));
            }
        }
        if let Some((hpa, what)) = self.phys.take_bad().into_iter().next() {
            return Err(self.fail(
                "server uses memory as PhysMem allows",
                None,
                String::from("writes and frees only of frames it holds or guest frames"),
                format!("{what} at hpa {hpa:#x}"),
            ));
        }
        Ok(())
    }

    fn shadow_leaves(
        &self,
        v: usize,
        root: u64,
        out: &mut Vec<(u64, Size, u64, Rights, bool)>,
    ) -> Res<()> {
        let ctrl = self.vcpus[v].ctrl;
        let rsvd_high = ((1u64 << 52) - 1) & !((1u64 << arch::MAXPHYADDR) - 1);
        let mut stack: Vec<(u64, u32, u64, Rights)> = Vec::new();
        stack.push((
            root & arch::ADDR_MASK,
            4,
            0,
            Rights {
                write: true,
                user: true,
                nx: false,
            },
        ));
        while let Some((table, level, va, r)) = stack.pop() {
            if !self.phys.holds(table >> 12) {
                return Err(self.fail(
                    "shadow tables live in pool frames the server holds",
                    Some(va),
                    String::from("a held pool frame"),
                    format!(
                        "level-{level} shadow table at hpa {table:#x} (root {root:#x}, vCPU {})",
                        self.vcpus[v].id.0
                    ),
                ));
            }
            for i in 0..512u64 {
                let e = self.ram.read(table + i * 8).unwrap_or(0);
                if e & arch::P == 0 {
                    continue;
                }
                let leaf = level == 1 || (level <= 3 && e & arch::PS != 0);
                let mut rsvd = rsvd_high;
                if !ctrl.nxe {
                    rsvd |= arch::NX;
                }
                if level == 4 {
                    rsvd |= arch::PS;
                }
                if leaf && level > 1 {
                    rsvd |= ((1u64 << (12 + 9 * (level - 1))) - 1) & !0x1fff;
                }
                if e & rsvd != 0 {
                    continue;
                }
                let nva = arch::canonical(va | i << (12 + 9 * (level - 1)));
                let nr = Rights {
                    write: r.write && e & arch::RW != 0,
                    user: r.user && e & arch::US != 0,
                    nx: r.nx || (ctrl.nxe && e & arch::NX != 0),
                };
                if leaf {
                    let size = Size::of_level(level);
                    out.push((
                        nva,
                        size,
                        e & arch::ADDR_MASK & !(size.bytes() - 1),
                        nr,
                        e & arch::D != 0,
                    ));
                    if out.len() > 1 << 20 {
                        return Err(self.fail(
                            "shadow size",
                            None,
                            String::from("at most 2^20 leaves"),
                            String::from("more"),
                        ));
                    }
                } else {
                    stack.push((e & arch::ADDR_MASK, level - 1, nva, nr));
                }
            }
        }
        Ok(())
    }

    /// Where running vCPUs can write host frame `mfn` without a fault now
    /// (for failure reports).
    fn writable_paths(&self, mfn: u64) -> Vec<String> {
        let mut out = Vec::new();
        for (p, pc) in self.pcpus.iter().enumerate() {
            let Some(v) = pc.vcpu else { continue };
            for e in pc.tlb.all() {
                if e.rights.write
                    && e.dirty
                    && mfn >= e.hpa >> 12
                    && mfn < (e.hpa + e.size.bytes()) >> 12
                {
                    out.push(format!(
                        "TLB of pCPU {p} (vCPU key {}) va {:#x}",
                        e.vcpu, e.va
                    ));
                }
            }
            let Some(root) = self.vcpus[v].root else {
                continue;
            };
            let mut leaves = Vec::new();
            if self.shadow_leaves(v, root, &mut leaves).is_ok() {
                for (va, size, hpa, r, _) in leaves {
                    if r.write && mfn >= hpa >> 12 && mfn < (hpa + size.bytes()) >> 12 {
                        out.push(format!(
                            "shadow of vCPU {} on pCPU {p} (root {root:#x}) va {va:#x} {size:?}",
                            self.vcpus[v].id.0
                        ));
                    }
                }
            }
        }
        out
    }

    /// The oracle over the whole machine (run after every step).
    pub fn check(&mut self) -> Res<()> {
        self.check_foreign()?;
        let sig = (self.phys.shadow_writes.load(Ordering::SeqCst), self.epoch);
        for p in 0..self.pcpus.len() {
            let Some(v) = self.pcpus[p].vcpu else {
                continue;
            };
            if self.pcpus[p].checked == Some(sig) {
                continue;
            }
            let key = self.key(v);
            let entries: Vec<Entry> = self.pcpus[p].tlb.of(key);
            for e in entries {
                self.check_translation(
                    v,
                    e.va,
                    e.size,
                    e.hpa,
                    e.rights,
                    &format!("TLB of pCPU {p}"),
                )?;
            }
            if let (Some(root), false) = (self.vcpus[v].root, self.vcpus[v].need_root) {
                let mut leaves = Vec::new();
                self.shadow_leaves(v, root, &mut leaves)?;
                for &(va, size, hpa, r, _) in &leaves {
                    self.check_translation(
                        v,
                        va,
                        size,
                        hpa,
                        r,
                        &format!("shadow tables of pCPU {p}"),
                    )?;
                }
                // Speculative caching: the pCPU may have cached any of them.
                for (va, size, hpa, rights, dirty) in leaves {
                    self.pcpus[p].tlb.insert_if_free(Entry {
                        vcpu: key,
                        va,
                        size,
                        hpa,
                        rights,
                        dirty,
                    });
                }
            }
            self.pcpus[p].checked = Some(sig);
        }
        Ok(())
    }

    // ---- the exact dirty-log check -------------------------------------------

    /// The digest of every guest frame of domain `d`, in region order.
    pub(super) fn digests(&self, d: usize) -> Vec<u64> {
        let ram = self.ram;
        self.doms[d]
            .regions
            .iter()
            .flat_map(|&(_, mfn, pages)| (mfn..mfn + pages).map(move |m| frame_digest(ram, m)))
            .collect()
    }

    /// The exact check of one harvest of domain `d` that reported `set`:
    /// compares every guest frame with its digest at the previous harvest.
    pub(super) fn check_harvest(&mut self, d: usize, set: &BTreeSet<u64>) -> Res<()> {
        let now = self.digests(d);
        let dom = &self.doms[d];
        let gfns = dom
            .regions
            .iter()
            .flat_map(|&(gfn, _, pages)| gfn..gfn + pages);
        // A frame without a digest from before counts as changed.
        let changed: BTreeSet<u64> = gfns
            .zip(&now)
            .enumerate()
            .filter(|&(i, (_, now))| dom.dirty_digest.get(i) != Some(now))
            .map(|(_, (g, _))| g)
            .collect();
        let missing: Vec<u64> = changed.difference(set).copied().collect();
        let extra: BTreeSet<u64> = set.difference(&changed).copied().collect();
        self.stats.harvests += 1;
        self.stats.dirty_changed += changed.len() as u64;
        self.stats.dirty_extra += extra.len() as u64;
        if !missing.is_empty() {
            let mut who = String::new();
            for &g in &missing {
                let by = dom.dirty_by.get(&g).copied().unwrap_or(0);
                let names: Vec<&str> = [
                    (BY_GUEST, "guest stores"),
                    (BY_EMULATION, "emulated writes"),
                    (BY_SERVER_AD, "the server's A/D updates"),
                ]
                .iter()
                .filter(|(bit, _)| by & bit != 0)
                .map(|&(_, n)| n)
                .collect();
                who.push_str(&format!(
                    "; gfn {g:#x} changed by {}",
                    if names.is_empty() {
                        String::from("no recorded writer")
                    } else {
                        names.join(" and ")
                    }
                ));
            }
            let why = self.why_missing(d, &missing);
            return Err(self.fail(
                "dirty log holds every frame whose bytes changed since the previous harvest",
                None,
                format!(
                    "gfns {changed:x?} changed ({} reported unchanged)",
                    extra.len()
                ),
                format!("gfns {missing:x?} missing from {set:x?}{who}{why}"),
            ));
        }
        self.last_harvest = Some(Harvest { changed, extra });
        let dom = &mut self.doms[d];
        dom.dirty_digest = now;
        dom.dirty_by.clear();
        Ok(())
    }

    /// Where the frames `missing` from a bitmap of domain `d` are still
    /// writable without a fault (for failure reports).
    pub(super) fn why_missing(&self, d: usize, missing: &[u64]) -> String {
        let mut why = String::new();
        for &g in missing {
            if let Some(mfn) = self.doms[d].mfn(g) {
                for w in self.writable_paths(mfn) {
                    why.push_str(&format!("; gfn {g:#x} writable via {w}"));
                }
            }
        }
        why
    }
}
