//! The MMU protocol conformance suite: a black-box judge of any MMU server.
//!
//! The suite plays the kernel and the hardware ([`machine`]) around a server
//! it reaches only through encoded messages, owns the memory the server runs
//! on ([`ram`]), and after every step checks what any pCPU could use against
//! an independent x86-64 page walker ([`arch`]) over the guest's tables,
//! past and present ([`history`]), with a TLB model per pCPU ([`tlb`]).
//!
//! Everything here is `no_std` + `alloc`, so the kernel runs the same
//! scripted scenarios in the image over real frames: see [`run_scenario`].
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod arch;
pub mod grant;
pub mod history;
pub mod machine;
pub mod modes;
pub mod ram;
pub mod random;
pub mod scenarios;
pub mod tlb;

pub use machine::{Failure, Machine, Outcome, Res, Stats};
pub use ram::{Ram, SuitePhys};
pub use scenarios::{scenarios, Scenario};

use abi::{MmuReply, MmuServer, PROTOCOL_VERSION};
use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;

/// Guest RAM frames a run hands out to its domains.
pub const GUEST_FRAMES: u64 = 2048;
/// Frames of the server's shadow pool.
pub const POOL_FRAMES: u64 = 1024;
/// Frames of memory one run needs (`Ram::frames()` at least this).
pub const RAM_FRAMES: u64 = GUEST_FRAMES + POOL_FRAMES;
/// pCPUs of the simulated machine.
pub const PCPUS: usize = 8;

/// Builds fresh servers that reach memory only through the given `PhysMem`
/// (the suite's, which records what the server does).
pub trait Factory {
    /// A new server over `phys`, or why there is none.
    fn make<'a>(&self, phys: &'a SuitePhys<'a>) -> Result<Box<dyn MmuServer + 'a>, String>;
}

/// The implementation registered as this name in `mmu_server::registry`.
#[derive(Clone, Copy, Debug)]
pub struct Registered(pub &'static str);

impl Factory for Registered {
    fn make<'a>(&self, phys: &'a SuitePhys<'a>) -> Result<Box<dyn MmuServer + 'a>, String> {
        mmu_server::registry::create(self.0, phys).map_err(|e| format!("{e}"))
    }
}

/// What the runners take: any [`Factory`].
pub type MakeServer<'f> = &'f dyn Factory;

/// Runs one scenario against a fresh server built by `make` over `ram`
/// (at least [`RAM_FRAMES`] frames; the first [`GUEST_FRAMES`] become guest
/// RAM, the rest the shadow pool). Returns the run's counters, or the first
/// failure found.
pub fn run_scenario(sc: &Scenario, make: MakeServer<'_>, ram: Ram<'_>) -> Res<Stats> {
    run_with(sc.name, make, ram, sc.run)
}

/// Runs `script` like [`run_scenario`] (the random suite uses it too).
pub fn run_with(
    name: &str,
    make: MakeServer<'_>,
    ram: Ram<'_>,
    script: fn(&mut Machine<'_>) -> Res<()>,
) -> Res<Stats> {
    run_closure(name, make, ram, &mut |m| script(m))
}

/// Runs a script given as a closure like [`run_scenario`].
pub fn run_closure(
    name: &str,
    make: MakeServer<'_>,
    ram: Ram<'_>,
    script: &mut dyn FnMut(&mut Machine<'_>) -> Res<()>,
) -> Res<Stats> {
    if ram.frames() < RAM_FRAMES {
        return Err(Box::new(Failure {
            scenario: String::from(name),
            step: 0,
            op: String::from("setup"),
            what: String::from("memory for the run"),
            gva: None,
            expected: format!("at least {RAM_FRAMES} frames"),
            observed: format!("{} frames", ram.frames()),
            recent: alloc::vec::Vec::new(),
        }));
    }
    let phys = SuitePhys::new(ram, ram.first_mfn() + GUEST_FRAMES);
    let server = match make.make(&phys) {
        Ok(s) => s,
        Err(e) => {
            return Err(Box::new(Failure {
                scenario: String::from(name),
                step: 0,
                op: String::from("setup"),
                what: String::from("server construction"),
                gva: None,
                expected: String::from("a server"),
                observed: e,
                recent: alloc::vec::Vec::new(),
            }))
        }
    };
    let mut m = Machine::new(name, &*server, &phys, GUEST_FRAMES, PCPUS);
    let hello = m.hello(PROTOCOL_VERSION)?;
    if hello
        != (MmuReply::Welcome {
            version: PROTOCOL_VERSION,
        })
    {
        return Err(m.fail(
            "handshake",
            None,
            format!("Welcome {{ version: {PROTOCOL_VERSION} }}"),
            format!("{hello:?}"),
        ));
    }
    script(&mut m)?;
    let mut stats = m.stats;
    stats.peak_pool = phys.peak.load(core::sync::atomic::Ordering::SeqCst);
    Ok(stats)
}

/// Runs one random sequence of `steps` operations from `seed` against a
/// fresh server (see [`random`]); the failure's scenario names the seed.
pub fn run_random(seed: u64, steps: u64, make: MakeServer<'_>, ram: Ram<'_>) -> Res<Stats> {
    let name = format!("random seed {seed:#x} ({steps} steps)");
    run_closure(&name, make, ram, &mut |m| {
        random::random_run(m, seed, steps)
    })
}
