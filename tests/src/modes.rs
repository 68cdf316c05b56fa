//! Scripted scenarios for paging modes: paging off (the identity shadow over
//! the memory map), `Mmio` replies, and the switches between paging off and
//! long mode, judged by the oracle after every step.
//!
//! The layout of an unmodified Multiboot guest: RAM in two regions with a
//! hole between them (gfns 64..128), the local APIC at [`APIC`] outside both.

use crate::arch::{Access, Ctrl, Size, P, PF_P, PF_U, PF_W, US};
use crate::machine::{Machine, Outcome, Res, DIRECT};
use crate::scenarios::{any_flt, boot, expect, flt, rd, wr, Want, USER};
use abi::{Gva, MmuError};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

/// The local APIC's guest-physical base: never RAM.
pub const APIC: u64 = 0xfee0_0000;
/// The first guest frame of the hole between the two RAM regions.
const HOLE: u64 = 64;
/// The first guest frame of the second RAM region.
const HIGH: u64 = 128;

const FULL: u64 = P | crate::arch::RW | US;

/// A domain with RAM at gfns `0..64` and `128..192` (no RAM between) and
/// `n` vCPUs with paging off on pCPUs `0..n`.
fn boot_off(m: &mut Machine<'_>, n: usize) -> Res<(usize, Vec<usize>)> {
    let d = m.create_domain(&[(0, HOLE), (HIGH, 64)])?;
    let mut vs = Vec::new();
    for i in 0..n {
        let v = m.create_vcpu(d, Ctrl::OFF)?;
        m.schedule(v, i)?;
        vs.push(v);
    }
    Ok((d, vs))
}

/// Demands that the guest word at `gpa` of domain `d` holds `want`.
fn holds(m: &Machine<'_>, d: usize, gpa: u64, want: u64) -> Res<()> {
    match m.peek(d, gpa) {
        Some(x) if x == want => Ok(()),
        x => Err(m.fail(
            "guest memory",
            None,
            format!("{want:#x} at gpa {gpa:#x}"),
            format!("{x:x?}"),
        )),
    }
}

/// Paging off from creation: RAM in both regions translates to itself for
/// every kind of access, the hole and the APIC get `Mmio`, 4 GiB and above
/// is refused, a CR3 write changes nothing, dirty logging works.
pub(crate) fn paging_off(m: &mut Machine<'_>) -> Res<()> {
    let (d, vs) = boot_off(m, 2)?;
    let (v, w) = (vs[0], vs[1]);
    wr(m, v, 0x1008, 0x11)?;
    rd(m, v, 0x1008, 0x11)?;
    holds(m, d, 0x1008, 0x11)?;
    let high = (HIGH << 12) + 0xff8;
    wr(m, v, high, 0x22)?;
    rd(m, w, high, 0x22)?;
    holds(m, d, high, 0x22)?;
    for (i, acc) in Access::ALL.into_iter().enumerate() {
        let va = 0x2000 + 8 * i as u64;
        expect(m, v, va, acc, 5, Want::Ok)?;
    }
    // Not RAM: the hole, the APIC, just past the last region.
    for gpa in [HOLE << 12, (HIGH << 12) - 8, APIC + 0xb0, (HIGH + 64) << 12] {
        expect(m, v, gpa, Access::READ, 0, Want::Mmio(gpa))?;
        expect(m, w, gpa, Access::WRITE, 1, Want::Mmio(gpa))?;
        expect(m, v, gpa, Access::UFETCH, 0, Want::Mmio(gpa))?;
    }
    rd(m, v, 0x1008, 0x11)?;
    // A 32-bit guest cannot fault at 4 GiB.
    let out = m.access(v, 1 << 32, Access::READ, 0)?;
    if out != Outcome::Refused(MmuError::FaultOutsideMode(Gva(1 << 32))) {
        return Err(m.fail(
            "paging off: a fault at 4 GiB",
            Some(1 << 32),
            String::from("Refused(FaultOutsideMode(4 GiB))"),
            format!("{out:?}"),
        ));
    }
    // CR3 is only recorded (it holds garbage here).
    m.write_cr3(v, 0x3000)?;
    rd(m, v, 0x1008, 0x11)?;
    rd(m, v, high, 0x22)?;
    // Dirty logging: written frames are logged, again after a harvest.
    m.enable_dirty(d)?;
    wr(m, v, 0x5000, 1)?;
    rd(m, w, 0x6000, 0)?;
    for round in 0..2 {
        let got = m.get_dirty(d)?;
        if !got.contains(&5) {
            return Err(m.fail(
                "dirty log with paging off",
                Some(0x5000),
                String::from("gfn 5 logged"),
                format!("round {round}: {got:x?}"),
            ));
        }
        wr(m, w, 0x5008, 2 + round)?;
    }
    m.get_dirty(d).map(|_| ())
}

