//! The scripted scenarios: each builds guests, runs accesses and page-table
//! edits through the machine (which checks the oracle after every step) and
//! asserts the outcomes a correct MMU must give (for liveness: an access the
//! guest tables allow must complete, one they forbid must fault exactly).

use crate::arch::{
    self, Access, Ctrl, Size, A, D, NX, P, PF_I, PF_P, PF_RSVD, PF_U, PF_W, PS, RW, US,
};
use crate::machine::{Machine, Outcome, Res, DIRECT};
use crate::modes::{modes_mixed, paging_off, paging_off_again, paging_on};
use abi::{MmuError, MmuReply, MmuRequest, PROTOCOL_VERSION};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

/// One scripted scenario.
pub struct Scenario {
    /// Its name (also the failure's `scenario`).
    pub name: &'static str,
    /// What it exercises.
    pub about: &'static str,
    /// The script.
    pub run: fn(&mut Machine<'_>) -> Res<()>,
}

/// Where user data lives in the scenarios' address spaces.
pub const USER: u64 = 0x4000_0000;
/// Pages of guest RAM a default domain gets (gfn 0 up).
pub const RAM_PAGES: u64 = 512;

const FULL: u64 = P | RW | US;

/// The outcome a scenario demands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    /// The access completes.
    Ok,
    /// The access completes and reads this value.
    Reads(u64),
    /// The guest gets #PF with this error code.
    Fault(u64),
    /// The guest gets #PF with some error code (the address is outside its
    /// memory: the architecture gives no fault, the platform must).
    AnyFault,
    /// The server answers `Mmio` for this guest-physical address (the
    /// kernel emulates MMIO and the address is not RAM).
    Mmio(u64),
}

/// Runs an access and demands `want`.
pub fn expect(
    m: &mut Machine<'_>,
    v: usize,
    gva: u64,
    acc: Access,
    value: u64,
    want: Want,
) -> Res<u64> {
    let out = m.access(v, gva, acc, value)?;
    let good = match (want, out) {
        (Want::Ok, Outcome::Ok(_)) | (Want::AnyFault, Outcome::Fault(_)) => true,
        (Want::Reads(x), Outcome::Ok(y)) => x == y,
        (Want::Fault(e), Outcome::Fault(f)) => e == f,
        (Want::Mmio(a), Outcome::Mmio(b)) => a == b,
        _ => false,
    };
    if !good {
        return Err(m.fail(
            &format!("{} outcome", acc.name()),
            Some(gva),
            format!("{want:?}"),
            format!("{out:?}"),
        ));
    }
    Ok(match out {
        Outcome::Ok(x) => x,
        _ => 0,
    })
}

pub(crate) fn wr(m: &mut Machine<'_>, v: usize, gva: u64, val: u64) -> Res<()> {
    expect(m, v, gva, Access::WRITE, val, Want::Ok).map(|_| ())
}
pub(crate) fn rd(m: &mut Machine<'_>, v: usize, gva: u64, val: u64) -> Res<()> {
    expect(m, v, gva, Access::READ, 0, Want::Reads(val)).map(|_| ())
}
pub(crate) fn flt(m: &mut Machine<'_>, v: usize, gva: u64, acc: Access, ec: u64) -> Res<()> {
    expect(m, v, gva, acc, 0x5a5a, Want::Fault(ec)).map(|_| ())
}
pub(crate) fn any_flt(m: &mut Machine<'_>, v: usize, gva: u64, acc: Access) -> Res<()> {
    expect(m, v, gva, acc, 0x5a5a, Want::AnyFault).map(|_| ())
}

/// A booted domain: its index, vCPUs (vCPU i on pCPU i) and first CR3.
pub struct Booted {
    /// Domain index.
    pub d: usize,
    /// vCPU indices.
    pub vcpus: Vec<usize>,
    /// The shared address space (gpa of the PML4).
    pub cr3: u64,
}

/// Creates a domain with `pages` of RAM at gfn 0, one address space with the
/// direct map, and `n` vCPUs running on pCPUs `first..first+n` in it.
pub fn boot(m: &mut Machine<'_>, pages: u64, n: usize, first: usize) -> Res<Booted> {
    let d = m.create_domain(&[(0, pages)])?;
    let cr3 = m.new_space(d, None)?;
    let mut vcpus = Vec::new();
    for i in 0..n {
        let v = m.create_vcpu(d, Ctrl::DEFAULT)?;
        m.schedule(v, first + i)?;
        m.write_cr3(v, cr3)?;
        vcpus.push(v);
    }
    Ok(Booted { d, vcpus, cr3 })
}

/// A new address space of `d` sharing the kernel half (the direct map's
/// PML4 entry) of `master`, built by vCPU `via`.
pub fn new_process(m: &mut Machine<'_>, d: usize, via: usize, master: u64) -> Res<u64> {
    let cr3 = m.alloc_gfn(d) << 12;
    let slot = arch::index(DIRECT, 4) * 8;
    let e = m.peek(d, master + slot).unwrap_or(0);
    m.guest_write(d, Some(via), cr3 + slot, e)?;
    Ok(cr3)
}

/// Maps `pages` fresh data pages at `va` (through vCPU `v`); returns gfns.
fn map_data(
    m: &mut Machine<'_>,
    b: &Booted,
    v: usize,
    va: u64,
    pages: u64,
    flags: u64,
) -> Res<Vec<u64>> {
    let mut g = Vec::new();
    for i in 0..pages {
        let gfn = m.alloc_gfn(b.d);
        m.map(
            b.d,
            Some(v),
            m.cr3(v),
            va + i * 4096,
            gfn << 12,
            Size::K4,
            flags,
        )?;
        g.push(gfn);
    }
    Ok(g)
}

/// Rewrites the guest entry mapping `va` at `level` (in `v`'s tables).
fn set_entry(
    m: &mut Machine<'_>,
    d: usize,
    v: usize,
    va: u64,
    level: u32,
    f: impl Fn(u64) -> u64,
) -> Res<u64> {
    let Some(ea) = m.entry_addr(d, m.cr3(v), va, level) else {
        return Err(m.fail(
            "scenario",
            Some(va),
            format!("a level-{level} entry"),
            String::from("none"),
        ));
    };
    let old = m.peek(d, ea).unwrap_or(0);
    m.guest_write(d, Some(v), ea, f(old))?;
    Ok(ea)
}

// ---- the protocol ------------------------------------------------------------

fn handshake(m: &mut Machine<'_>) -> Res<()> {
    let r = m.hello(PROTOCOL_VERSION)?;
    if r != (MmuReply::Welcome {
        version: PROTOCOL_VERSION,
    }) {
        return Err(m.fail(
            "Hello",
            None,
            format!("Welcome {{ version: {PROTOCOL_VERSION} }}"),
            format!("{r:?}"),
        ));
    }
    for bad in [0, PROTOCOL_VERSION + 1, u32::MAX] {
        let r = m.hello(bad)?;
        let want = MmuReply::error(MmuError::VersionMismatch {
            requested: bad,
            supported: PROTOCOL_VERSION,
        });
        if r != want {
            return Err(m.fail(
                "Hello with a wrong version",
                None,
                format!("{want:?}"),
                format!("{r:?}"),
            ));
        }
    }
    Ok(())
}

