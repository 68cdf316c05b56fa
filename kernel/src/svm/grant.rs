//! The door to the grant server: its two transports, sending a request and carrying out the reply (its flush, its copy plan), and the guests' grant hypercall.
//!
//! # What the kernel does and does not decide
//! The grant server owns references, permissions and lifetimes; the MMU
//! server owns the mappings. The kernel only carries messages and replies:
//! - it fills in the calling domain of every guest request (never the
//!   guest);
//! - it carries out each reply's flush obligation (scope All: every guest
//!   translation on the named pCPUs, whichever domain, since a revocation
//!   concerns the mappers, not the requester) before the guest runs again;
//! - it carries out a copy plan only after checking it against what it
//!   knows for certain: the caller's side is exactly the caller's own
//!   `local` address, the other side lies in the granter's memory, and
//!   neither crosses a 4 KiB frame. A plan that fails the check is refused
//!   (`BAD_PLAN`), nothing is copied, and the server is stopped and
//!   reported like one that faulted.
//!
//! The kernel checks ownership, not the grant itself: that a granted side
//! is the frame the granter granted to the caller is the grant server's
//! decision. So a broken grant server's copy can reach the wrong frame of
//! the granter named in the request, but never the kernel's memory or
//! another domain's. Mappings do not pass through here: the grant server
//! asks the MMU server directly (through the kernel's `SYS_CALL`), and the
//! MMU server checks that the frame belongs to the owner the grant server
//! names; the grant server is trusted with that choice.

use super::domain::Domain;
use super::door::{ServerDown, Svm};
use super::stats::{bump, STATS};
use super::{host, online_mask};
use crate::task::{Stop, Task};
use abi::grant::{
    CopyDirection, GrantError, GrantRef, GrantReply, GrantRequest, GrantServer, MapHandle,
    MAX_UNMAP_BATCH,
};
use abi::guest::{grant_call as at, grant_op, grant_status};
use abi::task::Op;
use abi::{DomainId, FlushObligation, FlushScope, Gfn, Gpa, MAX_MESSAGE};
use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use core::sync::atomic::{AtomicBool, Ordering};

/// How the kernel reaches the grant server (the same choice `transport=`
/// makes for the MMU server).
pub enum GrantTransport {
    /// The server runs in ring 3 as a task of its own, and reaches the MMU
    /// server's task through the kernel (`abi::task::PORT_MMU`).
    Task(&'static Task),
    /// The server is linked into the kernel and called in ring 0.
    Direct(Box<dyn GrantServer>),
}

/// The grant server of a run.
pub struct GrantDoor {
    transport: GrantTransport,
    /// The implementation's registered name.
    pub name: String,
    /// Set once the server stopped: it is never called again.
    down: AtomicBool,
}

impl GrantDoor {
    /// A door to implementation `name` over `transport`.
    pub fn new(transport: GrantTransport, name: &str) -> GrantDoor {
        GrantDoor {
            transport,
            name: name.into(),
            down: AtomicBool::new(false),
        }
    }

    /// Whether the server was stopped during the run.
    pub fn stopped(&self) -> bool {
        self.down.load(Ordering::Acquire)
    }
}

impl Svm {
    /// The one door to the grant server: encodes `req`, sends it, decodes
    /// the reply (bytes that do not decode become an error reply) and
    /// carries out its flush obligation before returning, counting it
    /// against `caller` when given. When the server stops while serving (or
    /// has stopped), it is reported with the request, every domain is
    /// stopped, and the caller gets [`ServerDown`]; a run without a grant
    /// server answers [`ServerDown`] too (callers check [`Svm::grant`]
    /// first where that is not an error).
    pub fn grant(
        &self,
        caller: Option<&Domain>,
        req: &GrantRequest,
    ) -> Result<GrantReply, ServerDown> {
        let Some(door) = &self.grant else {
            return Err(ServerDown {
                cause: Stop::AlreadyStopped,
            });
        };
        if door.stopped() {
            return Err(ServerDown {
                cause: Stop::AlreadyStopped,
            });
        }
        let mut buf = [0u8; MAX_MESSAGE];
        let Ok(n) = abi::encode(req, &mut buf) else {
            return Ok(GrantReply::error(GrantError::Malformed(
                abi::DecodeError::TooLong(MAX_MESSAGE as u32),
            )));
        };
        let mut out = [0u8; MAX_MESSAGE];
        let m = match &door.transport {
            GrantTransport::Direct(server) => {
                abi::grant::grant_dispatch(&**server, &buf[..n], &mut out)
            }
            GrantTransport::Task(task) => match task.call(Op::Request, &buf[..n], &mut out) {
                Ok(m) => m,
                Err(cause) => return Err(self.grant_down(door, req, cause)),
            },
        };
        let reply = abi::decode::<GrantReply>(&out[..m])
            .unwrap_or_else(|e| GrantReply::error(GrantError::Malformed(e)));
        self.carry_out_grant(caller, reply.flush());
        Ok(reply)
    }

