//! ACPI: find the RSDP, read the MADT, list the CPUs and the local APIC address.

use crate::paging;
use acpi::madt::{Madt, MadtEntry};
use acpi::{AcpiHandler, AcpiTables, PhysicalMapping};
use core::ptr::NonNull;
use x86_64::{PhysAddr, VirtAddr};

/// ACPI table access through the identity map of the low 4 GiB.
#[derive(Clone, Copy, Debug)]
struct IdentityMap;

impl AcpiHandler for IdentityMap {
    unsafe fn map_physical_region<T>(&self, phys: usize, size: usize) -> PhysicalMapping<Self, T> {
        let ptr = NonNull::new(phys as *mut T).expect("ACPI table at physical address 0");
        let (start, end) = (phys as u64, phys as u64 + size.max(1) as u64);
        let mut page = start & !(paging::PAGE_SIZE - 1);
        while page < end {
            let va = VirtAddr::new(page);
            assert!(
                paging::translate(va) == Some(PhysAddr::new(page)),
                "ACPI region {start:#x}..{end:#x} is not identity-mapped at {page:#x}"
            );
            page += paging::PAGE_SIZE;
        }
        // SAFETY: every page of the region was just checked to be mapped to
        // itself, so `ptr` addresses the physical bytes; the acpi crate (our
        // caller) vouches that they hold a `T` and only reads them.
        unsafe { PhysicalMapping::new(phys, ptr, size, size, *self) }
    }

    fn unmap_physical_region<T>(_region: &PhysicalMapping<Self, T>) {}
}

/// Most CPUs read from the MADT.
pub const MAX_LISTED: usize = 256;

/// What the MADT says about processors.
pub struct CpuList {
    /// APIC ids of the enabled (or online-capable) CPUs, MADT order.
    pub apic_ids: [u32; MAX_LISTED],
    /// Number of valid entries in `apic_ids`.
    pub enabled: usize,
    /// Processor entries the MADT lists, enabled or not.
    pub listed: usize,
    /// Physical address of the local APIC.
    pub local_apic: u64,
}

/// Reads the MADT (RSDP found by the BIOS-area search).
pub fn read_cpus() -> Result<CpuList, acpi::AcpiError> {
    // SAFETY: the search reads the BIOS data area (page 0: the EBDA
    // pointer), the EBDA and the BIOS ROM area, all below 1 MiB, through
    // `IdentityMap`, which checks that each region is identity-mapped (page
    // 0 is, until `paging::init`); every read is of firmware memory no Rust
    // allocation owns.
    let tables = unsafe { AcpiTables::search_for_rsdp_bios(IdentityMap)? };
    let madt = tables.find_table::<Madt>()?;
    let mut out = CpuList {
        apic_ids: [0; MAX_LISTED],
        enabled: 0,
        listed: 0,
        local_apic: madt.get().local_apic_address as u64,
    };
    for entry in madt.get().entries() {
        let (id, flags) = match entry {
            MadtEntry::LocalApic(e) => (e.apic_id as u32, e.flags),
            MadtEntry::LocalX2Apic(e) => (e.x2apic_id, e.flags),
            MadtEntry::LocalApicAddressOverride(e) => {
                out.local_apic = e.local_apic_address;
                continue;
            }
            _ => continue,
        };
        out.listed += 1;
        // Bit 0: enabled; bit 1: online capable (may be started).
        if flags & 0b11 != 0 && out.enabled < MAX_LISTED {
            out.apic_ids[out.enabled] = id;
            out.enabled += 1;
        }
    }
    Ok(out)
}