fn malformed(m: &mut Machine<'_>) -> Res<()> {
    let b = boot(m, 64, 1, 0)?;
    let mut good = [0u8; abi::MAX_MESSAGE];
    let n = abi::encode(
        &MmuRequest::ZapAll {
            domain: abi::DomainId(1),
        },
        &mut good,
    )
    .unwrap_or(0);
    let mut cases: Vec<Vec<u8>> = alloc::vec![
        Vec::new(),
        alloc::vec![0xff],
        alloc::vec![0xff; 40],
        alloc::vec![0x80; 12],
        good[..n - 1].to_vec(),
    ];
    let mut trailing = good[..n].to_vec();
    trailing.push(0);
    cases.push(trailing);
    cases.push(alloc::vec![0u8; abi::MAX_MESSAGE + 1]);
    // A PageFault with a truncated error code.
    let mut pf = [0u8; abi::MAX_MESSAGE];
    let k = abi::encode(
        &MmuRequest::PageFault {
            vcpu: abi::VcpuId(1),
            pcpu: abi::PcpuId(0),
            gva: abi::Gva(0x1000),
            error_code: abi::PfErrorCode(2),
        },
        &mut pf,
    )
    .unwrap_or(0);
    cases.push(pf[..k - 1].to_vec());
    for c in cases {
        let r = m.call_raw(&c)?;
        if !matches!(
            r,
            MmuReply::Error {
                reason: MmuError::Malformed(_),
                ..
            }
        ) {
            return Err(m.fail(
                "malformed bytes get an Error reply",
                None,
                String::from("Error { Malformed }"),
                format!("{r:?} for {c:02x?}"),
            ));
        }
    }
    // The server still works.
    let g = map_data(m, &b, b.vcpus[0], USER, 1, FULL)?;
    let _ = g;
    wr(m, b.vcpus[0], USER, 7)?;
    rd(m, b.vcpus[0], USER, 7)
}

fn bad_ids(m: &mut Machine<'_>) -> Res<()> {
    let b = boot(m, 64, 1, 0)?;
    let checks: [(MmuRequest, &str); 5] = [
        (
            MmuRequest::CreateDomain {
                domain: abi::DomainId(1),
                memory: abi::MemoryMap::new(),
            },
            "existing domain",
        ),
        (
            MmuRequest::CreateVcpu {
                domain: abi::DomainId(77),
                vcpu: abi::VcpuId(99),
            },
            "unknown domain",
        ),
        (
            MmuRequest::PageFault {
                vcpu: abi::VcpuId(99),
                pcpu: abi::PcpuId(0),
                gva: abi::Gva(0),
                error_code: abi::PfErrorCode(0),
            },
            "unknown vCPU",
        ),
        (
            MmuRequest::VcpuScheduled {
                vcpu: abi::VcpuId(1),
                pcpu: abi::PcpuId(64),
            },
            "pCPU 64",
        ),
        (
            MmuRequest::ZapAll {
                domain: abi::DomainId(55),
            },
            "unknown domain",
        ),
    ];
    for (req, what) in checks {
        let r = m.call(&req)?;
        if !matches!(r, MmuReply::Error { .. }) {
            return Err(m.fail(
                &format!("{what} is refused"),
                None,
                String::from("Error"),
                format!("{r:?} for {req:?}"),
            ));
        }
    }
    // An emulated write of a bad size, and one crossing a page.
    for (gpa, size) in [(0x1000u64, 3u8), (0x1ffc, 8)] {
        let r = m.call(&MmuRequest::EmulatedWrite {
            vcpu: abi::VcpuId(1),
            pcpu: abi::PcpuId(0),
            gpa: abi::Gpa(gpa),
            value: 0,
            size,
        })?;
        if !matches!(r, MmuReply::Error { .. }) {
            return Err(m.fail(
                "bad emulated write is refused",
                None,
                String::from("Error"),
                format!("{r:?}"),
            ));
        }
    }
    map_data(m, &b, b.vcpus[0], USER, 1, FULL)?;
    wr(m, b.vcpus[0], USER, 1)
}

// ---- demand paging and permissions --------------------------------------------

fn demand_paging(m: &mut Machine<'_>) -> Res<()> {
    let b = boot(m, 256, 1, 0)?;
    let v = b.vcpus[0];
    map_data(m, &b, v, USER, 64, FULL)?;
    for i in 0..64 {
        wr(m, v, USER + i * 4096 + 8 * i, 0x1000 + i)?;
    }
    for i in 0..64 {
        rd(m, v, USER + i * 4096 + 8 * i, 0x1000 + i)?;
    }
    // Beyond the mapping: not present.
    flt(m, v, USER + 64 * 4096, Access::READ, 0)?;
    flt(m, v, USER + 64 * 4096, Access::UWRITE, PF_W | PF_U)
}

fn user_supervisor(m: &mut Machine<'_>) -> Res<()> {
    let b = boot(m, 64, 1, 0)?;
    let v = b.vcpus[0];
    map_data(m, &b, v, USER, 1, P | RW | US)?;
    map_data(m, &b, v, USER + 0x1000, 1, P | RW)?;
    expect(m, v, USER, Access::UWRITE, 3, Want::Ok)?;
    expect(m, v, USER, Access::UREAD, 0, Want::Reads(3))?;
    flt(m, v, USER + 0x1000, Access::UREAD, PF_P | PF_U)?;
    flt(m, v, USER + 0x1000, Access::UWRITE, PF_P | PF_U | PF_W)?;
    wr(m, v, USER + 0x1000, 4)?;
    // The direct map is supervisor-only.
    flt(m, v, DIRECT, Access::UREAD, PF_P | PF_U)
}

fn read_only(m: &mut Machine<'_>) -> Res<()> {
    let b = boot(m, 64, 1, 0)?;
    let v = b.vcpus[0];
    map_data(m, &b, v, USER, 1, P | US)?;
    rd(m, v, USER, 0)?;
    flt(m, v, USER, Access::WRITE, PF_P | PF_W)?;
    flt(m, v, USER, Access::UWRITE, PF_P | PF_W | PF_U)?;
    // A read-only intermediate level makes the whole subtree read-only.
    map_data(m, &b, v, USER + 0x20_0000, 1, FULL)?;
    wr(m, v, USER + 0x20_0000, 1)?;
    set_entry(m, b.d, v, USER + 0x20_0000, 2, |e| e & !RW)?;
    m.invlpg(v, USER + 0x20_0000)?;
    flt(m, v, USER + 0x20_0000, Access::WRITE, PF_P | PF_W)
}

fn write_protect_off(m: &mut Machine<'_>) -> Res<()> {
    let b = boot(m, 64, 1, 0)?;
    let v = b.vcpus[0];
    map_data(m, &b, v, USER, 1, P | US)?;
    flt(m, v, USER, Access::WRITE, PF_P | PF_W)?;
    m.set_mode(
        v,
        Ctrl {
            wp: false,
            ..Ctrl::DEFAULT
        },
    )?;
    wr(m, v, USER, 9)?;
    rd(m, v, USER, 9)?;
    flt(m, v, USER, Access::UWRITE, PF_P | PF_W | PF_U)?;
    m.set_mode(v, Ctrl::DEFAULT)?;
    flt(m, v, USER, Access::WRITE, PF_P | PF_W)
}

fn no_execute(m: &mut Machine<'_>) -> Res<()> {
    let b = boot(m, 64, 1, 0)?;
    let v = b.vcpus[0];
    map_data(m, &b, v, USER, 1, FULL | NX)?;
    map_data(m, &b, v, USER + 0x1000, 1, P | US)?;
    rd(m, v, USER, 0)?;
    flt(m, v, USER, Access::UFETCH, PF_P | PF_U | PF_I)?;
    flt(m, v, USER, Access::FETCH, PF_P | PF_I)?;
    expect(m, v, USER + 0x1000, Access::UFETCH, 0, Want::Ok)?;
    // NX on an upper level only.
    map_data(m, &b, v, USER + 0x4000_0000, 1, FULL)?;
    expect(m, v, USER + 0x4000_0000, Access::FETCH, 0, Want::Ok)?;
    set_entry(m, b.d, v, USER + 0x4000_0000, 3, |e| e | NX)?;
    m.invlpg(v, USER + 0x4000_0000)?;
    flt(m, v, USER + 0x4000_0000, Access::FETCH, PF_P | PF_I)?;
    // With NXE off, NX is a reserved bit; fetches are not reported as such.
    m.set_mode(
        v,
        Ctrl {
            nxe: false,
            ..Ctrl::DEFAULT
        },
    )?;
    flt(m, v, USER, Access::UREAD, PF_P | PF_RSVD | PF_U)?;
    expect(m, v, USER + 0x1000, Access::UFETCH, 0, Want::Ok).map(|_| ())
}

