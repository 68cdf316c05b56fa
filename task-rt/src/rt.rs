//! A server task's runtime: the entry point, the two system calls, the heap and the panic report.
//!
//! The binary defines one function, `umbra_task_serve` (see [`Serve`]),
//! and links this module in; the kernel enters [`umbra_task_entry`] for
//! every message (see `abi::task`, "Entry"), which calls it and replies.

use abi::task::{
    self, CallError, Op, HEAP_BASE, HEAP_BYTES, REPLY_OFFSET, SYS_CALL, SYS_PANIC, SYS_REPLY,
};
use abi::MAX_MESSAGE;
use core::arch::global_asm;
use core::fmt::Write;
use core::sync::atomic::{AtomicBool, Ordering};
use talc::source::Manual;
use talc::TalcLock;

/// The signature of the one function a task binary defines, with
/// `#[no_mangle]`, under the name `umbra_task_serve`: it gets the op, the
/// pCPU, the request bytes and the reply buffer, and returns the reply's
/// length.
pub type Serve = fn(Op, usize, &[u8], &mut [u8; MAX_MESSAGE]) -> usize;

extern "Rust" {
    fn umbra_task_serve(
        op: Op,
        pcpu: usize,
        request: &[u8],
        reply: &mut [u8; MAX_MESSAGE],
    ) -> usize;
}

#[global_allocator]
static HEAP: TalcLock<spin::mutex::SpinMutex<()>, Manual> = TalcLock::new(Manual);
static HEAP_READY: AtomicBool = AtomicBool::new(false);

global_asm!(
    r#"
    .section .text.entry
    .global umbra_task_entry
umbra_task_entry:
    xor ebp, ebp
    call {main}
    ud2
"#,
    main = sym task_main,
);

extern "C" {
    /// The ELF entry point (see `abi::task`, "Entry").
    pub fn umbra_task_entry() -> !;
}

/// Ends this request with a reply of `len` bytes (already in the buffer).
pub fn reply(len: usize) -> ! {
    // SAFETY: `int 0x80` with rax = SYS_REPLY is the kernel's documented
    // reply call; it never returns to this context (the kernel resumes the
    // caller of the request and enters afresh for the next one).
    unsafe {
        core::arch::asm!("int 0x80", in("rax") SYS_REPLY, in("rdi") len, options(noreturn));
    }
}

/// Calls the server task at `port` through the kernel, synchronously on
/// this pCPU: the request is the first `len` bytes of the reply buffer
/// this request's `umbra_task_serve` got, and the answer replaces them.
/// Returns the answer's length.
pub fn call(port: u64, len: usize) -> Result<usize, CallError> {
    let rax: u64;
    // SAFETY: `int 0x80` with rax = SYS_CALL is the kernel's documented
    // call: it returns here with rax = the answer's length or an error
    // code, having written only this pCPU's reply half; every other
    // register is preserved by the kernel's entry path.
    unsafe {
        core::arch::asm!("int 0x80", inlateout("rax") SYS_CALL => rax, in("rdi") port, in("rsi") len);
    }
    match CallError::from_code(rax) {
        Some(e) => Err(e),
        None => Ok(rax as usize),
    }
}

/// This thread's pCPU, found from its stack (each pCPU's stack lies in its
/// own `STACK_STRIDE` slot, see `abi::task`).
pub fn this_pcpu() -> usize {
    let rsp: u64;
    // SAFETY: reading RSP has no side effect.
    unsafe { core::arch::asm!("mov {}, rsp", out(reg) rsp, options(nomem, nostack)) };
    ((rsp.saturating_sub(task::STACKS_BASE) / task::STACK_STRIDE) as usize).min(task::MAX_PCPUS - 1)
}

/// Gives up with `len` bytes of message in the reply half of the buffer.
fn give_up(len: usize) -> ! {
    // SAFETY: as in `reply`; SYS_PANIC ends the task for good.
    unsafe {
        core::arch::asm!("int 0x80", in("rax") SYS_PANIC, in("rdi") len, options(noreturn));
    }
}

/// This pCPU's message page as (request half, reply half).
fn buffers(pcpu: usize) -> (&'static [u8; REPLY_OFFSET], &'static mut [u8; MAX_MESSAGE]) {
    let page = task::buffer(pcpu.min(task::MAX_PCPUS - 1));
    // SAFETY: the kernel maps one page per pCPU at `task::buffer(p)`,
    // writable, for the task's life; only this pCPU's thread uses it while
    // the kernel waits in the call, so no other reference exists. The two
    // halves do not overlap (REPLY_OFFSET + MAX_MESSAGE <= 4096).
    unsafe {
        (
            &*(page as *const [u8; REPLY_OFFSET]),
            &mut *((page + REPLY_OFFSET as u64) as *mut [u8; MAX_MESSAGE]),
        )
    }
}

extern "C" fn task_main(op: u64, pcpu: u64, len: u64) -> ! {
    if !HEAP_READY.swap(true, Ordering::AcqRel) {
        // SAFETY: the kernel maps HEAP_BYTES of fresh writable frames at
        // HEAP_BASE for the task's life; this runs once (the flag).
        unsafe {
            HEAP.lock()
                .claim(HEAP_BASE as *mut u8, HEAP_BYTES as usize)
                .expect("the task heap holds talc's metadata");
        }
    }
    let pcpu = pcpu as usize;
    let (request, out) = buffers(pcpu);
    let Some(op) = Op::from_u64(op) else {
        panic!("entered with unknown op {op}");
    };
    let len = (len as usize).min(REPLY_OFFSET);
    // SAFETY: the binary defines `umbra_task_serve` with the `Serve`
    // signature (documented above; a mismatch fails to link or is the
    // binary's bug in its own address space).
    let n = unsafe { umbra_task_serve(op, pcpu, &request[..len], out) };
    reply(n)
}

/// Writes into a byte buffer, cutting what does not fit.
struct Cut<'b> {
    buf: &'b mut [u8],
    len: usize,
}

impl Write for Cut<'_> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for &b in s.as_bytes() {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
        Ok(())
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    // The panicking thread finds its pCPU from its stack (each pCPU's
    // stack lies in its own STACK_STRIDE slot) and writes the message into
    // that pCPU's reply half, which the kernel reads for the call it waits on.
    let (_, out) = buffers(this_pcpu());
    let mut w = Cut { buf: out, len: 0 };
    let (file, line) = info.location().map_or(("?", 0), |l| (l.file(), l.line()));
    let _ = write!(w, "{} at {file}:{line}", info.message());
    let len = w.len;
    give_up(len)
}
