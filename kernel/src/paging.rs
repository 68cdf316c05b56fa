//! The kernel's own page tables: the boot identity map of the low 4 GiB, with single 4 KiB pages unmapped (the null page, a guard page below every stack).
//!
//! The boot stub maps the low 4 GiB with 2 MiB pages (see [`crate::boot`]);
//! every CPU runs on those tables. [`unmap_page`] splits the 2 MiB page
//! holding an address into 512 4 KiB entries (same frames, same
//! attributes), clears the one entry and flushes that page on every online
//! CPU. [`init`] unmaps the null page and the bootstrap CPU's stack guard;
//! [`crate::cpu`] unmaps the guard below every other stack it hands out.
//! [`translate`] walks the live tables (for the self-tests and fault reports).

use crate::cpu::{self, CpuSet, CpuSetExt};
use crate::frames::{self, FrameError};
use crate::shootdown::{FlushRequest, Reason, Scope, Space};
use core::sync::atomic::{AtomicU64, Ordering};
use spin::Mutex;
use x86_64::registers::control::Cr3;
use x86_64::{PhysAddr, VirtAddr};

/// Size of a small page.
pub const PAGE_SIZE: u64 = 4096;
/// Size of the pages the boot stub maps with.
const LARGE_PAGE: u64 = 2 << 20;
/// End of the identity map the boot stub builds.
pub const IDENTITY_END: u64 = 4 << 30;

const PRESENT: u64 = 1;
const HUGE: u64 = 1 << 7;
/// Bits 12..52: the frame or next table.
const ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;
/// In a 2 MiB entry, bit 12 is PAT; in a 4 KiB entry PAT is bit 7.
const LARGE_PAT: u64 = 1 << 12;
const SMALL_PAT: u64 = 1 << 7;

/// Serialises edits of the shared tables (all CPUs use the same ones).
static EDIT: Mutex<()> = Mutex::new(());

/// Entry `index` (below 512) of the page-table page at physical address `table`.
///
/// # Safety
/// `table` must be the physical address of a page-table page of the kernel's
/// tables. All of them lie in the identity-mapped low 4 GiB (the boot tables
/// are in the image, split tables come from the frame allocator, which
/// manages only the low 4 GiB) and are never freed, so the address is a
/// valid, aligned, `'static` pointer to 512 entries. Entries are accessed
/// atomically: CPUs may read a table while another CPU edits it.
unsafe fn entry(table: u64, index: u64) -> &'static AtomicU64 {
    debug_assert!(index < 512 && table.is_multiple_of(PAGE_SIZE) && table < IDENTITY_END);
    // SAFETY: the caller's promise above; AtomicU64 has u64's size and
    // alignment, and nothing accesses page-table entries non-atomically.
    unsafe { AtomicU64::from_ptr((table + index * 8) as *mut u64) }
}

/// The physical address of the table an upper-level entry points to, if present.
fn next_table(e: u64) -> Option<u64> {
    (e & PRESENT != 0 && e & HUGE == 0).then_some(e & ADDR_MASK)
}

/// Where `addr` is mapped to by the running CPU's page tables, if at all.
pub fn translate(addr: VirtAddr) -> Option<PhysAddr> {
    let a = addr.as_u64();
    let pml4 = Cr3::read().0.start_address().as_u64();
    let indices = [
        (a >> 39) & 511,
        (a >> 30) & 511,
        (a >> 21) & 511,
        (a >> 12) & 511,
    ];
    let mut table = pml4;
    for (level, &i) in indices.iter().enumerate() {
        // SAFETY: `table` is named by CR3 or by a present non-leaf entry of
        // the kernel's tables, so it is one of their page-table pages.
        let e = unsafe { entry(table, i) }.load(Ordering::Acquire);
        if e & PRESENT == 0 {
            return None;
        }
        let leaf_size = match level {
            1 if e & HUGE != 0 => Some(1u64 << 30),
            2 if e & HUGE != 0 => Some(LARGE_PAGE),
            3 => Some(PAGE_SIZE),
            _ => None,
        };
        if let Some(size) = leaf_size {
            return Some(PhysAddr::new(
                (e & ADDR_MASK & !(size - 1)) + (a & (size - 1)),
            ));
        }
        table = e & ADDR_MASK;
    }
    None
}