fn reserved_bits(m: &mut Machine<'_>) -> Res<()> {
    let b = boot(m, 128, 1, 0)?;
    let v = b.vcpus[0];
    let gs = map_data(m, &b, v, USER, 4, FULL)?;
    // Bit 51 in a leaf, in an L2 entry; PS in the PML4; low bits of a 2 MiB leaf.
    set_entry(m, b.d, v, USER, 1, |e| e | 1 << 51)?;
    m.invlpg(v, USER)?;
    flt(m, v, USER, Access::READ, PF_P | PF_RSVD)?;
    flt(m, v, USER, Access::UWRITE, PF_P | PF_RSVD | PF_U | PF_W)?;
    wr(m, v, USER + 0x1000, 5)?;
    let l2 = set_entry(m, b.d, v, USER + 0x1000, 2, |e| e | 1 << 50)?;
    m.invlpg(v, USER + 0x1000)?;
    flt(m, v, USER + 0x1000, Access::READ, PF_P | PF_RSVD)?;
    let e = m.peek(b.d, l2).unwrap_or(0);
    m.guest_write(b.d, Some(v), l2, e & !(1 << 50))?;
    m.invlpg(v, USER + 0x1000)?;
    rd(m, v, USER + 0x1000, 5)?;
    // A 2 MiB leaf with bit 13 set.
    let va2 = USER + 0x80_0000;
    m.map(
        b.d,
        Some(v),
        b.cr3,
        va2,
        0x20_0000 | 1 << 13,
        Size::M2,
        FULL,
    )?;
    flt(m, v, va2 + 0x3000, Access::READ, PF_P | PF_RSVD)?;
    // PS in a PML4 entry.
    let va4 = 0x0000_0100_0000_0000u64;
    m.map(b.d, Some(v), b.cr3, va4, gs[2] << 12, Size::K4, FULL)?;
    rd(m, v, va4, 0)?;
    set_entry(m, b.d, v, va4, 4, |e| e | PS)?;
    m.invlpg(v, va4)?;
    flt(m, v, va4, Access::READ, PF_P | PF_RSVD)
}

// ---- changing mappings ---------------------------------------------------------

fn downgrade_invlpg(m: &mut Machine<'_>) -> Res<()> {
    let b = boot(m, 64, 1, 0)?;
    let v = b.vcpus[0];
    map_data(m, &b, v, USER, 2, FULL)?;
    wr(m, v, USER, 1)?;
    wr(m, v, USER + 0x1000, 2)?;
    set_entry(m, b.d, v, USER, 1, |e| e & !RW)?;
    m.invlpg(v, USER)?;
    flt(m, v, USER, Access::WRITE, PF_P | PF_W)?;
    rd(m, v, USER, 1)?;
    wr(m, v, USER + 0x1000, 3)?;
    // Now drop user access too.
    set_entry(m, b.d, v, USER, 1, |e| e & !US)?;
    m.invlpg(v, USER)?;
    flt(m, v, USER, Access::UREAD, PF_P | PF_U)
}

fn downgrade_late_invlpg(m: &mut Machine<'_>) -> Res<()> {
    let b = boot(m, 64, 1, 0)?;
    let v = b.vcpus[0];
    map_data(m, &b, v, USER, 1, FULL)?;
    wr(m, v, USER, 1)?;
    set_entry(m, b.d, v, USER, 1, |e| e & !RW)?;
    // Before the INVLPG the old translation may still be used (or not).
    let _ = m.access(v, USER, Access::WRITE, 2)?;
    let now = read_back(m, b.d, v, USER);
    rd(m, v, USER, now)?;
    m.invlpg(v, USER)?;
    flt(m, v, USER, Access::WRITE, PF_P | PF_W)
}

fn read_back(m: &Machine<'_>, d: usize, v: usize, va: u64) -> u64 {
    match m.guest_walk_now(v, va) {
        arch::Walk::Ok(l) => m.peek(d, l.phys(va)).unwrap_or(0),
        _ => 0,
    }
}

fn upgrade(m: &mut Machine<'_>) -> Res<()> {
    let b = boot(m, 64, 1, 0)?;
    let v = b.vcpus[0];
    map_data(m, &b, v, USER, 1, P | US)?;
    rd(m, v, USER, 0)?;
    set_entry(m, b.d, v, USER, 1, |e| e | RW)?;
    // No INVLPG: a spurious fault is allowed, but after it the write must go.
    match m.access(v, USER, Access::WRITE, 4)? {
        Outcome::Ok(_) | Outcome::Fault(_) => {}
        o => {
            return Err(m.fail(
                "write after upgrade",
                Some(USER),
                String::from("Ok or #PF"),
                format!("{o:?}"),
            ))
        }
    }
    m.invlpg(v, USER)?;
    wr(m, v, USER, 5)?;
    rd(m, v, USER, 5)
}

fn unmap_reuse(m: &mut Machine<'_>) -> Res<()> {
    let b = boot(m, 64, 1, 0)?;
    let v = b.vcpus[0];
    let g = map_data(m, &b, v, USER, 1, FULL)?;
    wr(m, v, USER, 0xabc)?;
    set_entry(m, b.d, v, USER, 1, |_| 0)?;
    m.invlpg(v, USER)?;
    flt(m, v, USER, Access::READ, 0)?;
    // The frame comes back at another address.
    m.map(
        b.d,
        Some(v),
        b.cr3,
        USER + 0x5000,
        g[0] << 12,
        Size::K4,
        FULL,
    )?;
    rd(m, v, USER + 0x5000, 0xabc)?;
    flt(m, v, USER, Access::WRITE, PF_W)?;
    // And the old address gets another frame.
    let g2 = m.alloc_gfn(b.d);
    m.map(b.d, Some(v), b.cr3, USER, g2 << 12, Size::K4, FULL)?;
    m.invlpg(v, USER)?;
    rd(m, v, USER, 0)?;
    wr(m, v, USER, 0xdef)?;
    rd(m, v, USER + 0x5000, 0xabc)
}

fn remap_frame(m: &mut Machine<'_>) -> Res<()> {
    let b = boot(m, 64, 1, 0)?;
    let v = b.vcpus[0];
    let g = map_data(m, &b, v, USER, 2, FULL)?;
    wr(m, v, USER, 1)?;
    wr(m, v, USER + 0x1000, 2)?;
    for round in 0..6u64 {
        let target = g[(round % 2) as usize];
        set_entry(m, b.d, v, USER, 1, |_| target << 12 | FULL)?;
        m.invlpg(v, USER)?;
        rd(m, v, USER, 1 + round % 2)?;
    }
    Ok(())
}

// ---- large pages ---------------------------------------------------------------

fn pages_2m(m: &mut Machine<'_>) -> Res<()> {
    let d = m.create_domain(&[(0, 1024)])?;
    let cr3 = m.new_space(d, None)?;
    let va = 0x8000_0000u64;
    m.map(d, None, cr3, va, 0x20_0000, Size::M2, FULL)?;
    let v = m.create_vcpu(d, Ctrl::DEFAULT)?;
    m.schedule(v, 0)?;
    m.write_cr3(v, cr3)?;
    for off in [0u64, 0x1000, 0x7_f008, 0x1f_fff8] {
        wr(m, v, va + off, off + 1)?;
        rd(m, v, DIRECT + 0x20_0000 + off, off + 1)?;
    }
    set_entry(m, d, v, va, 2, |e| e & !RW)?;
    m.invlpg(v, va + 0x1_0000)?;
    flt(m, v, va, Access::WRITE, PF_P | PF_W)?;
    flt(m, v, va + 0x1f_f000, Access::WRITE, PF_P | PF_W)?;
    rd(m, v, va + 0x1000, 0x1001)
}