    /// Marks the grant server stopped (reported once, by the pCPU that saw
    /// it stop) and stops every domain: without it no split driver can go
    /// on, and none may keep a mapping it can no longer give back.
    fn grant_down(&self, door: &GrantDoor, req: &GrantRequest, cause: Stop) -> ServerDown {
        door.down.store(true, Ordering::Release);
        if cause != Stop::AlreadyStopped {
            crate::kprintln!(
                "svm: grant server `{}` STOPPED on pcpu {} while serving {:?}: {}",
                door.name,
                host::cpu_index(),
                req,
                cause
            );
        }
        for d in self.domains() {
            if !d.stopped.load(Ordering::Acquire) {
                d.stop("grant server stopped", 0);
                host::kick(d.pcpus);
            }
        }
        ServerDown { cause }
    }

    /// Stops the grant server for a decision the kernel refused (`what`
    /// says which and why), as if it had faulted: reported, never called
    /// again, every domain stopped.
    fn grant_broken(&self, what: &str) {
        let Some(door) = &self.grant else { return };
        if door.down.swap(true, Ordering::AcqRel) {
            // Another pCPU refused it first and reported it.
            return;
        }
        crate::kprintln!(
            "svm: grant server `{}` STOPPED on pcpu {}: {what}",
            door.name,
            host::cpu_index()
        );
        self.grant_down(
            door,
            &GrantRequest::GetCounters { domain: None },
            Stop::AlreadyStopped,
        );
    }

