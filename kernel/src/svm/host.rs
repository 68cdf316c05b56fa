//! The SVM code's only contact points with the rest of the kernel: frames,
//! the identity map, CPU ids, shootdown, the image span and the console.
//! Keeping them in one file keeps the glue small.

use crate::{cpu, frames, shootdown};
use x86_64::structures::paging::{PhysFrame, Size4KiB};
use x86_64::{PhysAddr, VirtAddr};

/// A host-virtual pointer to host-physical `pa` (the kernel identity-maps
/// the low 4 GiB).
pub fn va(pa: u64) -> *mut u8 {
    assert!(
        pa < frames::MANAGED_BYTES,
        "physical address {pa:#x} outside the identity map"
    );
    pa as *mut u8
}

/// `count` contiguous zeroed frames; their physical address.
pub fn alloc_zeroed(count: u64) -> Result<u64, &'static str> {
    let f = frames::alloc_contiguous(count).map_err(|_| "out of contiguous host frames")?;
    let pa = f.start_address().as_u64();
    // SAFETY: the frames were just taken from the allocator, so nothing else
    // uses them; they lie in the identity map.
    unsafe { core::ptr::write_bytes(va(pa), 0, (count * 4096) as usize) };
    Ok(pa)
}

/// Gives `count` contiguous frames from [`alloc_zeroed`] back.
pub fn free(pa: u64, count: u64) {
    for i in 0..count {
        let f = PhysFrame::<Size4KiB>::containing_address(PhysAddr::new(pa + i * 4096));
        if let Err(e) = frames::free(f) {
            crate::kprintln!("svm: freeing frame {:#x} failed: {e:?}", pa + i * 4096);
        }
    }
}

/// This CPU's index (0 = bootstrap).
pub fn cpu_index() -> usize {
    cpu::current().index()
}

/// Number of CPUs online.
pub fn cpus_online() -> usize {
    cpu::online_count()
}

/// Flushes the guest TLB of `asid` on `cpus` (the caller included if listed)
/// and waits for every acknowledgement. A CPU in guest mode leaves it to
/// acknowledge; the flush itself happens before its next VMRUN.
pub fn guest_shootdown(cpus: u64, asid: u32) {
    shootdown::FlushRequest::new(
        cpu::CpuSet(cpus),
        shootdown::Space::Guest { asid },
        shootdown::Scope::All,
        shootdown::Reason::ServerObligation,
    )
    .execute();
}

/// Flushes every guest TLB (all ASIDs) on `cpus` and waits for every
/// acknowledgement, as [`guest_shootdown`] does for one ASID.
pub fn guest_shootdown_all(cpus: u64) {
    guest_shootdown(cpus, shootdown::ALL_ASIDS);
}

/// Forces the CPUs in `cpus` out of guest mode once (an empty host flush).
pub fn kick(cpus: u64) {
    shootdown::FlushRequest::new(
        cpu::CpuSet(cpus & !(1u64 << cpu_index())),
        shootdown::Space::Host,
        shootdown::Scope::Page(VirtAddr::new(0)),
        shootdown::Reason::GuestTeardown,
    )
    .execute();
}

/// Wakes pCPU `index` from a halt (the wake-up IPI; harmless if it runs).
pub fn wake(index: usize) {
    if index == cpu_index() || index >= cpus_online() {
        return;
    }
    let id = cpu::get(index).apic_id();
    x86_64::instructions::interrupts::without_interrupts(|| {
        crate::apic::send_ipi(id, crate::interrupts::WAKE_VECTOR)
    });
}

/// ASIDs (mod 64) whose TLB must be flushed before the next VMRUN here.
pub fn take_guest_flushes() -> u64 {
    shootdown::take_guest_flushes()
}

/// Serves pending shootdown requests (cheap when none).
pub fn serve_shootdowns() {
    shootdown::serve();
}

/// The loaded kernel image [start, end of data): what a guest gets a private
/// copy of, mapped at the same addresses.
pub fn image_span() -> (u64, u64) {
    unsafe extern "C" {
        static __image_start: u8;
        static __data_end: u8;
    }
    let start = &raw const __image_start as u64;
    let end = &raw const __data_end as u64;
    (start & !0xFFF, (end + 0xFFF) & !0xFFF)
}