fn split_2m(m: &mut Machine<'_>) -> Res<()> {
    let d = m.create_domain(&[(0, 1024)])?;
    let cr3 = m.new_space(d, None)?;
    let va = 0x8000_0000u64;
    m.map(d, None, cr3, va, 0x20_0000, Size::M2, FULL)?;
    let v = m.create_vcpu(d, Ctrl::DEFAULT)?;
    m.schedule(v, 0)?;
    m.write_cr3(v, cr3)?;
    for i in 0..8u64 {
        wr(m, v, va + i * 0x4_0000, i)?;
    }
    // Replace the 2 MiB leaf by a table mapping the pages in reverse order.
    let pt = m.alloc_gfn(d) << 12;
    for i in 0..512u64 {
        m.guest_write(
            d,
            Some(v),
            pt + i * 8,
            (0x20_0000 + (511 - i) * 4096) | FULL,
        )?;
    }
    let l2 = set_entry(m, d, v, va, 2, |_| pt | FULL)?;
    let _ = l2;
    for i in 0..512u64 {
        m.invlpg(v, va + i * 4096)?;
    }
    for i in 0..8u64 {
        // Page 64*i is now at va + (511 - 64*i) pages.
        rd(m, v, va + (511 - 64 * i) * 4096, i)?;
    }
    Ok(())
}

fn pages_1g(m: &mut Machine<'_>) -> Res<()> {
    // RAM at gfn 0 and a sparse 16-page region at 1 GiB.
    let d = m.create_domain(&[(0, 128), (0x4_0000, 16)])?;
    let cr3 = m.new_space(d, None)?;
    let va = 0x80_0000_0000u64;
    m.map(d, None, cr3, va, 0x4000_0000, Size::G1, FULL)?;
    let v = m.create_vcpu(d, Ctrl::DEFAULT)?;
    m.schedule(v, 0)?;
    m.write_cr3(v, cr3)?;
    for i in 0..16u64 {
        wr(m, v, va + i * 4096, 100 + i)?;
    }
    rd(m, v, DIRECT + 0x4000_0000 + 0x5000, 105)?;
    // Past the region the 1 GiB page names no guest memory.
    any_flt(m, v, va + 16 * 4096, Access::READ)?;
    any_flt(m, v, va + 0x3000_0000, Access::WRITE)?;
    // Downgrade the whole gigabyte.
    set_entry(m, d, v, va, 3, |e| e & !RW)?;
    m.invlpg(v, va)?;
    flt(m, v, va + 0x2000, Access::WRITE, PF_P | PF_W)?;
    rd(m, v, va + 0x2000, 102)
}

// ---- hostile tables ------------------------------------------------------------

fn table_is_data(m: &mut Machine<'_>) -> Res<()> {
    let b = boot(m, 64, 1, 0)?;
    let v = b.vcpus[0];
    let g = map_data(m, &b, v, USER, 1, FULL)?;
    let pt = m.entry_addr(b.d, b.cr3, USER, 1).unwrap_or(0) & !0xfff;
    // Map the page table itself as user data at ALIAS.
    let alias = USER + 0x10_0000;
    m.map(b.d, Some(v), b.cr3, alias, pt, Size::K4, FULL)?;
    let want = m.peek(b.d, pt).unwrap_or(0);
    let _ = g;
    rd(m, v, alias, want)?;
    // Writing through the alias edits the PTE for USER+0x1000.
    let g2 = m.alloc_gfn(b.d);
    expect(m, v, alias + 8, Access::UWRITE, g2 << 12 | FULL, Want::Ok)?;
    m.invlpg(v, USER + 0x1000)?;
    wr(m, v, USER + 0x1000, 77)?;
    rd(m, v, DIRECT + (g2 << 12), 77)?;
    // And the data page's own entry: make USER read-only through the alias.
    let e = read_back(m, b.d, v, alias);
    expect(m, v, alias, Access::UWRITE, e & !RW, Want::Ok)?;
    m.invlpg(v, USER)?;
    flt(m, v, USER, Access::UWRITE, PF_P | PF_W | PF_U)
}

fn pt_read_then_written(m: &mut Machine<'_>) -> Res<()> {
    let b = boot(m, 64, 1, 0)?;
    let v = b.vcpus[0];
    map_data(m, &b, v, USER, 2, FULL)?;
    wr(m, v, USER, 1)?;
    wr(m, v, USER + 0x1000, 2)?;
    let pte = m.entry_addr(b.d, b.cr3, USER, 1).unwrap_or(0);
    // An alias of the page table, already accessed and dirty in the guest:
    // a read through it must not yield a writable shadow of a page table.
    let alias = USER + 0x20_0000;
    m.map(
        b.d,
        Some(v),
        b.cr3,
        alias,
        pte & !0xfff,
        Size::K4,
        FULL | A | D,
    )?;
    let e = m.peek(b.d, pte).unwrap_or(0);
    expect(
        m,
        v,
        alias + (pte & 0xfff),
        Access::UREAD,
        0,
        Want::Reads(e),
    )?;
    rd(m, v, DIRECT + pte, e)?;
    // Now the guest write-protects USER through both windows, and flushes.
    expect(
        m,
        v,
        alias + (pte & 0xfff),
        Access::UWRITE,
        e & !RW,
        Want::Ok,
    )?;
    m.invlpg(v, USER)?;
    flt(m, v, USER, Access::WRITE, PF_P | PF_W)?;
    let e2 = m.peek(b.d, pte + 8).unwrap_or(0);
    wr(m, v, DIRECT + pte + 8, e2 & !RW)?;
    m.invlpg(v, USER + 0x1000)?;
    flt(m, v, USER + 0x1000, Access::WRITE, PF_P | PF_W)?;
    rd(m, v, USER + 0x1000, 2)
}

fn self_reference(m: &mut Machine<'_>) -> Res<()> {
    let b = boot(m, 64, 1, 0)?;
    let v = b.vcpus[0];
    map_data(m, &b, v, USER, 1, FULL)?;
    wr(m, v, USER, 42)?;
    // PML4[510] = PML4: the recursive mapping.
    let r = 510u64;
    m.guest_write(b.d, Some(v), b.cr3 + r * 8, b.cr3 | P | RW)?;
    let rec = |l4: u64, l3: u64, l2: u64, l1: u64| {
        arch::canonical(r << 39 | l4 << 30 | l3 << 21 | l2 << 12 | (l1 * 8))
    };
    let (i4, i3, i2, i1) = (
        arch::index(USER, 4),
        arch::index(USER, 3),
        arch::index(USER, 2),
        arch::index(USER, 1),
    );
    // Read the PTE of USER through the recursive window (walk r,i4,i3,i2).
    let via = rec(i4, i3, i2, i1);
    let want = m
        .peek(b.d, m.entry_addr(b.d, b.cr3, USER, 1).unwrap_or(0))
        .unwrap_or(0);
    rd(m, v, via, want)?;
    // The PML4 as seen through r,r,r,r.
    rd(m, v, rec(r, r, r, r), b.cr3 | P | RW | A)?;
    // Create a mapping by writing through the recursive window.
    let g = m.alloc_gfn(b.d);
    wr(m, v, rec(i4, i3, i2, i1 + 1), g << 12 | FULL)?;
    m.invlpg(v, USER + 0x1000)?;
    wr(m, v, USER + 0x1000, 43)?;
    rd(m, v, DIRECT + (g << 12), 43)?;
    // Users may not use the window (supervisor at the top).
    flt(m, v, via, Access::UREAD, PF_P | PF_U)
}

