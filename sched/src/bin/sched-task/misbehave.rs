//! Test-only broken policies: a real policy (`global-rr`) whose answers are sometimes corrupted, so the kernel's decision check is exercised in the image.

use abi::sched::{Micros, SchedReply, SchedRequest};
use abi::{VcpuId, MAX_MESSAGE};
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// What a broken policy does to every [`EVERY`]th `PickNext` answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Misbehaviour {
    /// Nothing: a real policy.
    None,
    /// Answers `Run` for the vCPU it last handed to another pCPU (most
    /// likely still running there): the kernel must refuse to run it twice.
    RunTwice,
    /// Answers `Run` for a vCPU that does not exist.
    RunUnknown,
}

/// How often the answer is corrupted.
const EVERY: u64 = 16;

/// The policy to create for `name`, and how it misbehaves.
pub fn parse(name: &str) -> (&str, Misbehaviour) {
    match name {
        "misbehave-twice" => ("global-rr", Misbehaviour::RunTwice),
        "misbehave-unknown" => ("global-rr", Misbehaviour::RunUnknown),
        _ => (name, Misbehaviour::None),
    }
}

static PICKS: AtomicU64 = AtomicU64::new(0);
/// The vCPU and pCPU of the last `Run` answer (u32::MAX: none yet).
static LAST_VCPU: AtomicU32 = AtomicU32::new(u32::MAX);
static LAST_PCPU: AtomicU32 = AtomicU32::new(u32::MAX);

/// Rewrites the encoded answer `reply[..len]` to `request` if this is one
/// to corrupt; returns the new length.
pub fn after(m: Misbehaviour, request: &[u8], reply: &mut [u8; MAX_MESSAGE], len: usize) -> usize {
    if m == Misbehaviour::None {
        return len;
    }
    let Ok(SchedRequest::PickNext { pcpu }) = abi::decode::<SchedRequest>(request) else {
        return len;
    };
    if let Ok(SchedReply::Run { vcpu, .. }) = abi::decode::<SchedReply>(&reply[..len]) {
        LAST_VCPU.store(vcpu.0, Ordering::Relaxed);
        LAST_PCPU.store(pcpu.0, Ordering::Relaxed);
        return len;
    }
    if PICKS.fetch_add(1, Ordering::Relaxed) % EVERY != 0 {
        return len;
    }
    let vcpu = match m {
        Misbehaviour::RunTwice if LAST_PCPU.load(Ordering::Relaxed) != pcpu.0 => {
            VcpuId(LAST_VCPU.load(Ordering::Relaxed))
        }
        Misbehaviour::RunUnknown => VcpuId(9999),
        _ => return len,
    };
    let bad = SchedReply::Run {
        vcpu,
        slice: Micros(1_000),
    };
    abi::encode(&bad, reply).unwrap_or(len)
}