/// Paging off -> long mode as an unmodified guest does it: tables built
/// through the identity, CR3 written while paging is off, then paging on.
/// The identity translations must not survive the switch; accesses outside
/// RAM the tables allow get `Mmio`, forbidden ones their #PF.
pub(crate) fn paging_on(m: &mut Machine<'_>) -> Res<()> {
    let (d, vs) = boot_off(m, 1)?;
    let v = vs[0];
    let data = m.alloc_gfn(d) << 12;
    wr(m, v, data, 0x55)?;
    rd(m, v, data + 8, 0)?;
    let cr3 = m.new_space(d, Some(v))?;
    m.map(d, Some(v), cr3, USER, data, Size::K4, FULL)?;
    m.map(d, Some(v), cr3, USER + 0x1000, APIC, Size::K4, FULL)?;
    m.map(d, Some(v), cr3, USER + 0x2000, APIC, Size::K4, P | US)?;
    m.map(
        d,
        Some(v),
        cr3,
        USER + 0x3000,
        (HOLE + 2) << 12,
        Size::K4,
        P,
    )?;
    m.write_cr3(v, cr3)?;
    rd(m, v, data, 0x55)?;
    m.set_mode(v, Ctrl::LONG_MMIO)?;
    // The identity is gone: the tables map nothing at `data`.
    flt(m, v, data, Access::READ, 0)?;
    rd(m, v, USER, 0x55)?;
    rd(m, v, DIRECT + data, 0x55)?;
    wr(m, v, USER + 8, 0x66)?;
    holds(m, d, data + 8, 0x66)?;
    expect(
        m,
        v,
        USER + 0x10b0,
        Access::WRITE,
        0,
        Want::Mmio(APIC + 0xb0),
    )?;
    expect(
        m,
        v,
        USER + 0x1020,
        Access::UREAD,
        0,
        Want::Mmio(APIC + 0x20),
    )?;
    flt(m, v, USER + 0x2000, Access::WRITE, PF_P | PF_W)?;
    expect(
        m,
        v,
        USER + 0x2030,
        Access::UREAD,
        0,
        Want::Mmio(APIC + 0x30),
    )?;
    flt(m, v, USER + 0x3000, Access::UREAD, PF_P | PF_U)?;
    expect(
        m,
        v,
        USER + 0x3000,
        Access::READ,
        0,
        Want::Mmio((HOLE + 2) << 12),
    )?;
    // A table outside RAM stays a guest error (#PF, no Mmio).
    m.map(d, Some(v), cr3, USER + 0x4000_0000, data, Size::K4, FULL)?;
    let Some(pd) = m.entry_addr(d, cr3, USER + 0x4000_0000, 3) else {
        return Err(m.fail(
            "scenario",
            None,
            String::from("a PDPT entry"),
            String::from("none"),
        ));
    };
    m.guest_write(d, Some(v), pd, (HOLE << 12) | FULL)?;
    m.invlpg(v, USER + 0x4000_0000)?;
    any_flt(m, v, USER + 0x4000_0000, Access::READ)
}

/// Long mode -> paging off -> long mode -> paging off, moving between two
/// pCPUs: no translation of the mode left survives on either pCPU (a stale
/// entry on the pCPU the vCPU comes back to is caught there).
pub(crate) fn paging_off_again(m: &mut Machine<'_>) -> Res<()> {
    let b = boot(m, 64, 1, 0)?;
    let v = b.vcpus[0];
    m.set_mode(v, Ctrl::LONG_MMIO)?;
    let data = m.alloc_gfn(b.d) << 12;
    m.map(b.d, Some(v), b.cr3, USER, data, Size::K4, FULL)?;
    wr(m, v, USER, 7)?;
    for round in 0..2u64 {
        m.set_mode(v, Ctrl::OFF)?;
        // USER (1 GiB) is no RAM of this 64-page guest.
        expect(m, v, USER, Access::READ, 0, Want::Mmio(USER))?;
        rd(m, v, data, 7 + round)?;
        m.schedule(v, 1)?;
        rd(m, v, data, 7 + round)?;
        wr(m, v, data, 8 + round)?;
        m.set_mode(v, Ctrl::LONG_MMIO)?;
        rd(m, v, USER, 8 + round)?;
        m.schedule(v, 0)?;
        flt(m, v, data, Access::READ, 0)?;
        rd(m, v, USER, 8 + round)?;
    }
    Ok(())
}

/// Two vCPUs of one domain in different modes: the one with paging off
/// edits the other's page tables through the identity (write-protected
/// tables are emulated), and each sees the other's data.
pub(crate) fn modes_mixed(m: &mut Machine<'_>) -> Res<()> {
    let b = boot(m, 64, 2, 0)?;
    let (v, w) = (b.vcpus[0], b.vcpus[1]);
    let data = m.alloc_gfn(b.d) << 12;
    m.map(b.d, Some(v), b.cr3, USER, data, Size::K4, FULL)?;
    wr(m, v, USER, 1)?;
    m.set_mode(w, Ctrl::OFF)?;
    rd(m, w, data, 1)?;
    wr(m, w, data + 8, 2)?;
    rd(m, v, USER + 8, 2)?;
    // `w` makes `v`'s leaf read-only through the identity; `v` flushes.
    let Some(ea) = m.entry_addr(b.d, b.cr3, USER, 1) else {
        return Err(m.fail(
            "scenario",
            Some(USER),
            String::from("a PTE"),
            String::from("none"),
        ));
    };
    let old = m.peek(b.d, ea).unwrap_or(0);
    wr(m, w, ea, old & !crate::arch::RW)?;
    m.invlpg(v, USER)?;
    flt(m, v, USER, Access::WRITE, PF_P | PF_W)?;
    rd(m, v, USER, 1)?;
    // And writable again, from the identity; `v` may write after a flush.
    wr(m, w, ea, old)?;
    m.invlpg(v, USER)?;
    wr(m, v, USER, 3)?;
    rd(m, w, data, 3)?;
    m.set_mode(w, Ctrl::DEFAULT)?;
    m.write_cr3(w, b.cr3)?;
    rd(m, w, USER, 3)
}