fn looping_tables(m: &mut Machine<'_>) -> Res<()> {
    let b = boot(m, 64, 1, 0)?;
    let v = b.vcpus[0];
    // PML4[1] -> PML4 as a PDPT, PML4[2] -> PML4 as PD via an L3 entry, etc.
    m.guest_write(b.d, Some(v), b.cr3 + 8, b.cr3 | FULL)?;
    // va with indices (1, 1, 1, 1): every level reads the PML4 again; the
    // leaf is the PML4 itself.
    let va = 1u64 << 39 | 1 << 30 | 1 << 21 | 1 << 12 | 8;
    expect(m, v, va, Access::UREAD, 0, Want::Reads(b.cr3 | FULL | A))?;
    // Writing through it edits the PML4 (entry 0 is unused in this space).
    expect(m, v, va, Access::UWRITE, 0, Want::Ok)?;
    m.write_cr3(v, b.cr3)?;
    flt(m, v, va, Access::UREAD, PF_U)?;
    // A two-table cycle: PML4[3] -> T, T[3] -> PML4.
    let t = m.alloc_gfn(b.d) << 12;
    m.guest_write(b.d, Some(v), t + 24, b.cr3 | FULL)?;
    m.guest_write(b.d, Some(v), b.cr3 + 24, t | FULL)?;
    let va3 = 3u64 << 39 | 3 << 30 | 3 << 21 | 3 << 12 | 24;
    // PML4[3] -> T, T[3] -> PML4, PML4[3] -> T, T[3] leaf = the PML4.
    expect(m, v, va3, Access::UREAD, 0, Want::Reads(t | FULL | A))?;
    rd(m, v, DIRECT + t + 24, b.cr3 | FULL | A)?;
    Ok(())
}

fn outside_memory(m: &mut Machine<'_>) -> Res<()> {
    let b = boot(m, 64, 1, 0)?;
    let v = b.vcpus[0];
    let d = b.d;
    // A leaf beyond guest RAM.
    m.map(d, Some(v), b.cr3, USER, 64 << 12, Size::K4, FULL)?;
    any_flt(m, v, USER, Access::READ)?;
    any_flt(m, v, USER, Access::WRITE)?;
    // A leaf naming, as a gfn, the host frame behind guest RAM.
    let host = m.mfn(d, 0).unwrap_or(0);
    m.map(d, Some(v), b.cr3, USER + 0x1000, host << 12, Size::K4, FULL)?;
    any_flt(m, v, USER + 0x1000, Access::READ)?;
    // A leaf naming the server's shadow root's frame number as a gfn.
    let pool = m.phys().ram().first_mfn() + m.phys().ram().frames() - 1;
    m.map(d, Some(v), b.cr3, USER + 0x2000, pool << 12, Size::K4, FULL)?;
    any_flt(m, v, USER + 0x2000, Access::UWRITE)?;
    // A table pointer beyond RAM.
    let va = 0x200_0000_0000u64;
    m.guest_write(
        d,
        Some(v),
        b.cr3 + arch::index(va, 4) * 8,
        0xf_0000_0000 | FULL,
    )?;
    any_flt(m, v, va, Access::READ)?;
    // A 2 MiB leaf half inside RAM: only the part inside works.
    let d2 = 0x1_0000_0000u64;
    m.map(d, Some(v), b.cr3, d2, 0, Size::M2, FULL)?;
    let inside = read_back(m, d, v, d2 + 0x3_f000);
    rd(m, v, d2 + 0x3_f000, inside)?;
    any_flt(m, v, d2 + 0x4_0000, Access::READ)?;
    any_flt(m, v, d2 + 0x1f_f000, Access::WRITE)
}

// ---- many address spaces and vCPUs ---------------------------------------------

fn cr3_switching(m: &mut Machine<'_>) -> Res<()> {
    let b = boot(m, 256, 1, 0)?;
    let v = b.vcpus[0];
    let mut procs = Vec::new();
    for i in 0..16u64 {
        let cr3 = new_process(m, b.d, v, b.cr3)?;
        let g = m.alloc_gfn(b.d);
        m.map(b.d, Some(v), cr3, USER, g << 12, Size::K4, FULL)?;
        m.guest_write(b.d, Some(v), g << 12, 1000 + i)?;
        procs.push(cr3);
    }
    for round in 0..3u64 {
        for (i, &cr3) in procs.iter().enumerate() {
            m.write_cr3(v, cr3)?;
            expect(
                m,
                v,
                USER,
                Access::UREAD,
                0,
                Want::Reads(1000 + i as u64 + 100 * round),
            )?;
            expect(
                m,
                v,
                USER,
                Access::UWRITE,
                1100 + i as u64 + 100 * round,
                Want::Ok,
            )?;
        }
    }
    Ok(())
}

fn edit_inactive_space(m: &mut Machine<'_>) -> Res<()> {
    let b = boot(m, 128, 1, 0)?;
    let v = b.vcpus[0];
    let p1 = new_process(m, b.d, v, b.cr3)?;
    let p2 = new_process(m, b.d, v, b.cr3)?;
    let g1 = m.alloc_gfn(b.d);
    let g2 = m.alloc_gfn(b.d);
    m.map(b.d, Some(v), p1, USER, g1 << 12, Size::K4, FULL)?;
    m.map(b.d, Some(v), p2, USER, g2 << 12, Size::K4, FULL)?;
    m.guest_write(b.d, Some(v), g1 << 12, 11)?;
    m.guest_write(b.d, Some(v), g2 << 12, 22)?;
    m.write_cr3(v, p1)?;
    rd(m, v, USER, 11)?;
    m.write_cr3(v, p2)?;
    rd(m, v, USER, 22)?;
    // While p2 runs, make p1's page read-only and point it at g2.
    let e1 = m.entry_addr(b.d, p1, USER, 1).unwrap_or(0);
    m.guest_write(b.d, Some(v), e1, g2 << 12 | P | US)?;
    m.write_cr3(v, p1)?;
    rd(m, v, USER, 22)?;
    flt(m, v, USER, Access::UWRITE, PF_P | PF_W | PF_U)?;
    m.write_cr3(v, p2)?;
    wr(m, v, USER, 33)?;
    m.write_cr3(v, p1)?;
    rd(m, v, USER, 33)
}

fn smp_shared_l4(m: &mut Machine<'_>) -> Res<()> {
    let n = m.pcpu_count().min(8);
    let b = boot(m, 256, n, 0)?;
    map_data(m, &b, b.vcpus[0], USER, 8, FULL)?;
    for (i, &v) in b.vcpus.iter().enumerate() {
        wr(m, v, USER + i as u64 * 4096, i as u64)?;
    }
    for &v in &b.vcpus {
        for i in 0..n as u64 {
            rd(m, v, USER + i * 4096, i)?;
        }
    }
    // vCPU 0 makes page 3 read-only and shoots it down on every vCPU.
    set_entry(m, b.d, b.vcpus[0], USER + 3 * 4096, 1, |e| e & !RW)?;
    for &v in &b.vcpus {
        m.invlpg(v, USER + 3 * 4096)?;
    }
    for &v in &b.vcpus {
        flt(m, v, USER + 3 * 4096, Access::WRITE, PF_P | PF_W)?;
        wr(m, v, USER + 4 * 4096, 44)?;
    }
    // A new mapping made on vCPU 7 is visible everywhere (no flush needed).
    let g = m.alloc_gfn(b.d);
    let last = b.vcpus[n - 1];
    m.map(
        b.d,
        Some(last),
        b.cr3,
        USER + 0x10_0000,
        g << 12,
        Size::K4,
        FULL,
    )?;
    for &v in &b.vcpus {
        wr(m, v, USER + 0x10_0000, 5)?;
    }
    Ok(())
}

fn smp_lazy_shootdown(m: &mut Machine<'_>) -> Res<()> {
    let b = boot(m, 128, 2, 0)?;
    let (v0, v1) = (b.vcpus[0], b.vcpus[1]);
    map_data(m, &b, v0, USER, 1, FULL)?;
    wr(m, v1, USER, 1)?;
    wr(m, v0, USER, 2)?;
    set_entry(m, b.d, v0, USER, 1, |e| e & !RW)?;
    m.invlpg(v0, USER)?;
    flt(m, v0, USER, Access::WRITE, PF_P | PF_W)?;
    // v1 has not flushed yet: it may still write (or fault).
    let _ = m.access(v1, USER, Access::WRITE, 3)?;
    m.invlpg(v1, USER)?;
    flt(m, v1, USER, Access::WRITE, PF_P | PF_W)
}

