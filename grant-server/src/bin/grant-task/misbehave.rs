//! Test-only broken grant servers: a real one (`accessed-hint`) with one deliberate fault, so the kernel's containment and its copy-plan check are exercised in the image.
//!
//! Not in the registry: `--grant all` never picks them; the test image
//! names them.

use abi::grant::{GrantReply, GrantRequest};
use abi::{Hpa, MAX_MESSAGE};
use core::sync::atomic::{AtomicU64, Ordering};

/// How a broken server misbehaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Misbehaviour {
    /// Nothing: a real server.
    None,
    /// Panics on its [`NTH`] request: the kernel must stop it, report it
    /// and stop its domains, and go on.
    Panic,
    /// Answers every copy with a plan whose granted side is host frame 1
    /// (the kernel's low memory, no domain's): the kernel must refuse the
    /// plan and copy nothing.
    WildPlan,
}

/// The request `Panic` panics on (after the domains are running).
const NTH: u64 = 200;

/// The server to create for `name`, and how it misbehaves.
pub fn parse(name: &str) -> (&str, Misbehaviour) {
    match name {
        "misbehave-panic" => ("accessed-hint", Misbehaviour::Panic),
        "misbehave-plan" => ("accessed-hint", Misbehaviour::WildPlan),
        _ => (name, Misbehaviour::None),
    }
}

static REQUESTS: AtomicU64 = AtomicU64::new(0);

/// Called before each request is served.
pub fn before(m: Misbehaviour) {
    if m == Misbehaviour::Panic && REQUESTS.fetch_add(1, Ordering::Relaxed) + 1 == NTH {
        panic!("misbehave-panic: deliberate panic on request {NTH}");
    }
}

/// Rewrites the encoded answer `reply[..len]` to `request` if it is one to
/// corrupt; returns the new length.
pub fn after(m: Misbehaviour, request: &[u8], reply: &mut [u8; MAX_MESSAGE], len: usize) -> usize {
    if m != Misbehaviour::WildPlan {
        return len;
    }
    let Ok(GrantRequest::Copy { direction, .. }) = abi::decode::<GrantRequest>(request) else {
        return len;
    };
    let Ok(GrantReply::CopyPlan {
        mut src,
        mut dst,
        len: bytes,
        flush,
    }) = abi::decode::<GrantReply>(&reply[..len])
    else {
        return len;
    };
    let wild = |a: Hpa| Hpa(0x1000 | (a.0 & 0xFFF));
    match direction {
        abi::grant::CopyDirection::FromGrant => src = wild(src),
        abi::grant::CopyDirection::ToGrant => dst = wild(dst),
    }
    let bad = GrantReply::CopyPlan {
        src,
        dst,
        len: bytes,
        flush,
    };
    abi::encode(&bad, reply).unwrap_or(len)
}
