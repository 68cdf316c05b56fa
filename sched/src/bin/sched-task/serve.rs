//! The task's one entry: `Init` creates the policy, `Request` dispatches to it.

use crate::misbehave::{self, Misbehaviour};
use abi::task::Op;
use abi::{SchedServer, MAX_MESSAGE};
use alloc::boxed::Box;
use sched::registry;
use spin::Once;

/// The policy this task runs, once `Init` created it.
static SERVER: Once<(Box<dyn SchedServer>, Misbehaviour)> = Once::new();

/// Serves one message (see `task_rt::rt::Serve`).
#[no_mangle]
fn umbra_task_serve(op: Op, _pcpu: usize, request: &[u8], reply: &mut [u8; MAX_MESSAGE]) -> usize {
    match op {
        Op::Init => task_rt::init::answer(request, reply, |init| {
            let (policy, misbehaviour) = misbehave::parse(&init.implementation);
            let Ok(server) = registry::create(policy) else {
                return false;
            };
            SERVER.call_once(|| (server, misbehaviour));
            true
        }),
        Op::Request => match SERVER.get() {
            Some((server, m)) => {
                let n = abi::sched::dispatch(&**server, request, reply);
                misbehave::after(*m, request, reply, n)
            }
            None => panic!("request before Init"),
        },
    }
}