    /// Carries out a grant reply's flush: every guest translation on the
    /// named pCPUs (all ASIDs), acknowledged; `AllReloadRoots` (which a
    /// grant server may pass on from the MMU server) also voids every
    /// domain's roots, since the reply does not say whose.
    fn carry_out_grant(&self, caller: Option<&Domain>, flush: Option<FlushObligation>) {
        let Some(f) = flush else { return };
        let me = host::cpu_index();
        bump(&STATS[me].obligations);
        let mut cpus = f.cpus.0 & online_mask();
        if f.scope == FlushScope::AllReloadRoots {
            for d in self.domains() {
                d.root_gen.fetch_add(1, Ordering::AcqRel);
                cpus |= d.pcpus & online_mask();
            }
        }
        let remote = (cpus & !(1u64 << me)).count_ones() as u64;
        STATS[me].ipis.fetch_add(remote, Ordering::Relaxed);
        STATS[me]
            .cpus_flushed
            .fetch_add(cpus.count_ones() as u64, Ordering::Relaxed);
        if let Some(d) = caller {
            bump(&d.grant_obligations);
            d.grant_ipis.fetch_add(remote, Ordering::Relaxed);
            d.grant_cpus_flushed
                .fetch_add(cpus.count_ones() as u64, Ordering::Relaxed);
        }
        if cpus != 0 {
            host::guest_shootdown_all(cpus);
        }
    }
}

/// A guest value narrowed to a wire field; a value that does not fit
/// becomes the field's largest, which no server accepts (references,
/// domains, offsets and lengths all have smaller limits), so the guest gets
/// the server's error naming it rather than a silently truncated request.
fn narrow<T: TryFrom<u64> + Copy>(v: u64, max: T) -> T {
    T::try_from(v).unwrap_or(max)
}

/// The guest's `hc::GRANT` on `dom` with its block at gpa `block`: reads
/// the block, forwards the request with the caller filled in, carries out
/// the reply, writes the outputs back. Returns the call's status (what the
/// hypercall returns), or `Err` when the grant server stopped (the domain
/// is being stopped).
pub(super) fn guest_call(svm: &Svm, dom: &Domain, block: u64) -> Result<u64, ServerDown> {
    bump(&dom.grant_calls);
    let in_one_page = block.is_multiple_of(8) && (block & 0xFFF) + at::SIZE <= 4096;
    let status = if svm.grant.is_none() {
        grant_status::NO_SERVER
    } else if !in_one_page || dom.gpa_ptr(block, at::SIZE).is_none() {
        grant_status::BAD_BLOCK
    } else {
        // In guest memory (checked): reads cannot fail from here on.
        let field = |off: u64| dom.read_u64(block + off).unwrap_or(0);
        let status = match request(dom, &field) {
            Err(status) => status,
            Ok(req) => {
                let reply = svm.grant(Some(dom), &req)?;
                answer(svm, dom, block, &req, reply)
            }
        };
        if svm.grant_stopped() {
            // The kernel refused the server's answer and stopped it.
            return Err(ServerDown {
                cause: Stop::AlreadyStopped,
            });
        }
        dom.write_u64(block + at::STATUS, u64::from(status));
        status
    };
    if status != grant_status::OK {
        bump(&dom.grant_errors);
    }
    Ok(u64::from(status))
}

/// The request the block asks for, from the caller `dom`.
fn request(dom: &Domain, field: &dyn Fn(u64) -> u64) -> Result<GrantRequest, u32> {
    let domain = dom.id;
    let peer = DomainId(narrow(field(at::PEER), u32::MAX));
    let gref = GrantRef(narrow(field(at::GREF), u32::MAX));
    let flags = field(at::FLAGS);
    Ok(match field(at::OP) {
        grant_op::GRANT => GrantRequest::Grant {
            domain,
            gref,
            grantee: peer,
            gfn: Gfn(field(at::GFN)),
            readonly: flags & 1 != 0,
        },
        grant_op::END_ACCESS => GrantRequest::EndAccess { domain, gref },
        grant_op::MAP => GrantRequest::Map {
            domain,
            granter: peer,
            gref,
            gfn: Gfn(field(at::GFN)),
            writable: flags & 1 != 0,
        },
        grant_op::UNMAP => {
            let count = field(at::COUNT);
            if count == 0 || count > MAX_UNMAP_BATCH as u64 {
                return Err(grant_status::BAD_OP);
            }
            let mut handles = heapless::Vec::new();
            for i in 0..count {
                let word = field(at::HANDLES + (i / 2) * 8);
                let h = if i % 2 == 0 {
                    word as u32
                } else {
                    (word >> 32) as u32
                };
                // Cannot fail: count <= MAX_UNMAP_BATCH (checked above).
                let _ = handles.push(MapHandle(h));
            }
            GrantRequest::Unmap { domain, handles }
        }
        grant_op::COPY => GrantRequest::Copy {
            domain,
            granter: peer,
            gref,
            offset: narrow(field(at::OFFSET), u16::MAX),
            local: Gpa(field(at::LOCAL)),
            len: narrow(field(at::LEN), u16::MAX),
            direction: if flags & 2 != 0 {
                CopyDirection::ToGrant
            } else {
                CopyDirection::FromGrant
            },
        },
        _ => return Err(grant_status::BAD_OP),
    })
}

/// Carries out `reply` to `req` for `dom` and writes its outputs into the
/// block; returns the call's status.
fn answer(svm: &Svm, dom: &Domain, block: u64, req: &GrantRequest, reply: GrantReply) -> u32 {
    match (req, reply) {
        (_, GrantReply::Error { reason, .. }) => reason.code(),
        (GrantRequest::Grant { .. } | GrantRequest::EndAccess { .. }, GrantReply::Done { .. }) => {
            grant_status::OK
        }
        (GrantRequest::Map { .. }, GrantReply::Mapped { handle, .. }) => {
            dom.write_u64(block + at::HANDLE, u64::from(handle.0));
            grant_status::OK
        }
        (GrantRequest::Unmap { handles, .. }, GrantReply::Unmapped { status, .. })
            if status.len() == handles.len() =>
        {
            let code = |i: usize| match status.get(i) {
                Some(Err(e)) => e.code(),
                _ => grant_status::OK,
            };
            for pair in 0..MAX_UNMAP_BATCH.div_ceil(2) {
                let (lo, hi) = (code(2 * pair), code(2 * pair + 1));
                dom.write_u64(
                    block + at::STATUSES + pair as u64 * 8,
                    u64::from(lo) | u64::from(hi) << 32,
                );
            }
            let refused = status.iter().filter(|s| s.is_err()).count() as u64;
            dom.grant_errors.fetch_add(refused, Ordering::Relaxed);
            grant_status::OK
        }
        (
            GrantRequest::Copy {
                granter,
                local,
                direction,
                ..
            },
            GrantReply::CopyPlan { src, dst, len, .. },
        ) => match check_plan(svm, dom, *granter, *local, *direction, src.0, dst.0, len) {
            Ok(()) => {
                // SAFETY: check_plan proved both ranges lie inside guest
                // memory the kernel owns (the caller's own, and the
                // granter's), each within one frame; `copy` allows overlap.
                unsafe {
                    core::ptr::copy(host::va(src.0), host::va(dst.0), usize::from(len));
                }
                dom.grant_copied
                    .fetch_add(u64::from(len), Ordering::Relaxed);
                grant_status::OK
            }
            Err(why) => {
                // A server that plans a copy outside what it may name is
                // broken: refused, nothing copied, and stopped like a
                // server that faulted (it is never trusted again).
                svm.grant_broken(&format!(
                    "its copy plan {src:?} -> {dst:?} ({len} bytes) for {req:?} was refused: {why}"
                ));
                grant_status::BAD_PLAN
            }
        },
        (_, other) => {
            crate::kprintln!(
                "svm: grant server `{}` answered {req:?} with {other:?}",
                svm.grant_name()
            );
            grant_status::BAD_REPLY
        }
    }
}

/// Checks a copy plan against what the kernel knows: the caller's side is
/// exactly its own `local` (in its memory), the other side is in the
/// granter's memory, and neither crosses a frame.
#[allow(clippy::too_many_arguments)]
fn check_plan(
    svm: &Svm,
    dom: &Domain,
    granter: DomainId,
    local: Gpa,
    direction: CopyDirection,
    src: u64,
    dst: u64,
    len: u16,
) -> Result<(), &'static str> {
    let len = u64::from(len);
    let in_frame = |a: u64| (a & 0xFFF) + len <= 4096;
    if !in_frame(src) || !in_frame(dst) {
        return Err("a side crosses its frame");
    }
    let Some(peer) = svm.domains().iter().find(|d| d.id == granter) else {
        return Err("the granter is not a domain of this run");
    };
    let (mine, theirs) = match direction {
        CopyDirection::FromGrant => (dst, src),
        CopyDirection::ToGrant => (src, dst),
    };
    if local.0.checked_add(dom.mem_pa) != Some(mine) || !dom.holds(mine, len) {
        return Err("the caller's side is not its own `local` address");
    }
    if !peer.holds(theirs, len) {
        return Err("the granted side is not in the granter's memory");
    }
    Ok(())
}

impl Svm {
    /// The grant server's name, or `-` when the run has none.
    pub fn grant_name(&self) -> &str {
        self.grant.as_ref().map_or("-", |g| g.name.as_str())
    }

    /// Whether the run's grant server was stopped.
    pub fn grant_stopped(&self) -> bool {
        self.grant.as_ref().is_some_and(GrantDoor::stopped)
    }
}
