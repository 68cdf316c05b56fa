//! The task's one entry: `Init` creates the server, `Request` dispatches to it.

use crate::misbehave::{self, Misbehaviour};
use abi::task::{ControlPage, Op, TaskInit, TaskInitReply, CONTROL, WINDOW_BASE};
use abi::{MmuServer, MAX_MESSAGE};
use alloc::boxed::Box;
use heapless::String;
use mmu_server::{registry, Config};
use spin::Once;
use task_rt::mem::WindowMem;

/// The server this task runs, once `Init` created it.
static SERVER: Once<(Box<dyn MmuServer>, Misbehaviour)> = Once::new();

/// Serves one message (see `task_rt::rt::Serve`).
#[no_mangle]
fn umbra_task_serve(op: Op, _pcpu: usize, request: &[u8], reply: &mut [u8; MAX_MESSAGE]) -> usize {
    match op {
        Op::Init => {
            let answer = init(request);
            abi::encode(&answer, reply).unwrap_or(0)
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

fn init(request: &[u8]) -> TaskInitReply {
    let Ok(init) = abi::decode::<TaskInit>(request) else {
        return TaskInitReply::Malformed;
    };
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
            let mut name = String::new();
            let _ = name.push_str(&init.implementation);
            TaskInitReply::Ready(name)
        }
        Err(_) => TaskInitReply::UnknownImplementation(init.implementation),
    }
}
