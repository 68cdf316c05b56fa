//! The task's one entry (`Init` creates the server, `Request` dispatches to
//! it) and its port to the MMU server.
//!
//! # The port
//! A call to another task goes through this pCPU's reply half (see
//! `task_rt::rt::call`). The grant reply is built in a local buffer while
//! the server runs, and the port writes its MMU requests through a pointer
//! derived from this request's own reply buffer, kept per pCPU in
//! [`REPLY`]: so only one path ever writes the page at a time, and the
//! grant reply is copied in after the last MMU call.

use abi::mmu::{MmuError, MmuReply, MmuRequest};
use abi::task::{Op, MAX_PCPUS, PORT_MMU};
use abi::{DecodeError, GrantServer, MAX_MESSAGE};
use alloc::boxed::Box;
use core::sync::atomic::{AtomicPtr, Ordering};
use grant_server::{registry, MmuPort};
use spin::Once;

/// The server this task runs, once `Init` created it.
static SERVER: Once<Box<dyn GrantServer>> = Once::new();

/// Each pCPU's reply buffer for the request it is serving now (null
/// between requests).
static REPLY: [AtomicPtr<u8>; MAX_PCPUS] =
    [const { AtomicPtr::new(core::ptr::null_mut()) }; MAX_PCPUS];

/// The grant server's way to the MMU server: `SYS_CALL` to [`PORT_MMU`].
struct TaskPort;

/// The one port (the server keeps a `'static` reference).
static PORT: TaskPort = TaskPort;

impl MmuPort for TaskPort {
    fn call(&self, request: &MmuRequest) -> MmuReply {
        let malformed = |e| MmuReply::error(MmuError::Malformed(e));
        let buf = REPLY[task_rt::rt::this_pcpu()].load(Ordering::Acquire);
        if buf.is_null() {
            // Only reachable if the server called out of a request: a bug
            // in this binary, reported as an error rather than a fault.
            return malformed(DecodeError::UnexpectedEnd);
        }
        // SAFETY: `buf` is this pCPU's reply buffer, MAX_MESSAGE bytes,
        // derived in `umbra_task_serve` from the `&mut` the runtime gave
        // this request, which is not used again until dispatch returns;
        // only this pCPU's thread uses it (the pointer is per pCPU).
        let out = unsafe { &mut *(buf as *mut [u8; MAX_MESSAGE]) };
        let n = match abi::encode(request, out) {
            Ok(n) => n,
            Err(_) => return malformed(DecodeError::TooLong(MAX_MESSAGE as u32)),
        };
        match task_rt::rt::call(PORT_MMU, n) {
            Ok(m) => abi::decode::<MmuReply>(&out[..m.min(MAX_MESSAGE)])
                .unwrap_or_else(|e| MmuReply::error(MmuError::Malformed(e))),
            // The kernel refused the call (no MMU server at the port, or
            // it stopped): a grant server cannot work without it, and the
            // kernel reports this task stopped with the message.
            Err(e) => panic!("the call to the MMU server at port {PORT_MMU} failed: {e:?}"),
        }
    }
}

/// Serves one message (see `task_rt::rt::Serve`).
#[no_mangle]
fn umbra_task_serve(op: Op, pcpu: usize, request: &[u8], reply: &mut [u8; MAX_MESSAGE]) -> usize {
    match op {
        Op::Init => task_rt::init::answer(request, reply, |init| {
            match registry::create(init.implementation.as_str(), &PORT) {
                Ok(server) => {
                    SERVER.call_once(|| server);
                    true
                }
                Err(_) => false,
            }
        }),
        Op::Request => {
            let Some(server) = SERVER.get() else {
                panic!("request before Init");
            };
            let slot = &REPLY[pcpu.min(MAX_PCPUS - 1)];
            slot.store(reply.as_mut_ptr(), Ordering::Release);
            let mut out = [0u8; MAX_MESSAGE];
            let n = abi::grant::grant_dispatch(&**server, request, &mut out);
            slot.store(core::ptr::null_mut(), Ordering::Release);
            reply[..n].copy_from_slice(&out[..n]);
            n
        }
    }
}
