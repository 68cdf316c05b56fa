//! Ending the run: QEMU's isa-debug-exit device (iobase 0xf4).
//!
//! Writing v makes QEMU exit with status `(v << 1) | 1`, so status 0 (what a
//! triple fault under `-no-reboot` gives) never means success.

use x86_64::instructions::port::Port;

/// The two outcomes a run can report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum ExitCode {
    /// Everything asked for succeeded: QEMU exits with 33.
    Success = 0x10,
    /// A test failed, an exception or a panic happened: QEMU exits with 35.
    Failure = 0x11,
}

/// Ends the run with `code`; halts forever if the device is absent.
pub fn exit(code: ExitCode) -> ! {
    exit_with(code as u32)
}

/// Ends the run with the raw isa-debug-exit value `value` (QEMU exits
/// with `(value << 1) | 1`): the status an unmodified guest wrote to its
/// own exit port, passed on so its runner reads it unchanged.
pub fn exit_with(value: u32) -> ! {
    let mut port: Port<u32> = Port::new(0xF4);
    // SAFETY: port 0xF4 is QEMU's isa-debug-exit; on a machine without it the
    // write is ignored and we halt below.
    unsafe { port.write(value) };
    loop {
        x86_64::instructions::interrupts::disable();
        x86_64::instructions::hlt();
    }
}
