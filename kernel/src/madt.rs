//! ACPI: find the RSDP, read the MADT, list the CPUs and the local APIC address.

use acpi::madt::{Madt, MadtEntry};
use acpi::{AcpiHandler, AcpiTables, PhysicalMapping};
use core::ptr::NonNull;

/// ACPI table access through the identity map of the low 4 GiB.
#[derive(Clone, Copy, Debug)]
struct IdentityMap;

impl AcpiHandler for IdentityMap {
    unsafe fn map_physical_region<T>(&self, phys: usize, size: usize) -> PhysicalMapping<Self, T> {
        let ptr = NonNull::new(phys as *mut T).expect("ACPI table at physical address 0");
        // SAFETY: the low 4 GiB are identity-mapped, so the physical address
        // is the virtual one; the caller vouches for the contents.
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
    // SAFETY: the BIOS areas searched are identity-mapped RAM/ROM.
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