fn migration(m: &mut Machine<'_>) -> Res<()> {
    let b = boot(m, 64, 1, 0)?;
    let v = b.vcpus[0];
    map_data(m, &b, v, USER, 1, FULL)?;
    wr(m, v, USER, 1)?;
    // Move to pCPU 1, downgrade and INVLPG there, move back to pCPU 0: the
    // guest flushed, so pCPU 0's old entry must not be used.
    m.schedule(v, 1)?;
    wr(m, v, USER, 2)?;
    set_entry(m, b.d, v, USER, 1, |e| e & !RW)?;
    m.invlpg(v, USER)?;
    m.schedule(v, 0)?;
    flt(m, v, USER, Access::WRITE, PF_P | PF_W)?;
    // Same with a CR3 write.
    let p = new_process(m, b.d, v, b.cr3)?;
    m.schedule(v, 2)?;
    m.write_cr3(v, p)?;
    m.schedule(v, 0)?;
    flt(m, v, USER, Access::READ, 0)
}

fn vcpus_share_pcpu(m: &mut Machine<'_>) -> Res<()> {
    let b = boot(m, 128, 1, 0)?;
    let v0 = b.vcpus[0];
    let v1 = m.create_vcpu(b.d, Ctrl::DEFAULT)?;
    let p = new_process(m, b.d, v0, b.cr3)?;
    map_data(m, &b, v0, USER, 1, FULL)?;
    wr(m, v0, USER, 5)?;
    m.schedule(v1, 0)?;
    m.write_cr3(v1, p)?;
    flt(m, v1, USER, Access::READ, 0)?;
    m.schedule(v0, 0)?;
    rd(m, v0, USER, 5)
}

fn two_domains(m: &mut Machine<'_>) -> Res<()> {
    let a = boot(m, 128, 1, 0)?;
    let b = boot(m, 128, 1, 1)?;
    let (va, vb) = (a.vcpus[0], b.vcpus[0]);
    map_data(m, &a, va, USER, 4, FULL)?;
    map_data(m, &b, vb, USER, 4, FULL)?;
    for i in 0..4u64 {
        wr(m, va, USER + i * 4096, 0xa0 + i)?;
        wr(m, vb, USER + i * 4096, 0xb0 + i)?;
    }
    for i in 0..4u64 {
        rd(m, va, USER + i * 4096, 0xa0 + i)?;
        rd(m, vb, USER + i * 4096, 0xb0 + i)?;
    }
    // Domain A names, as a gfn, a host frame of domain B.
    let hb = m.mfn(b.d, 10).unwrap_or(0);
    m.map(
        a.d,
        Some(va),
        a.cr3,
        USER + 0x10_0000,
        hb << 12,
        Size::K4,
        FULL,
    )?;
    any_flt(m, va, USER + 0x10_0000, Access::READ)?;
    // Zapping A leaves B alone; both keep working.
    m.zap_all(a.d)?;
    rd(m, vb, USER, 0xb0)?;
    rd(m, va, USER, 0xa0)?;
    // Both domains' vCPUs take turns on one pCPU.
    m.schedule(vb, 0)?;
    rd(m, vb, USER + 4096, 0xb1)?;
    m.schedule(va, 0)?;
    rd(m, va, USER + 4096, 0xa1)?;
    m.deschedule(va)?;
    m.destroy_domain(a.d)?;
    m.schedule(vb, 1)?;
    rd(m, vb, USER + 2 * 4096, 0xb2)
}

// ---- dirty logging, zapping, memory pressure ------------------------------------

fn dirty_rounds(m: &mut Machine<'_>) -> Res<()> {
    let b = boot(m, 256, 2, 0)?;
    let gs = map_data(m, &b, b.vcpus[0], USER, 32, FULL)?;
    // Writable mappings exist before logging starts.
    for i in 0..32u64 {
        wr(m, b.vcpus[0], USER + i * 4096, i)?;
    }
    m.enable_dirty(b.d)?;
    m.get_dirty(b.d)?;
    for round in 0..4u64 {
        for i in 0..32u64 {
            if (i + round) % 3 == 0 {
                let v = b.vcpus[(i % 2) as usize];
                wr(m, v, USER + i * 4096, round * 100 + i)?;
            }
        }
        let set = m.get_dirty(b.d)?;
        for i in 0..32u64 {
            if (i + round) % 3 == 0 && !set.contains(&gs[i as usize]) {
                return Err(m.fail(
                    "dirty page reported",
                    None,
                    format!("gfn {:#x}", gs[i as usize]),
                    format!("{set:x?}"),
                ));
            }
        }
    }
    // Reads do not need to be logged; pages not written since the last
    // round may still be reported (never required).
    for i in 0..32u64 {
        let want = m.peek(b.d, gs[i as usize] << 12).unwrap_or(0);
        rd(m, b.vcpus[1], USER + i * 4096, want)?;
    }
    m.get_dirty(b.d)?;
    m.disable_dirty(b.d)?;
    wr(m, b.vcpus[0], USER, 1)
}

fn dirty_pt_pages(m: &mut Machine<'_>) -> Res<()> {
    let b = boot(m, 1024, 1, 0)?;
    let v = b.vcpus[0];
    m.enable_dirty(b.d)?;
    // Emulated page-table writes and 2 MiB pages are logged too.
    map_data(m, &b, v, USER, 4, FULL)?;
    for i in 0..4u64 {
        wr(m, v, USER + i * 4096, i)?;
    }
    let va = 0x8000_0000u64;
    m.map(b.d, Some(v), b.cr3, va, 0x20_0000, Size::M2, FULL)?;
    wr(m, v, va + 0x3_0000, 9)?;
    m.get_dirty(b.d)?;
    wr(m, v, va + 0x3_1000, 9)?;
    m.get_dirty(b.d)?;
    m.disable_dirty(b.d)
}

fn dirty_ad_only(m: &mut Machine<'_>) -> Res<()> {
    let b = boot(m, 256, 1, 0)?;
    let v = b.vcpus[0];
    // Leaves written with A and D clear, before logging starts.
    let gs = map_data(m, &b, v, USER, 8, FULL)?;
    m.enable_dirty(b.d)?;
    m.get_dirty(b.d)?;
    // Reads only: the guest stores nothing, but the server's walks set A in
    // its page tables, and those frames must be in the next bitmap.
    for i in 0..8u64 {
        rd(m, v, USER + i * 4096, 0)?;
    }
    m.get_dirty(b.d)?;
    let pt = m.entry_addr(b.d, b.cr3, USER, 1).unwrap_or(0) >> 12;
    let changed = m
        .last_harvest()
        .map(|h| h.changed.clone())
        .unwrap_or_default();
    if !changed.contains(&pt) || gs.iter().any(|g| changed.contains(g)) {
        return Err(m.fail(
            "frames changed by reads",
            None,
            format!("the leaf table gfn {pt:#x} (A set), no data page"),
            format!("{changed:x?}"),
        ));
    }
    // Writes: the data pages, and D in the leaves.
    for i in 0..8u64 {
        wr(m, v, USER + i * 4096, 0x100 + i)?;
    }
    m.get_dirty(b.d)?;
    m.disable_dirty(b.d)
}

fn zap_mid_run(m: &mut Machine<'_>) -> Res<()> {
    let b = boot(m, 256, 4, 0)?;
    map_data(m, &b, b.vcpus[0], USER, 16, FULL)?;
    for i in 0..16u64 {
        wr(m, b.vcpus[(i % 4) as usize], USER + i * 4096, i)?;
    }
    for z in 0..3u64 {
        m.zap_all(b.d)?;
        for i in 0..16u64 {
            let v = b.vcpus[((i + z) % 4) as usize];
            rd(m, v, USER + i * 4096, i)?;
        }
        // Change a mapping right after the zap.
        set_entry(m, b.d, b.vcpus[0], USER, 1, |e| e ^ RW)?;
        for &v in &b.vcpus {
            m.invlpg(v, USER)?;
        }
    }
    flt(m, b.vcpus[3], USER, Access::WRITE, PF_P | PF_W)
}