/// True when `addr` has a present translation on the running CPU.
pub fn is_mapped(addr: VirtAddr) -> bool {
    translate(addr).is_some()
}

/// Unmaps the 4 KiB page holding `addr` (below [`IDENTITY_END`]) from the
/// shared kernel tables, splitting its 2 MiB page first if needed, and
/// flushes it on every online CPU. A page that is already unmapped stays so.
/// The frame behind the page is not freed: the caller decides what it is.
///
/// Not for use in interrupt handlers (the flush waits for other CPUs).
/// Errors: no frame left for the 4 KiB table.
pub fn unmap_page(addr: VirtAddr) -> Result<(), FrameError> {
    let a = addr.as_u64() & !(PAGE_SIZE - 1);
    assert!(
        a < IDENTITY_END,
        "unmap_page({a:#x}): only the identity-mapped low 4 GiB is managed here"
    );
    {
        let _edit = EDIT.lock();
        let pml4 = Cr3::read().0.start_address().as_u64();
        // SAFETY: (this and each `entry` call below) the tables are CR3's, or named by
        // a present non-leaf entry, or the zeroed frame just taken for the
        // split (identity-mapped, ours alone, and from now on a page-table
        // page that is never freed). The EDIT lock makes this CPU the only
        // writer.
        let pml4_entry = unsafe { entry(pml4, (a >> 39) & 511) };
        let Some(pdpt) = next_table(pml4_entry.load(Ordering::Acquire)) else {
            return Ok(());
        };
        // SAFETY: as above.
        let pdpt_entry = unsafe { entry(pdpt, (a >> 30) & 511) };
        let Some(pd) = next_table(pdpt_entry.load(Ordering::Acquire)) else {
            return Ok(());
        };
        // SAFETY: as above.
        let pde = unsafe { entry(pd, (a >> 21) & 511) };
        let e = pde.load(Ordering::Acquire);
        if e & PRESENT == 0 {
            return Ok(());
        }
        let pt = if e & HUGE != 0 {
            // Split: same frames and attributes, 4 KiB at a time.
            let table = frames::alloc_zeroed()?.start_address().as_u64();
            let base = e & ADDR_MASK & !(LARGE_PAGE - 1);
            let mut flags = e & !ADDR_MASK & !HUGE;
            if e & LARGE_PAT != 0 {
                flags |= SMALL_PAT;
            }
            for i in 0..512 {
                // SAFETY: as above (the new table).
                unsafe { entry(table, i) }.store((base + i * PAGE_SIZE) | flags, Ordering::Relaxed);
            }
            // Upper-level entries carry no cache attributes of their own:
            // present, writable, user as before; the leaves decide the rest.
            // Release: the filled table is visible before it is linked.
            pde.store(table | (e & 0b111), Ordering::Release);
            table
        } else {
            e & ADDR_MASK
        };
        // SAFETY: as above.
        unsafe { entry(pt, (a >> 12) & 511) }.store(0, Ordering::Release);
    }
    flush(VirtAddr::new(a));
    Ok(())
}

/// Flushes the page at `addr` on the calling CPU and, once per-CPU data
/// exists, on every other online CPU (before that, only this CPU runs).
fn flush(addr: VirtAddr) {
    if cpu::current_index_checked().is_some() {
        FlushRequest::new(
            CpuSet::all(),
            Space::Host,
            Scope::Page(addr),
            Reason::KernelMapping,
        )
        .execute();
    } else {
        x86_64::instructions::tlb::flush(addr);
    }
}

/// Unmaps the null page (address 0 up to 4 KiB), so a null dereference
/// faults, and the guard page below the bootstrap CPU's stack. Call after
/// the ACPI tables were read (the RSDP search reads the BIOS data area in
/// page 0) and before the other CPUs start.
pub fn init() -> Result<(), FrameError> {
    unmap_page(VirtAddr::zero())?;
    unmap_page(crate::boot::boot_stack_guard())
}
