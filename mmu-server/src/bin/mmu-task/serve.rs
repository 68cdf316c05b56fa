//! The task's one entry: `Init` creates the server, `Request` dispatches to it.

use crate::misbehave::{self, Misbehaviour};
use abi::task::{ControlPage, Op, TaskInit, CONTROL, WINDOW_BASE};
use abi::{MmuServer, MAX_MESSAGE};
use alloc::boxed::Box;
use mmu_server::{registry, Config};
use spin::Once;
use task_rt::mem::WindowMem;

/// The server this task runs, once `Init` created it.
static SERVER: Once<(Box<dyn MmuServer>, Misbehaviour)> = Once::new();

/// Test-only: `relay` forwards every request to the MMU server task at
/// `abi::task::PORT_MMU` through the kernel (servers calling servers).
static RELAY: Once<()> = Once::new();

/// Serves one message (see `task_rt::rt::Serve`).
#[no_mangle]
fn umbra_task_serve(op: Op, _pcpu: usize, request: &[u8], reply: &mut [u8; MAX_MESSAGE]) -> usize {
    match op {
        Op::Init => task_rt::init::answer(request, reply, init),
        Op::Request if RELAY.get().is_some() => {
            reply[..request.len()].copy_from_slice(request);
            match task_rt::rt::call(abi::task::PORT_MMU, request.len()) {
                Ok(n) => n,
                Err(e) => panic!(
                    "relay: the call to the MMU server at port {} failed: {e:?}",
                    abi::task::PORT_MMU
                ),
            }
        }
        Op::Request => match SERVER.get() {
            Some((server, misbehaviour)) => {
                misbehave::before_request(*misbehaviour);
                abi::dispatch(&**server, request, reply)
            }
            None => panic!("request before Init"),
        },
    }
}

/// Creates the server `init` names (see `task_rt::init::answer`); false
/// when no server has that name.
fn init(init: &TaskInit) -> bool {
    if init.implementation == misbehave::RELAY {
        RELAY.call_once(|| ());
        return true;
    }
    let (base_name, misbehaviour) = misbehave::parse(&init.implementation);
    // SAFETY: the kernel maps the control page at CONTROL for the task's
    // life (abi::task), and the pool and every range it lists in the window
    // at WINDOW_BASE + pa, listing a range only while it is mapped.
    let mem: &'static WindowMem = Box::leak(Box::new(unsafe {
        WindowMem::new(
            WINDOW_BASE,
            &*(CONTROL as *const ControlPage),
            init.pool_first,
            init.pool_frames,
        )
    }));
    let config = Config {
        maxphyaddr: init.maxphyaddr.clamp(32, 52),
        ..Config::default()
    };
    match registry::create_with(base_name, mem, config) {
        Ok(server) => {
            SERVER.call_once(|| (server, misbehaviour));
            true
        }
        Err(_) => false,
    }
}