fn out_of_pool(m: &mut Machine<'_>) -> Res<()> {
    let b = boot(m, 512, 1, 0)?;
    let v = b.vcpus[0];
    // 48 pages, each in its own 1 GiB: every one needs its own L3/L2/L1.
    let mut vas = Vec::new();
    for i in 0..48u64 {
        let va = 0x80_0000_0000 + i * 0x4000_0000;
        let g = m.alloc_gfn(b.d);
        m.map(b.d, Some(v), b.cr3, va, g << 12, Size::K4, FULL)?;
        vas.push((va, g));
    }
    m.phys()
        .set_pool_limit(Some(m.phys().pool_in_use().max(1) + 24));
    for round in 0..2u64 {
        for &(va, g) in &vas {
            wr(m, v, va, g + round)?;
        }
    }
    // A pool too small even for one walk: refused, never a panic or a bad
    // mapping; afterwards everything works again.
    m.zap_all(b.d)?;
    m.phys().set_pool_limit(Some(1));
    for &(va, _) in vas.iter().take(4) {
        match m.access(v, va, Access::READ, 0)? {
            Outcome::Refused(MmuError::OutOfShadowMemory(_)) | Outcome::Ok(_) => {}
            o => {
                return Err(m.fail(
                    "access with an exhausted pool",
                    Some(va),
                    String::from("Refused(OutOfShadowMemory) or Ok"),
                    format!("{o:?}"),
                ))
            }
        }
    }
    m.phys().set_pool_limit(None);
    for &(va, g) in &vas {
        rd(m, v, va, g + 1)?;
    }
    Ok(())
}

fn accessed_dirty(m: &mut Machine<'_>) -> Res<()> {
    let b = boot(m, 64, 1, 0)?;
    let v = b.vcpus[0];
    map_data(m, &b, v, USER, 2, FULL)?;
    let pte = m.entry_addr(b.d, b.cr3, USER, 1).unwrap_or(0);
    rd(m, v, USER, 0)?;
    let e = m.peek(b.d, pte).unwrap_or(0);
    if e & A == 0 || e & D != 0 {
        return Err(m.fail(
            "after a read: A set, D clear",
            Some(USER),
            String::from("A=1 D=0"),
            format!("{e:#x}"),
        ));
    }
    wr(m, v, USER, 1)?;
    let e = m.peek(b.d, pte).unwrap_or(0);
    if e & D == 0 {
        return Err(m.fail(
            "after a write: D set",
            Some(USER),
            String::from("D=1"),
            format!("{e:#x}"),
        ));
    }
    // The guest clears A and D (as a page-out scan does) and flushes.
    for round in 0..3 {
        m.guest_write(b.d, Some(v), pte, e & !(A | D))?;
        m.invlpg(v, USER)?;
        if round % 2 == 0 {
            rd(m, v, USER, if round == 0 { 1 } else { 2 })?;
            let e2 = m.peek(b.d, pte).unwrap_or(0);
            if e2 & A == 0 || e2 & D != 0 {
                return Err(m.fail(
                    "A set again, D not",
                    Some(USER),
                    String::from("A=1 D=0"),
                    format!("{e2:#x}"),
                ));
            }
        }
        wr(m, v, USER, 2)?;
        let e3 = m.peek(b.d, pte).unwrap_or(0);
        if e3 & (A | D) != A | D {
            return Err(m.fail(
                "A and D set again after a write",
                Some(USER),
                String::from("A=1 D=1"),
                format!("{e3:#x}"),
            ));
        }
    }
    // An untouched neighbour keeps A and D clear.
    let pte2 = pte + 8;
    let e4 = m.peek(b.d, pte2).unwrap_or(0);
    if e4 & (A | D) != 0 {
        return Err(m.fail(
            "untouched page keeps A/D clear",
            Some(USER + 4096),
            String::from("A=0 D=0"),
            format!("{e4:#x}"),
        ));
    }
    Ok(())
}

fn accessed_dirty_2m(m: &mut Machine<'_>) -> Res<()> {
    let d = m.create_domain(&[(0, 1024)])?;
    let cr3 = m.new_space(d, None)?;
    let va = 0x8000_0000u64;
    m.map(d, None, cr3, va, 0x20_0000, Size::M2, FULL)?;
    let v = m.create_vcpu(d, Ctrl::DEFAULT)?;
    m.schedule(v, 0)?;
    m.write_cr3(v, cr3)?;
    let pde = m.entry_addr(d, cr3, va, 2).unwrap_or(0);
    for round in 0..3u64 {
        wr(m, v, va + 0x5000, round)?;
        wr(m, v, va + 0x1f_f000, round)?;
        let e = m.peek(d, pde).unwrap_or(0);
        if e & (A | D) != A | D {
            return Err(m.fail(
                "A and D set in a 2 MiB leaf after writes",
                Some(va),
                String::from("A=1 D=1"),
                format!("{e:#x}"),
            ));
        }
        // Clear A and D (a page-out scan), flush one 4 KiB page inside: the
        // whole 2 MiB translation goes, and the next write sets D again.
        m.guest_write(d, Some(v), pde, e & !(A | D))?;
        m.invlpg(v, va + 0x1f_f000)?;
    }
    Ok(())
}

fn shared_2m_dirty(m: &mut Machine<'_>) -> Res<()> {
    // Two processes map the same 2 MiB of guest memory through their own
    // PDEs. A write through the first sets D only in the first PDE; a write
    // through the second must still set D in the second (a shadow shared
    // between them must not hand out write access the clean PDE has not
    // earned).
    let b = boot(m, 1024, 2, 0)?;
    let (v0, v1) = (b.vcpus[0], b.vcpus[1]);
    let p1 = new_process(m, b.d, v0, b.cr3)?;
    let p2 = new_process(m, b.d, v0, b.cr3)?;
    let va = 0x8000_0000u64;
    m.map(b.d, Some(v0), p1, va, 0x20_0000, Size::M2, FULL)?;
    m.map(b.d, Some(v0), p2, va, 0x20_0000, Size::M2, FULL)?;
    m.write_cr3(v0, p1)?;
    m.write_cr3(v1, p2)?;
    rd(m, v1, va + 0x3000, 0)?;
    wr(m, v0, va + 0x3000, 7)?;
    expect(m, v1, va + 0x3000, Access::WRITE, 8, Want::Ok)?;
    let pde2 = m.entry_addr(b.d, p2, va, 2).unwrap_or(0);
    let e = m.peek(b.d, pde2).unwrap_or(0);
    if e & D == 0 {
        return Err(m.fail(
            "D set in the PDE the write went through",
            Some(va + 0x3000),
            format!("D=1 in the second process's PDE at gpa {pde2:#x}"),
            format!("{e:#x}"),
        ));
    }
    Ok(())
}

fn direct_map_2m(m: &mut Machine<'_>) -> Res<()> {
    // The guest's direct map uses 2 MiB pages that also cover its page
    // tables: writes to tables through them must still be seen.
    let d = m.create_domain(&[(0, 1024)])?;
    let cr3 = m.alloc_gfn(d) << 12;
    for i in 0..2u64 {
        m.map(
            d,
            None,
            cr3,
            DIRECT + i * 0x20_0000,
            i * 0x20_0000,
            Size::M2,
            P | RW | NX,
        )?;
    }
    let v = m.create_vcpu(d, Ctrl::DEFAULT)?;
    m.schedule(v, 0)?;
    m.write_cr3(v, cr3)?;
    for i in 0..8u64 {
        let g = m.alloc_gfn(d);
        m.map(d, Some(v), cr3, USER + i * 4096, g << 12, Size::K4, FULL)?;
        wr(m, v, USER + i * 4096, i)?;
    }
    set_entry(m, d, v, USER + 4096, 1, |e| e & !RW)?;
    m.invlpg(v, USER + 4096)?;
    flt(m, v, USER + 4096, Access::WRITE, PF_P | PF_W)?;
    rd(m, v, USER + 7 * 4096, 7)
}

