//! Test-only servers: deliberately broken ones for the kernel's containment tests (the reference server plus one fault on its Nth request), and the relay.

use core::sync::atomic::{AtomicU64, Ordering};
use mmu_server::reference;

/// The test-only names this task answers to (not in the registry).
pub const NAMES: &[&str] = &[
    "misbehave-panic",
    "misbehave-wild",
    "misbehave-hang",
    "misbehave-stack",
];

/// Test-only: a server that forwards every request to the MMU server task
/// at `abi::task::PORT_MMU` (servers calling servers through the kernel).
pub const RELAY: &str = "relay";

/// The request (counted from 1, over all pCPUs) on which the fault comes:
/// late enough that every domain is created and guests are running.
const NTH: u64 = 400;

/// What a broken server does on its Nth request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Misbehaviour {
    /// Nothing: a real server.
    None,
    /// Panics.
    Panic,
    /// Reads kernel memory it was never given.
    Wild,
    /// Never replies.
    Hang,
    /// Recurses until its stack overflows.
    Stack,
}

/// The server to create for `name`, and how it misbehaves.
pub fn parse(name: &str) -> (&str, Misbehaviour) {
    let m = match name {
        "misbehave-panic" => Misbehaviour::Panic,
        "misbehave-wild" => Misbehaviour::Wild,
        "misbehave-hang" => Misbehaviour::Hang,
        "misbehave-stack" => Misbehaviour::Stack,
        _ => return (name, Misbehaviour::None),
    };
    debug_assert!(NAMES.contains(&name));
    (reference::NAME, m)
}

static REQUESTS: AtomicU64 = AtomicU64::new(0);

/// Counts the request and, on the Nth, misbehaves as told.
pub fn before_request(m: Misbehaviour) {
    if m == Misbehaviour::None || REQUESTS.fetch_add(1, Ordering::Relaxed) + 1 != NTH {
        return;
    }
    match m {
        Misbehaviour::None => {}
        Misbehaviour::Panic => panic!("misbehave-panic: deliberate panic on request {NTH}"),
        Misbehaviour::Wild => {
            // The kernel image at 1 MiB: mapped supervisor-only in every
            // task, so this read must fault.
            let kernel = 0x10_0000 as *const u64;
            // SAFETY: the address is mapped only for ring 0 in this task's
            // tables, so the read cannot complete: it raises a #PF in ring 3,
            // which the kernel turns into a stop of this task. No value is
            // ever produced and no memory is touched; the fault is the test.
            let v = unsafe { core::ptr::read_volatile(kernel) };
            panic!("misbehave-wild: read kernel memory {v:#x} without a fault");
        }
        Misbehaviour::Hang => loop {
            core::hint::spin_loop();
        },
        Misbehaviour::Stack => {
            let depth = recurse(core::hint::black_box(0));
            panic!("misbehave-stack: recursion ended at {depth}");
        }
    }
}

/// Recurses with 1 KiB of stack per level, forever.
#[allow(unconditional_recursion)] // the point: overflow the stack
fn recurse(n: u64) -> u64 {
    let mut frame = [0u8; 1024];
    frame[(n % 1024) as usize] = n as u8;
    let frame = core::hint::black_box(frame);
    recurse(n + 1) + frame[0] as u64
}
