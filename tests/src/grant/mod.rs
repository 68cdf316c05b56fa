//! The grant conformance suite: a black-box judge of any grant server,
//! together with the MMU server it maps through.
//!
//! The suite plays the kernel and the hardware ([`rig`]) around a grant
//! server and an MMU server it reaches only through encoded messages; the
//! grant server reaches the MMU server through a `grant_server::MmuPort`
//! over the same wire. After every step it checks every pCPU's TLB model
//! and every shadow leaf against what each domain may reach: above all,
//! after every unmap (whatever flush its reply carried or not) no pCPU may
//! hold a translation to the unmapped frame. [`scenarios`] holds the
//! scripted runs: permissions and lifetimes, the TLB model, and every bad
//! input class (each checking the error and that nothing leaked).
//! [`foreign`] holds the MMU server's side: scenarios that send the
//! foreign-frame requests straight to it.
//!
//! `no_std` + `alloc`, like the MMU suite, so the image can run it too.

/// A `Vec<GrantScenario>` of the named script functions, each named after
/// its function.
macro_rules! scenario_list {
    ($($f:ident),* $(,)?) => {
        alloc::vec![$($crate::grant::GrantScenario { name: stringify!($f), run: $f }),*]
    };
}

pub mod foreign;
pub mod rig;
pub mod scenarios;

pub use foreign::foreign_scenarios;
pub use rig::{Access, GrantStats, Rig};
pub use scenarios::{grant_scenarios, GrantScenario};

use crate::machine::{Failure, Res};
use crate::ram::{Ram, SuitePhys};
use crate::{Factory, GUEST_FRAMES, PCPUS, RAM_FRAMES};
use abi::grant::{GrantReply, GrantRequest, GrantServer, GRANT_PROTOCOL_VERSION};
use abi::mmu::{MmuReply, MmuRequest};
use abi::PROTOCOL_VERSION;
use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use grant_server::{DispatchPort, MmuPort};

/// Builds fresh grant servers that reach the MMU server only through `port`.
pub trait GrantFactory {
    /// A new grant server over `port`, or why there is none.
    fn make<'a>(&self, port: &'a dyn MmuPort) -> Result<Box<dyn GrantServer + 'a>, String>;
}

/// The grant server registered as this name in `grant_server::registry`.
#[derive(Clone, Copy, Debug)]
pub struct RegisteredGrant(pub &'static str);

impl GrantFactory for RegisteredGrant {
    fn make<'a>(&self, port: &'a dyn MmuPort) -> Result<Box<dyn GrantServer + 'a>, String> {
        grant_server::registry::create(self.0, port).map_err(|e| format!("{e}"))
    }
}

fn setup_failure(name: &str, what: &str, observed: String) -> Box<Failure> {
    Box::new(Failure {
        scenario: String::from(name),
        step: 0,
        op: String::from("setup"),
        what: String::from(what),
        gva: None,
        expected: String::from("ok"),
        observed,
        recent: alloc::vec::Vec::new(),
    })
}

/// Runs `script` against a fresh grant server built by `make` over a fresh
/// MMU server built by `mmu` (over `ram`, at least [`RAM_FRAMES`] frames;
/// `crate::Registered(name)` for a registered one). Returns the run's
/// counts and the grant server's final counters.
pub fn run_grant_with(
    name: &str,
    mmu: &dyn Factory,
    make: &dyn GrantFactory,
    ram: Ram<'_>,
    script: &mut dyn FnMut(&mut Rig<'_>) -> Res<()>,
) -> Res<(GrantStats, abi::GrantCounters)> {
    if ram.frames() < RAM_FRAMES {
        return Err(setup_failure(
            name,
            "memory",
            format!("{} frames", ram.frames()),
        ));
    }
    let phys = SuitePhys::new(ram, ram.first_mfn() + GUEST_FRAMES);
    let mmu = mmu
        .make(&phys)
        .map_err(|e| setup_failure(name, "MMU server", e))?;
    let port = DispatchPort(&*mmu);
    let grant = make
        .make(&port)
        .map_err(|e| setup_failure(name, "grant server", e))?;
    let mut rig = Rig::new(name, &*mmu, &*grant, &phys, GUEST_FRAMES, PCPUS);
    // Handshakes, as the kernel's first messages.
    let mut buf = [0u8; abi::MAX_MESSAGE];
    let mut out = [0u8; abi::MAX_MESSAGE];
    let n = abi::encode(
        &MmuRequest::Hello {
            version: PROTOCOL_VERSION,
        },
        &mut buf,
    )
    .map_err(|e| setup_failure(name, "encode", format!("{e:?}")))?;
    let m = abi::dispatch(&*mmu, &buf[..n], &mut out);
    let welcome = abi::decode::<MmuReply>(&out[..m]);
    if welcome
        != Ok(MmuReply::Welcome {
            version: PROTOCOL_VERSION,
        })
    {
        return Err(setup_failure(name, "MMU handshake", format!("{welcome:?}")));
    }
    let r = rig.grant_call(&GrantRequest::Hello {
        version: GRANT_PROTOCOL_VERSION,
    })?;
    if r != (GrantReply::Welcome {
        version: GRANT_PROTOCOL_VERSION,
    }) {
        return Err(setup_failure(name, "grant handshake", format!("{r:?}")));
    }
    script(&mut rig)?;
    let counters = rig.counters(None)?;
    rig.teardown()?;
    Ok((rig.stats, counters))
}

/// Runs one scripted scenario (see [`run_grant_with`]).
pub fn run_grant_scenario(
    sc: &GrantScenario,
    mmu: &dyn Factory,
    make: &dyn GrantFactory,
    ram: Ram<'_>,
) -> Res<(GrantStats, abi::GrantCounters)> {
    run_grant_with(sc.name, mmu, make, ram, &mut |r| (sc.run)(r))
}