fn write_flood(m: &mut Machine<'_>) -> Res<()> {
    // A page used as a table, then reused as plain data and written hard.
    let b = boot(m, 64, 1, 0)?;
    let v = b.vcpus[0];
    map_data(m, &b, v, USER, 1, FULL)?;
    rd(m, v, USER, 0)?;
    let pt = m.entry_addr(b.d, b.cr3, USER, 1).unwrap_or(0) & !0xfff;
    // Unhook the table.
    set_entry(m, b.d, v, USER, 2, |_| 0)?;
    m.write_cr3(v, b.cr3)?;
    for i in 0..64u64 {
        wr(m, v, DIRECT + pt + i * 8, (0xffff_0000 + i * 0x1000) | FULL)?;
    }
    flt(m, v, USER, Access::READ, 0)?;
    // Hook it back as a table: its junk entries are now PTEs naming frames
    // outside guest memory.
    let l2 = m.entry_addr(b.d, b.cr3, USER, 2).unwrap_or(0);
    m.guest_write(b.d, Some(v), l2, pt | FULL)?;
    m.invlpg(v, USER)?;
    any_flt(m, v, USER, Access::READ)?;
    any_flt(m, v, USER + 0x1000, Access::UWRITE)
}

fn fetch_and_user_mix(m: &mut Machine<'_>) -> Res<()> {
    let b = boot(m, 64, 1, 0)?;
    let v = b.vcpus[0];
    map_data(m, &b, v, USER, 1, P | US)?;
    // The same page: user fetch ok, supervisor write faults, user write faults.
    expect(m, v, USER, Access::UFETCH, 0, Want::Ok)?;
    flt(m, v, USER, Access::WRITE, PF_P | PF_W)?;
    expect(m, v, USER, Access::FETCH, 0, Want::Ok)?;
    set_entry(m, b.d, v, USER, 1, |e| e | RW | NX)?;
    m.invlpg(v, USER)?;
    flt(m, v, USER, Access::UFETCH, PF_P | PF_I | PF_U)?;
    expect(m, v, USER, Access::UWRITE, 3, Want::Ok)?;
    Ok(())
}

fn destroy_recreate(m: &mut Machine<'_>) -> Res<()> {
    let a = boot(m, 64, 1, 0)?;
    map_data(m, &a, a.vcpus[0], USER, 2, FULL)?;
    wr(m, a.vcpus[0], USER, 1)?;
    m.deschedule(a.vcpus[0])?;
    m.destroy_domain(a.d)?;
    let b = boot(m, 64, 1, 0)?;
    map_data(m, &b, b.vcpus[0], USER, 2, FULL)?;
    rd(m, b.vcpus[0], USER, 0)?;
    wr(m, b.vcpus[0], USER + 4096, 2)
}

/// Every scripted scenario.
pub fn scenarios() -> &'static [Scenario] {
    macro_rules! s {
        ($f:ident, $about:expr) => {
            Scenario {
                name: stringify!($f),
                about: $about,
                run: $f,
            }
        };
    }
    static ALL: &[Scenario] = &[
        s!(
            handshake,
            "Hello with the right version is welcomed, wrong versions refused"
        ),
        s!(
            malformed,
            "garbage, truncated, over-long and trailing bytes get Error replies"
        ),
        s!(
            bad_ids,
            "unknown domains/vCPUs, bad pCPUs and bad emulated writes are refused"
        ),
        s!(
            demand_paging,
            "64 pages faulted in on first touch, not-present beyond"
        ),
        s!(
            user_supervisor,
            "U/S at the leaf and supervisor-only direct map"
        ),
        s!(read_only, "R/W at the leaf and at an upper level"),
        s!(
            write_protect_off,
            "CR0.WP=0 lets supervisor writes through read-only pages"
        ),
        s!(
            no_execute,
            "NX at leaf and upper level; NX is reserved with NXE off"
        ),
        s!(
            reserved_bits,
            "reserved bits at every level give RSVD faults"
        ),
        s!(downgrade_invlpg, "permission downgrade followed by INVLPG"),
        s!(
            downgrade_late_invlpg,
            "stale writable translation until the INVLPG"
        ),
        s!(upgrade, "read-only to writable without a flush"),
        s!(
            unmap_reuse,
            "unmap, INVLPG and reuse of the frame elsewhere"
        ),
        s!(remap_frame, "one address flipping between two frames"),
        s!(
            pages_2m,
            "2 MiB pages: offsets, downgrade with INVLPG inside the page"
        ),
        s!(
            split_2m,
            "a 2 MiB page split into 512 4 KiB pages in another order"
        ),
        s!(pages_1g, "1 GiB page over a sparse memory map"),
        s!(
            table_is_data,
            "a page that is both page table and user data"
        ),
        s!(
            pt_read_then_written,
            "a page table read, then written, through pre-dirtied aliases"
        ),
        s!(
            self_reference,
            "recursive PML4 slot: tables read and written through it"
        ),
        s!(
            looping_tables,
            "tables pointing back at the PML4 and two-table cycles"
        ),
        s!(
            outside_memory,
            "leaves and tables outside guest memory, host and pool frame numbers"
        ),
        s!(
            cr3_switching,
            "16 processes sharing a kernel half, switching CR3"
        ),
        s!(
            edit_inactive_space,
            "editing an address space while another runs"
        ),
        s!(
            smp_shared_l4,
            "8 vCPUs on 8 pCPUs sharing one L4, shootdown by INVLPG"
        ),
        s!(
            smp_lazy_shootdown,
            "a remote vCPU may use the old mapping until it flushes"
        ),
        s!(
            migration,
            "a vCPU moving between pCPUs after INVLPG and CR3 writes"
        ),
        s!(
            vcpus_share_pcpu,
            "two vCPUs of one domain taking turns on a pCPU"
        ),
        s!(two_domains, "two domains: isolation, zap of one, destroy"),
        s!(dirty_rounds, "dirty logging over 4 rounds from 2 vCPUs"),
        s!(
            dirty_pt_pages,
            "dirty logging of page-table and 2 MiB writes"
        ),
        s!(
            dirty_ad_only,
            "dirty logging of page tables changed only by the server's A/D updates"
        ),
        s!(zap_mid_run, "zap-all while 4 vCPUs run"),
        s!(
            out_of_pool,
            "a small shadow pool: recovery by zapping, refusal when hopeless"
        ),
        s!(accessed_dirty, "guest A/D bits set, cleared and set again"),
        s!(
            accessed_dirty_2m,
            "A/D of a 2 MiB leaf cleared, INVLPG inside it, set again"
        ),
        s!(
            shared_2m_dirty,
            "two processes' PDEs map one 2 MiB page: D set in each written one"
        ),
        s!(direct_map_2m, "page tables inside 2 MiB guest pages"),
        s!(
            write_flood,
            "a former page table written as data, then reused as a table"
        ),
        s!(
            fetch_and_user_mix,
            "fetch, user and write rights combined on one page"
        ),
        s!(destroy_recreate, "destroying a domain and creating another"),
        s!(
            paging_off,
            "paging off: identity over two RAM regions, Mmio in the hole and at the APIC"
        ),
        s!(
            paging_on,
            "paging off to long mode: no identity translation survives, Mmio through tables"
        ),
        s!(
            paging_off_again,
            "long mode, off and on again twice, moving between pCPUs"
        ),
        s!(
            modes_mixed,
            "one vCPU with paging off edits another's page tables"
        ),
    ];
    ALL
}
