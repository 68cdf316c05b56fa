//! Split-driver workloads: block-like and net-like frontend/backend pairs that talk over granted ring pages.
//!
//! Each pair is two domains of two vCPUs; vCPU `i` of a frontend talks to
//! vCPU `i` of its backend ([`DomainInfo::peer`](abi::guest::DomainInfo::peer))
//! over ring `i`. Everything crosses domains through the grant table, by the
//! hypercall `hc::GRANT` ([`Door`]).
//!
//! # Rings
//! Frontend vCPU `i` allocates a ring page and grants it writable to the
//! peer under reference `i` (`ring_ref`). Backend vCPU `i` maps it
//! (`connect`, retrying while the reference is not granted yet, for at
//! most `MAP_RETRY_MS`), writes `CONNECTED` into it, and from then on
//! both sides see two single-producer single-consumer queues of `Msg`s in
//! the page (requests towards the backend, responses back; indices with
//! Acquire/Release atomics, `Ring`). Data grants use references from
//! `DATA_REF` on, `DATA_REFS_PER_VCPU` per vCPU.
//!
//! # The block-like pair (`blk-front`, `blk-back`)
//! The frontend issues `BLK_REQUESTS` requests of 1..=32 segments (a
//! seeded mix of `BLK_SIZES`), writes and reads alternately, over a
//! per-vCPU disk of `DISK_BLOCKS` 4 KiB blocks. Each segment is a page of
//! its own granted read-only for a write and writable for a read. The
//! backend maps every segment (writable iff a read), moves the data between
//! the grant and its disk with `COPY` (its CPU never touches a mapping),
//! unmaps all segments in ONE batch, checks every entry's status and
//! answers. The frontend ends access of every segment and checks what a
//! read brought against what it last wrote to each block.
//!
//! # The net-like pair (`net-front`, `net-back`)
//! Both sides compute the same seeded `NetPlan`: `NET_BATCHES` unmap
//! batches of 1..=32 packets, exactly `NET_INSPECTED` of which hold
//! packets flagged "inspect". The frontend sends packets (one page each,
//! granted read-only: a `PACKET_HEADER` and a seeded payload), at most
//! `NET_WINDOW` in flight. The backend grant-copies each header into its
//! own memory and checks it, maps the page, reads the payload through its
//! mapping only for inspected packets (verifying the checksum), unmaps each
//! batch in one call and acknowledges every packet with its checksum. The
//! grant server's accessed-bit hint can skip the flush of every batch
//! without an inspected packet: the backend prints the exact fraction its
//! schedule expects (the ring's own unmap, accessed, included).
//!
//! # Shutdown and hostile checks
//! A frontend vCPU that is done queues `Op::Close`; the backend unmaps the
//! ring and reports; the frontend retries `END_ACCESS` of the ring while it
//! answers `StillMapped` and then reports. vCPU 0 of each workload also
//! checks a handful of refusals with their exact status (double unmap,
//! `END_ACCESS` while mapped, a read-only grant mapped writable, a
//! reference out of range, a copy crossing its page, a `MAP` inside own
//! memory). vCPU 0 of each domain gathers its vCPUs' counts, prints the
//! domain's line and reports.

use crate::rt::{
    alloc_page, domain, exit, finish, hypercall, map4k, phys, probe_read, pt_lock, pt_unlock, puts,
    rd, rdtsc, tsc_per_ms, vcpu, wr, yield_now, Rng,
};
use abi::grant::{CopyDirection, GrantError, GrantRef, MapHandle, MAX_UNMAP_BATCH};
use abi::guest::{grant_op, grant_status, hc, GrantCall, DIRECT_BASE, WORK_BASE};
use abi::mmu::MmuError;
use abi::{DomainId, Gfn, Gpa, Gva, PAGE_SIZE};
use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

// ---------------------------------------------------------------------------
// The console.

/// The guest console as a `core::fmt` sink.
struct Console;

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        puts(s);
        Ok(())
    }
}

/// `part` of `whole` as a percentage with one decimal.
struct Percent(u64, u64);

impl fmt::Display for Percent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let permille = self.0.saturating_mul(1000).checked_div(self.1).unwrap_or(0);
        write!(f, "{}.{}%", permille / 10, permille % 10)
    }
}

/// Prints a formatted line on the console (`println!`'s arguments). The
/// kernel cuts guest lines at 120 characters: keep each line shorter.
macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = fmt::Write::write_fmt(&mut Console, format_args!($($arg)*));
        puts("\n");
    }};
}

// ---------------------------------------------------------------------------
// The door: one function per grant operation.

/// A vCPU's door to the grant table: the page its [`GrantCall`] blocks are
/// built in, and the peer domain its calls name.
pub struct Door {
    block: Gpa,
    peer: DomainId,
}

impl Door {
    /// A door for this vCPU (allocates its block page) towards `peer`.
    pub fn new(peer: DomainId) -> Door {
        Door {
            block: Gpa(alloc_page()),
            peer,
        }
    }

    /// Builds the block, makes the hypercall and reads the block back; the
    /// status (the hypercall's result) is the error.
    fn call(&self, input: GrantCall) -> Result<GrantCall, u32> {
        let p = phys::<GrantCall>(self.block.0);
        // SAFETY: the block page is this vCPU's own (allocated in `new`,
        // used by no one else), page-aligned, and a GrantCall fits in it.
        unsafe { p.write_volatile(input) };
        let status = hypercall(hc::GRANT, self.block.0, 0, 0);
        // SAFETY: as above; the kernel wrote the outputs back before this
        // vCPU resumed.
        let out = unsafe { p.read_volatile() };
        match u32::try_from(status) {
            Ok(grant_status::OK) => Ok(out),
            Ok(s) => Err(s),
            Err(_) => Err(u32::MAX),
        }
    }

    /// Grants the peer access to own frame `gfn` under `gref`.
    pub fn grant(&self, gref: GrantRef, gfn: Gfn, readonly: bool) -> Result<(), u32> {
        self.call(GrantCall {
            op: grant_op::GRANT,
            peer: u64::from(self.peer.0),
            gref: u64::from(gref.0),
            gfn: gfn.0,
            flags: u64::from(readonly),
            ..GrantCall::default()
        })
        .map(|_| ())
    }

    /// Ends access through own `gref` (refused while it is mapped).
    pub fn end_access(&self, gref: GrantRef) -> Result<(), u32> {
        self.call(GrantCall {
            op: grant_op::END_ACCESS,
            gref: u64::from(gref.0),
            ..GrantCall::default()
        })
        .map(|_| ())
    }

    /// Maps the peer's `gref` at own guest frame `at` (above own memory).
    pub fn map(&self, gref: GrantRef, at: Gfn, writable: bool) -> Result<MapHandle, u32> {
        let out = self.call(GrantCall {
            op: grant_op::MAP,
            peer: u64::from(self.peer.0),
            gref: u64::from(gref.0),
            gfn: at.0,
            flags: u64::from(writable),
            ..GrantCall::default()
        })?;
        u32::try_from(out.handle)
            .map(MapHandle)
            .map_err(|_| grant_status::BAD_REPLY)
    }

    /// Unmaps `handles` (1..=32 of them) in one batch; the per-entry
    /// statuses come back in the first `handles.len()` slots.
    pub fn unmap(&self, handles: &[MapHandle]) -> Result<[u32; MAX_UNMAP_BATCH], u32> {
        if handles.is_empty() || handles.len() > MAX_UNMAP_BATCH {
            return Err(grant_status::BAD_OP);
        }
        let mut input = GrantCall {
            op: grant_op::UNMAP,
            count: handles.len() as u64,
            ..GrantCall::default()
        };
        for (slot, h) in input.handles.iter_mut().zip(handles) {
            *slot = h.0;
        }
        self.call(input).map(|out| out.statuses)
    }

    /// Copies `len` bytes between the peer's `gref` at byte `offset` and
    /// own guest-physical `local`, in direction `dir`.
    pub fn copy(
        &self,
        gref: GrantRef,
        offset: u64,
        local: Gpa,
        len: u64,
        dir: CopyDirection,
    ) -> Result<(), u32> {
        self.call(GrantCall {
            op: grant_op::COPY,
            peer: u64::from(self.peer.0),
            gref: u64::from(gref.0),
            offset,
            local: local.0,
            len,
            flags: match dir {
                CopyDirection::FromGrant => 0,
                CopyDirection::ToGrant => 2,
            },
            ..GrantCall::default()
        })
        .map(|_| ())
    }
}

/// Status of `GrantError::NotGranted`.
const NOT_GRANTED: u32 = GrantError::NotGranted {
    granter: DomainId(0),
    gref: GrantRef(0),
}
.code();
/// Status of `GrantError::UnknownDomain`.
const UNKNOWN_DOMAIN: u32 = GrantError::UnknownDomain(DomainId(0)).code();
/// Status of `GrantError::StillMapped`.
const STILL_MAPPED: u32 = GrantError::StillMapped {
    gref: GrantRef(0),
    maps: 0,
}
.code();
/// Status of `GrantError::BadHandle`.
const BAD_HANDLE: u32 = GrantError::BadHandle(MapHandle(0)).code();
/// Status of `GrantError::ReadOnly`.
const READ_ONLY: u32 = GrantError::ReadOnly(GrantRef(0)).code();
/// Status of `GrantError::RefOutOfRange`.
const REF_OUT_OF_RANGE: u32 = GrantError::RefOutOfRange {
    gref: GrantRef(0),
    limit: 0,
}
.code();
/// Status of `GrantError::CopyCrossesPage`.
const COPY_CROSSES_PAGE: u32 = GrantError::CopyCrossesPage { offset: 0, len: 0 }.code();
/// Status of `GrantError::GfnNotInMemory`.
const GFN_NOT_IN_MEMORY: u32 = GrantError::GfnNotInMemory(Gfn(0)).code();
/// Status of `GrantError::Mmu` (any MMU server refusal).
const MMU_REFUSED: u32 = GrantError::Mmu(MmuError::GfnInUse(Gfn(0))).code();

/// A status's name for the console.
fn status_name(s: u32) -> &'static str {
    match s {
        grant_status::OK => "OK",
        NOT_GRANTED => "NotGranted",
        UNKNOWN_DOMAIN => "UnknownDomain",
        STILL_MAPPED => "StillMapped",
        BAD_HANDLE => "BadHandle",
        READ_ONLY => "ReadOnly",
        REF_OUT_OF_RANGE => "RefOutOfRange",
        COPY_CROSSES_PAGE => "CopyCrossesPage",
        GFN_NOT_IN_MEMORY => "GfnNotInMemory",
        MMU_REFUSED => "Mmu (the MMU server refused)",
        grant_status::BAD_BLOCK => "kernel: BAD_BLOCK",
        grant_status::BAD_OP => "kernel: BAD_OP",
        grant_status::NO_SERVER => "kernel: NO_SERVER",
        grant_status::SERVER_DOWN => "kernel: SERVER_DOWN",
        grant_status::BAD_PLAN => "kernel: BAD_PLAN",
        grant_status::BAD_REPLY => "kernel: BAD_REPLY",
        _ => "another grant error",
    }
}

// ---------------------------------------------------------------------------
// Failing, waiting, gathering: one domain's vCPUs end together.

/// `shared` slot set when a vCPU of the domain failed (the others stop
/// waiting for it).
const FAILED: usize = 0;
/// `shared` slot counting the vCPUs other than 0 that finished.
const DONE: usize = 1;
/// First `shared` slot of the summed counts.
const SUMS: usize = 2;
/// Counts a vCPU hands to vCPU 0 at the end.
const COUNTS: usize = 6;

/// How long a side waits for its peer's next step.
const PEER_TIMEOUT_MS: u64 = 20_000;
/// How long a backend retries mapping a ring that is not granted yet.
const MAP_RETRY_MS: u64 = 2_000;

/// Fails the workload (and tells the domain's other vCPUs to stop waiting).
fn die(what: &str, value: u64) -> ! {
    domain().shared[FAILED].store(1, Ordering::Release);
    say!("FAIL: {what} {value:#x}");
    finish(false, value)
}

/// Fails the workload with a grant status, named.
fn die_status(what: &str, status: u32) -> ! {
    domain().shared[FAILED].store(1, Ordering::Release);
    let s = u64::from(status);
    say!("FAIL: {what}: status {} {s:#x}", status_name(status));
    finish(false, s)
}

/// Unwraps a grant result, failing with `what` and the status.
fn must<T>(what: &str, r: Result<T, u32>) -> T {
    r.unwrap_or_else(|s| die_status(what, s))
}

/// Checks that a call was refused with exactly `want`.
fn refused(what: &str, r: Result<(), u32>, want: u32) {
    match r {
        Err(s) if s == want => {}
        Err(s) => {
            say!("expected {}", status_name(want));
            die_status(what, s)
        }
        Ok(()) => die(what, 0),
    }
}

/// A MAP expected to be refused, as a result for [`refused`]: a mapping it
/// made anyway is undone first.
fn map_refused(door: &Door, r: Result<MapHandle, u32>) -> Result<(), u32> {
    r.map(|h| {
        let _ = door.unmap(&[h]);
    })
}

/// Waits (yielding) until `ready()` holds; fails with `what` after `ms`
/// milliseconds of TSC time, and ends quietly when another vCPU of the
/// domain failed.
fn wait_until(what: &str, ms: u64, mut ready: impl FnMut() -> bool) {
    let deadline = rdtsc() + ms * tsc_per_ms();
    while !ready() {
        if domain().shared[FAILED].load(Ordering::Acquire) != 0 {
            exit(1)
        }
        if rdtsc() > deadline {
            die(what, ms)
        }
        yield_now();
    }
}

/// Ends this vCPU's part: vCPUs other than 0 add their counts and exit;
/// vCPU 0 waits for them and gets the domain's sums (to print, then report).
fn gather(counts: [u64; COUNTS]) -> [u64; COUNTS] {
    let d = domain();
    for (i, c) in counts.iter().enumerate() {
        d.shared[SUMS + i].fetch_add(*c, Ordering::AcqRel);
    }
    if vcpu().index != 0 {
        d.shared[DONE].fetch_add(1, Ordering::AcqRel);
        exit(0)
    }
    wait_until(
        "the other vCPUs did not finish in time (ms)",
        PEER_TIMEOUT_MS,
        || d.shared[DONE].load(Ordering::Acquire) + 1 >= d.vcpus,
    );
    core::array::from_fn(|i| d.shared[SUMS + i].load(Ordering::Acquire))
}

/// The peer domain, or a failure when the loader named none.
fn peer() -> DomainId {
    match u32::try_from(domain().peer) {
        Ok(p) if p != 0 => DomainId(p),
        _ => die("split: no peer domain", domain().peer),
    }
}

// ---------------------------------------------------------------------------
// Rings.

/// The grant reference of vCPU `me`'s ring.
fn ring_ref(me: u64) -> GrantRef {
    GrantRef(me as u32)
}

/// References in each domain's grant table.
const GRANT_REFS: u64 = 512;
/// The first reference of the data grants.
const DATA_REF: u32 = 16;
/// Data references per vCPU.
const DATA_REFS_PER_VCPU: u32 = 64;
const _: () = assert!(DATA_REF as u64 + 2 * DATA_REFS_PER_VCPU as u64 <= GRANT_REFS);

/// Data reference `k` of vCPU `me`.
fn data_ref(me: u64, k: u64) -> GrantRef {
    GrantRef(DATA_REF + me as u32 * DATA_REFS_PER_VCPU + k as u32)
}

/// What a [`Msg`] asks or answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
enum Op {
    /// Write `count` blocks from `block` on, from the segments granted
    /// under `gref..gref + count`.
    BlkWrite = 1,
    /// Read `count` blocks from `block` on into the segments.
    BlkRead = 2,
    /// A packet in the page granted under `gref`.
    Packet = 3,
    /// The frontend vCPU is done: unmap the ring.
    Close = 4,
}

impl Op {
    fn from_word(w: u64) -> Option<Op> {
        [Op::BlkWrite, Op::BlkRead, Op::Packet, Op::Close]
            .into_iter()
            .find(|op| *op as u64 == w)
    }
}

/// One ring message, requests and responses alike (a response repeats its
/// request's fields and sets `status` and `value`).
#[derive(Clone, Copy, Debug, Default)]
struct Msg {
    /// An [`Op`].
    op: u64,
    /// The request's number (per ring, from 0).
    id: u64,
    /// The (first) data grant reference.
    gref: u64,
    /// Blocks (segments) of a block request.
    count: u64,
    /// First block of a block request.
    block: u64,
    /// A response's grant status (0: done).
    status: u64,
    /// A packet's checksum (response).
    value: u64,
}

/// Words in a [`Msg`].
const MSG_WORDS: u64 = 7;
/// Slots in each queue.
const RING_SLOTS: u64 = 32;
// The ring page's layout (byte offsets): four indices, each on its own
// cache line, the backend's connected mark, then the two queues.
/// Requests queued (written by the frontend).
const REQ_PROD: u64 = 0;
/// Requests taken (written by the backend).
const REQ_CONS: u64 = 64;
/// Responses queued (written by the backend).
const RSP_PROD: u64 = 128;
/// Responses taken (written by the frontend).
const RSP_CONS: u64 = 192;
/// Where the backend writes [`CONNECTED_MAGIC`] once it has mapped the ring.
const CONNECTED: u64 = 248;
/// The connected mark (reads "ring up!" in memory).
const CONNECTED_MAGIC: u64 = u64::from_le_bytes(*b"ring up!");
/// The request queue's slots.
const REQ_AREA: u64 = 256;
/// The response queue's slots.
const RSP_AREA: u64 = REQ_AREA + RING_SLOTS * MSG_WORDS * 8;
const _: () = assert!(RSP_AREA + RING_SLOTS * MSG_WORDS * 8 <= PAGE_SIZE);

/// One of the two queues of a ring page: the offsets of its producer and
/// consumer indices and of its slots.
struct Queue {
    prod: u64,
    cons: u64,
    area: u64,
}

/// Frontend to backend.
const REQUESTS: Queue = Queue {
    prod: REQ_PROD,
    cons: REQ_CONS,
    area: REQ_AREA,
};
/// Backend to frontend.
const RESPONSES: Queue = Queue {
    prod: RSP_PROD,
    cons: RSP_CONS,
    area: RSP_AREA,
};

/// A ring page as one side reaches it (the frontend through its direct
/// map, the backend through its mapping of the grant).
struct Ring {
    base: Gva,
}

impl Ring {
    fn word(&self, off: u64) -> &AtomicU64 {
        // SAFETY: `base` maps a whole ring page for as long as this side
        // uses the Ring (the frontend owns it; the backend unmaps it only
        // after its last use); `off` is an 8-aligned offset inside it.
        unsafe { &*((self.base.0 + off) as *const AtomicU64) }
    }

    /// Queues `m` on `q` (this side is its only producer); false when full.
    fn push(&self, q: &Queue, m: Msg) -> bool {
        let prod = self.word(q.prod).load(Ordering::Relaxed);
        if prod.wrapping_sub(self.word(q.cons).load(Ordering::Acquire)) >= RING_SLOTS {
            return false;
        }
        let at = q.area + (prod % RING_SLOTS) * MSG_WORDS * 8;
        let words = [m.op, m.id, m.gref, m.count, m.block, m.status, m.value];
        for (i, w) in words.into_iter().enumerate() {
            self.word(at + i as u64 * 8).store(w, Ordering::Relaxed);
        }
        self.word(q.prod)
            .store(prod.wrapping_add(1), Ordering::Release);
        true
    }

    /// Takes the next message of `q` (this side is its only consumer).
    fn pop(&self, q: &Queue) -> Option<Msg> {
        let cons = self.word(q.cons).load(Ordering::Relaxed);
        let prod = self.word(q.prod).load(Ordering::Acquire);
        if cons == prod {
            return None;
        }
        if prod.wrapping_sub(cons) > RING_SLOTS {
            die(
                "ring: the peer's producer index runs ahead by",
                prod.wrapping_sub(cons),
            )
        }
        let at = q.area + (cons % RING_SLOTS) * MSG_WORDS * 8;
        let w = |i: u64| self.word(at + i * 8).load(Ordering::Relaxed);
        let m = Msg {
            op: w(0),
            id: w(1),
            gref: w(2),
            count: w(3),
            block: w(4),
            status: w(5),
            value: w(6),
        };
        self.word(q.cons)
            .store(cons.wrapping_add(1), Ordering::Release);
        Some(m)
    }

    /// Queues `m`, waiting (bounded) while the queue is full.
    fn send(&self, q: &Queue, m: Msg) {
        wait_until(
            "ring: the peer left the queue full (ms)",
            PEER_TIMEOUT_MS,
            || self.push(q, m),
        );
    }

    /// The next message of `q`, waiting (bounded) for it.
    fn receive(&self, q: &Queue) -> Msg {
        let mut got = None;
        wait_until(
            "ring: no message from the peer in time (ms)",
            PEER_TIMEOUT_MS,
            || {
                got = self.pop(q);
                got.is_some()
            },
        );
        got.unwrap_or_else(|| die("ring: message lost", 0))
    }
}

/// The frontend's side of ring `me`: allocates the page, grants it to the
/// peer and waits until the backend has mapped it.
fn offer_ring(door: &Door, me: u64) -> Ring {
    let gpa = Gpa(alloc_page());
    must(
        "granting the ring page",
        door.grant(ring_ref(me), gpa.frame(), false),
    );
    let ring = Ring {
        base: Gva(DIRECT_BASE + gpa.0),
    };
    wait_until(
        "the backend did not map the ring in time (ms)",
        PEER_TIMEOUT_MS,
        || ring.word(CONNECTED).load(Ordering::Acquire) == CONNECTED_MAGIC,
    );
    ring
}

/// The frontend's end of ring `me` after its last request: queues
/// [`Op::Close`] and retries `END_ACCESS` of the ring while the backend
/// still maps it. Returns how many times it was refused.
fn close_ring(door: &Door, ring: &Ring, me: u64) -> u64 {
    ring.send(
        &REQUESTS,
        Msg {
            op: Op::Close as u64,
            id: u64::MAX,
            ..Msg::default()
        },
    );
    let mut refusals = 0u64;
    wait_until(
        "the backend did not unmap the ring in time (ms)",
        PEER_TIMEOUT_MS,
        || match door.end_access(ring_ref(me)) {
            Ok(()) => true,
            Err(STILL_MAPPED) => {
                refusals += 1;
                false
            }
            Err(s) => die_status("END_ACCESS of the ring", s),
        },
    );
    refusals
}

/// Checks the refusals a frontend's vCPU 0 can provoke on its own: ending
/// access of the mapped ring, a reference out of range, a reference never
/// granted. Returns how many it checked.
fn front_refusals(door: &Door, me: u64, scratch: Gfn) -> u64 {
    refused(
        "END_ACCESS of the mapped ring",
        door.end_access(ring_ref(me)),
        STILL_MAPPED,
    );
    refused(
        "GRANT under reference 512 (table size 512)",
        door.grant(GrantRef(GRANT_REFS as u32), scratch, true),
        REF_OUT_OF_RANGE,
    );
    refused(
        "END_ACCESS of a reference never granted",
        door.end_access(GrantRef(DATA_REF - 1)),
        NOT_GRANTED,
    );
    3
}

/// The backend's frames for foreign mappings: vCPU `me`'s slot `k` is guest
/// frame `mem_pages + me * SLOTS + k`, reached at a fixed gva through a PTE
/// mapped once. Slot 0 holds the ring, slots 1..=32 the data, [`SPARE`]
/// only what a refused MAP would have mapped.
struct Slots {
    first_gfn: u64,
    first_gva: u64,
}

/// The slot the refusal checks aim their MAPs at (past a full batch).
const SPARE: u64 = 1 + MAX_UNMAP_BATCH as u64;
/// Slots per vCPU: the ring, a full batch, the spare.
const SLOTS: u64 = SPARE + 1;

impl Slots {
    /// Maps the slots' PTEs (the frames above memory stay unreachable
    /// until a MAP puts a grant there; the backend touches a slot only
    /// while it holds a mapping in it).
    fn new(me: u64) -> Slots {
        let d = domain();
        let s = Slots {
            first_gfn: d.mem_bytes / PAGE_SIZE + me * SLOTS,
            first_gva: WORK_BASE + me * SLOTS * PAGE_SIZE,
        };
        pt_lock();
        for k in 0..SLOTS {
            map4k(d.l4_gpa, s.gva(k).0, s.gfn(k).base().0, abi::guest::pte::W);
        }
        pt_unlock();
        s
    }

    fn gfn(&self, k: u64) -> Gfn {
        Gfn(self.first_gfn + k)
    }

    fn gva(&self, k: u64) -> Gva {
        Gva(self.first_gva + k * PAGE_SIZE)
    }
}

/// The backend's side of ring `me`: maps the peer's ring reference in slot
/// 0 (retrying while it is not granted yet, or while the peer is not known
/// to the grant server yet) and marks the ring connected.
fn connect(door: &Door, slots: &Slots, me: u64) -> (Ring, MapHandle, u64) {
    let mut retries = 0u64;
    let mut handle = None;
    wait_until(
        "the frontend did not grant its ring in time (ms)",
        MAP_RETRY_MS,
        || match door.map(ring_ref(me), slots.gfn(0), true) {
            Ok(h) => {
                handle = Some(h);
                true
            }
            Err(NOT_GRANTED | UNKNOWN_DOMAIN) => {
                retries += 1;
                false
            }
            Err(s) => die_status("MAP of the ring", s),
        },
    );
    let handle = handle.unwrap_or_else(|| die("ring: no handle", 0));
    let ring = Ring { base: slots.gva(0) };
    ring.word(CONNECTED)
        .store(CONNECTED_MAGIC, Ordering::Release);
    (ring, handle, retries)
}

/// Unmaps `handles` in one batch (`what` names it in a failure) and checks
/// every entry's status; with `twice`, then unmaps the first handle again
/// and checks that it is refused as `BadHandle`. Returns the refusals it
/// checked.
fn unmap_batch(door: &Door, what: &str, handles: &[MapHandle], twice: bool) -> u64 {
    let statuses = must(what, door.unmap(handles));
    if let Some(&bad) = statuses[..handles.len()]
        .iter()
        .find(|&&s| s != grant_status::OK)
    {
        die_status(what, bad)
    }
    if !twice {
        return 0;
    }
    let again = must(what, door.unmap(&handles[..1]));
    refused("second UNMAP of a handle", Err(again[0]), BAD_HANDLE);
    1
}

/// A 64-bit mix (splitmix64's finaliser).
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

// ---------------------------------------------------------------------------
// The block-like pair.

/// Requests per frontend vCPU (half writes, half reads).
const BLK_REQUESTS: u64 = 100;
/// Segments per request, picked by a seeded generator (the first write and
/// read take 32, a full batch).
const BLK_SIZES: [u64; 7] = [1, 2, 4, 8, 11, 16, 32];
/// Blocks of each vCPU's disk.
const DISK_BLOCKS: u64 = 64;
/// What a read's segment holds before the backend fills it.
const POISON: u64 = 0xDEAD_BEEF_DEAD_BEEF;
/// Seed of the block frontend's schedule (xor the vCPU index).
const BLK_SEED: u64 = 0x0B10_C5EE_D000_0001;

/// Word `w` of vCPU `me`'s disk block `block` after its `version`-th write
/// (version 0: never written, zeros).
fn block_word(me: u64, block: u64, version: u64, w: u64) -> u64 {
    if version == 0 {
        return 0;
    }
    mix((me << 56) ^ (block << 40) ^ (version << 16) ^ w) | 1
}

/// `blk-front`: see the module docs.
pub fn blk_front(me: u64) -> ! {
    let door = Door::new(peer());
    say!(
        "blk-front v{me}: ring ref {} to domain {}; {BLK_REQUESTS} requests of 1..=32 segments",
        ring_ref(me).0,
        door.peer.0
    );
    let ring = offer_ring(&door, me);
    let segs: [u64; MAX_UNMAP_BATCH] = core::array::from_fn(|_| alloc_page());
    let refusals = if me == 0 {
        front_refusals(&door, me, Gpa(segs[0]).frame())
    } else {
        0
    };
    let mut versions = [0u64; DISK_BLOCKS as usize];
    let mut rng = Rng(BLK_SEED ^ me);
    let (mut segments, mut checked) = (0u64, 0u64);
    for id in 0..BLK_REQUESTS {
        let write = id % 2 == 0;
        let n = if id < 2 {
            MAX_UNMAP_BATCH as u64
        } else {
            BLK_SIZES[(rng.next_u64() % BLK_SIZES.len() as u64) as usize]
        };
        let start = rng.next_u64() % (DISK_BLOCKS - n + 1);
        for k in 0..n {
            let page = segs[k as usize];
            let b = start + k;
            if write {
                versions[b as usize] += 1;
            }
            for w in 0..PAGE_SIZE / 8 {
                let v = if write {
                    block_word(me, b, versions[b as usize], w)
                } else {
                    POISON
                };
                wr(page + w * 8, v);
            }
            must(
                "blk-front: GRANT of a segment",
                door.grant(data_ref(me, k), Gpa(page).frame(), write),
            );
        }
        let op = if write { Op::BlkWrite } else { Op::BlkRead };
        ring.send(
            &REQUESTS,
            Msg {
                op: op as u64,
                id,
                gref: u64::from(data_ref(me, 0).0),
                count: n,
                block: start,
                ..Msg::default()
            },
        );
        let rsp = ring.receive(&RESPONSES);
        if rsp.op != op as u64 || rsp.id != id {
            die("blk-front: response to another request, id", rsp.id)
        }
        if rsp.status != u64::from(grant_status::OK) {
            die("blk-front: the backend failed request", id)
        }
        for k in 0..n {
            must(
                "blk-front: END_ACCESS of an answered segment",
                door.end_access(data_ref(me, k)),
            );
        }
        if !write {
            for k in 0..n {
                let (page, b) = (segs[k as usize], start + k);
                for w in 0..PAGE_SIZE / 8 {
                    let want = block_word(me, b, versions[b as usize], w);
                    let got = rd(page + w * 8);
                    if got != want {
                        say!("blk-front: block {b} word {w} read {got:#x} want {want:#x}");
                        die(
                            "blk-front: a read returned other data than written, block",
                            b,
                        )
                    }
                }
                checked += 1;
            }
        }
        segments += n;
    }
    let close_refusals = close_ring(&door, &ring, me);
    say!(
        "blk-front v{me}: {BLK_REQUESTS} requests, {segments} segments, {checked} blocks read \
         back and checked; ring freed after {close_refusals} StillMapped"
    );
    let [requests, segments, checked, refusals, ..] =
        gather([BLK_REQUESTS, segments, checked, refusals, 0, 0]);
    say!(
        "blk-front: {requests} requests, {segments} segments, {checked} blocks checked end \
         to end; {refusals} refusals ok"
    );
    finish(true, segments)
}

/// `blk-back`: see the module docs.
pub fn blk_back(me: u64) -> ! {
    let door = Door::new(peer());
    say!(
        "blk-back v{me}: maps ring ref {} of domain {}; disk of {DISK_BLOCKS} blocks",
        ring_ref(me).0,
        door.peer.0
    );
    let slots = Slots::new(me);
    let disk: [u64; DISK_BLOCKS as usize] = core::array::from_fn(|_| alloc_page());
    let (ring, ring_handle, retries) = connect(&door, &slots, me);
    let (mut requests, mut segments, mut batches, mut refusals) = (0u64, 0u64, 0u64, 0u64);
    loop {
        let req = ring.receive(&REQUESTS);
        let write = match Op::from_word(req.op) {
            Some(Op::Close) => break,
            Some(Op::BlkWrite) => true,
            Some(Op::BlkRead) => false,
            _ => die("blk-back: unknown request op", req.op),
        };
        let n = req.count;
        let in_disk = req
            .block
            .checked_add(n)
            .is_some_and(|end| end <= DISK_BLOCKS);
        let in_table = req.gref.checked_add(n).is_some_and(|end| end <= GRANT_REFS);
        if n == 0 || n > MAX_UNMAP_BATCH as u64 || !in_disk || !in_table {
            die("blk-back: request out of bounds, id", req.id)
        }
        let first = req.gref as u32;
        let mut handles = [MapHandle(0); MAX_UNMAP_BATCH];
        for k in 0..n {
            handles[k as usize] = must(
                "blk-back: MAP of a segment",
                door.map(GrantRef(first + k as u32), slots.gfn(1 + k), !write),
            );
        }
        if me == 0 && requests == 0 && write {
            refusals += blk_refusals(&door, &slots, GrantRef(first), Gpa(disk[0]));
        }
        for k in 0..n {
            let (gref, local) = (
                GrantRef(first + k as u32),
                Gpa(disk[(req.block + k) as usize]),
            );
            let dir = if write {
                CopyDirection::FromGrant
            } else {
                CopyDirection::ToGrant
            };
            must(
                "blk-back: COPY of a segment",
                door.copy(gref, 0, local, PAGE_SIZE, dir),
            );
        }
        refusals += unmap_batch(
            &door,
            "blk-back: UNMAP of a request's segments",
            &handles[..n as usize],
            me == 0 && requests == 0,
        );
        batches += 1;
        ring.send(
            &RESPONSES,
            Msg {
                status: u64::from(grant_status::OK),
                ..req
            },
        );
        requests += 1;
        segments += n;
    }
    unmap_batch(&door, "UNMAP of the ring", &[ring_handle], false);
    batches += 1;
    say!(
        "blk-back v{me}: {requests} requests, {segments} segments, {batches} unmap batches \
         (ring's included), {retries} MAP retries"
    );
    let [requests, segments, batches, refusals, ..] =
        gather([requests, segments, batches, refusals, 0, 0]);
    // Only the rings' unmaps find an accessed entry: the device never
    // touches a segment's mapping.
    let accessed = domain().vcpus;
    let avoided = batches - accessed;
    say!(
        "blk-back: {requests} requests, {segments} segments, {batches} batches, {accessed} \
         accessed: expected avoided {avoided}/{batches} = {}; {refusals} refusals ok",
        Percent(avoided, batches)
    );
    finish(true, batches)
}

/// The refusals a block backend checks while segment `gref` (granted
/// read-only) is mapped: mapping it writable, a reference out of range, a
/// copy crossing the page, a MAP inside own memory at `own` (any error;
/// printed). Returns how many it checked.
fn blk_refusals(door: &Door, slots: &Slots, gref: GrantRef, own: Gpa) -> u64 {
    let spare = slots.gfn(SPARE);
    let r = map_refused(door, door.map(gref, spare, true));
    refused("MAP of a read-only grant writable", r, READ_ONLY);
    let r = map_refused(door, door.map(GrantRef(GRANT_REFS as u32), spare, false));
    refused("MAP of reference 512 (table size 512)", r, REF_OUT_OF_RANGE);
    refused(
        "COPY of 200 bytes at offset 4000",
        door.copy(gref, 4000, own, 200, CopyDirection::FromGrant),
        COPY_CROSSES_PAGE,
    );
    match door.map(gref, own.frame(), false) {
        Ok(h) => {
            let _ = door.unmap(&[h]);
            die(
                "blk-back: MAP at a gfn inside own memory succeeded, gfn",
                own.frame().0,
            )
        }
        Err(s) => {
            say!(
                "blk-back v0: MAP at gfn {:#x} inside own memory refused: {} {s:#x}",
                own.frame().0,
                status_name(s)
            );
        }
    }
    4
}

// ---------------------------------------------------------------------------
// The net-like pair.

/// Unmap batches per backend vCPU.
const NET_BATCHES: usize = 60;
/// Of those, batches holding at least one inspected packet.
const NET_INSPECTED: usize = 8;
/// Packets per batch, picked by a seeded generator.
const NET_SIZES: [u8; 10] = [1, 2, 3, 4, 6, 8, 11, 16, 24, 32];
/// Packets a frontend vCPU keeps in flight at most (every batch fits).
const NET_WINDOW: u64 = 32;
const _: () = assert!(NET_WINDOW >= MAX_UNMAP_BATCH as u64 && NET_WINDOW <= RING_SLOTS);
const _: () = assert!(NET_WINDOW <= DATA_REFS_PER_VCPU as u64);
/// Seed of the net schedule (xor the vCPU index).
const NET_SEED: u64 = 0x0E75_EED0_0000_0002;
/// Bytes of a packet's header (what the backend grant-copies).
const PACKET_HEADER: u64 = 64;
/// The most payload bytes of a packet.
const PAYLOAD_MAX: u64 = PAGE_SIZE - PACKET_HEADER;
/// A packet header's first word.
const PACKET_MAGIC: u64 = u64::from_le_bytes(*b"packet!!");
/// Header flag: the backend reads the payload through its mapping.
const INSPECT: u64 = 1;

/// A vCPU's net schedule, the same on both sides: batch sizes and which
/// packets of each batch are inspected (bit `j`: packet `j`).
struct NetPlan {
    sizes: [u8; NET_BATCHES],
    inspect: [u32; NET_BATCHES],
}

impl NetPlan {
    fn new(me: u64) -> NetPlan {
        let mut rng = Rng(NET_SEED ^ me);
        let mut sizes = [0u8; NET_BATCHES];
        for s in sizes.iter_mut() {
            *s = NET_SIZES[(rng.next_u64() % NET_SIZES.len() as u64) as usize];
        }
        // Exactly NET_INSPECTED batches (selection sampling), each with a
        // seeded non-empty set of inspected packets.
        let mut inspect = [0u32; NET_BATCHES];
        let mut left = NET_INSPECTED as u64;
        for (b, m) in inspect.iter_mut().enumerate() {
            if rng.next_u64() % (NET_BATCHES - b) as u64 >= left {
                continue;
            }
            left -= 1;
            let all = (1u64 << sizes[b]) - 1;
            let bits = rng.next_u64() & rng.next_u64() & all;
            *m = if bits == 0 {
                1 << (rng.next_u64() % u64::from(sizes[b]))
            } else {
                bits as u32
            };
        }
        NetPlan { sizes, inspect }
    }

    fn packets(&self) -> u64 {
        self.sizes.iter().map(|&s| u64::from(s)).sum()
    }

    fn inspected_batches(&self) -> u64 {
        self.inspect.iter().filter(|&&m| m != 0).count() as u64
    }

    /// Packet `seq`'s batch and place in it.
    fn place(&self, seq: u64) -> (usize, u64) {
        let mut first = 0;
        for (b, &s) in self.sizes.iter().enumerate() {
            if seq < first + u64::from(s) {
                return (b, seq - first);
            }
            first += u64::from(s);
        }
        die("net: packet beyond the plan", seq)
    }

    fn inspected(&self, seq: u64) -> bool {
        let (b, j) = self.place(seq);
        self.inspect[b] >> j & 1 != 0
    }
}

/// Folds one payload word into a checksum.
fn fold(sum: u64, word: u64) -> u64 {
    (sum ^ word)
        .wrapping_mul(0x0000_0100_0000_01B3)
        .rotate_left(7)
}

/// The payload's last word keeps only its `len % 8` first bytes (if any).
fn last_word_mask(len: u64) -> u64 {
    match len % 8 {
        0 => u64::MAX,
        r => (1u64 << (r * 8)) - 1,
    }
}

/// `net-front`: see the module docs.
pub fn net_front(me: u64) -> ! {
    let door = Door::new(peer());
    let plan = NetPlan::new(me);
    let total = plan.packets();
    say!(
        "net-front v{me}: ring ref {} to domain {}; {total} packets, window {NET_WINDOW}",
        ring_ref(me).0,
        door.peer.0
    );
    let ring = offer_ring(&door, me);
    let pages: [u64; NET_WINDOW as usize] = core::array::from_fn(|_| alloc_page());
    let refusals = if me == 0 {
        front_refusals(&door, me, Gpa(pages[0]).frame())
    } else {
        0
    };
    let mut sums = [0u64; NET_WINDOW as usize];
    let mut rng = Rng(NET_SEED.rotate_left(32) ^ me);
    let (mut sent, mut acked, mut bytes) = (0u64, 0u64, 0u64);
    let mut last_progress = rdtsc();
    while acked < total {
        while sent < total && sent - acked < NET_WINDOW {
            let k = sent % NET_WINDOW;
            let page = pages[k as usize];
            let len = 1 + rng.next_u64() % PAYLOAD_MAX;
            let words = len.div_ceil(8);
            let mut sum = 0u64;
            for w in 0..words {
                let mut v = rng.next_u64();
                if w == words - 1 {
                    v &= last_word_mask(len);
                }
                wr(page + PACKET_HEADER + w * 8, v);
                sum = fold(sum, v);
            }
            let flags = if plan.inspected(sent) { INSPECT } else { 0 };
            for (i, v) in [PACKET_MAGIC, sent, len, sum, flags]
                .into_iter()
                .enumerate()
            {
                wr(page + i as u64 * 8, v);
            }
            sums[k as usize] = sum;
            must(
                "net-front: GRANT of a packet",
                door.grant(data_ref(me, k), Gpa(page).frame(), true),
            );
            if !ring.push(
                &REQUESTS,
                Msg {
                    op: Op::Packet as u64,
                    id: sent,
                    gref: u64::from(data_ref(me, k).0),
                    ..Msg::default()
                },
            ) {
                die(
                    "net-front: request queue full with the window open, packet",
                    sent,
                )
            }
            sent += 1;
            bytes += len;
        }
        match ring.pop(&RESPONSES) {
            Some(rsp) => {
                let k = acked % NET_WINDOW;
                if rsp.op != Op::Packet as u64 || rsp.id != acked {
                    die("net-front: acknowledgement out of order, id", rsp.id)
                }
                if rsp.status != u64::from(grant_status::OK) {
                    die("net-front: the backend refused packet", acked)
                }
                if rsp.value != sums[k as usize] {
                    die(
                        "net-front: acknowledged with a wrong checksum, packet",
                        acked,
                    )
                }
                must(
                    "net-front: END_ACCESS of an acknowledged packet",
                    door.end_access(data_ref(me, k)),
                );
                acked += 1;
                last_progress = rdtsc();
            }
            None => {
                if domain().shared[FAILED].load(Ordering::Acquire) != 0 {
                    exit(1)
                }
                if rdtsc().saturating_sub(last_progress) > PEER_TIMEOUT_MS * tsc_per_ms() {
                    die("net-front: no acknowledgement in time, packet", acked)
                }
                yield_now();
            }
        }
    }
    let close_refusals = close_ring(&door, &ring, me);
    say!(
        "net-front v{me}: {total} packets, {bytes} payload bytes acknowledged; \
         ring freed after {close_refusals} StillMapped"
    );
    let [packets, bytes, refusals, ..] = gather([total, bytes, refusals, 0, 0, 0]);
    say!(
        "net-front: {packets} packets, {bytes} payload bytes acknowledged with their \
         checksums; {refusals} refusals ok"
    );
    finish(true, packets)
}

/// `net-back`: see the module docs.
pub fn net_back(me: u64) -> ! {
    let door = Door::new(peer());
    let plan = NetPlan::new(me);
    let inspected = plan.inspected_batches();
    say!(
        "net-back v{me}: maps ring ref {} of domain {}; {NET_BATCHES} batches, \
         {inspected} with inspected packets",
        ring_ref(me).0,
        door.peer.0
    );
    let slots = Slots::new(me);
    let header = Gpa(alloc_page());
    let (ring, ring_handle, retries) = connect(&door, &slots, me);
    let (mut seq, mut read, mut refusals) = (0u64, 0u64, 0u64);
    for b in 0..NET_BATCHES {
        let n = u64::from(plan.sizes[b]);
        let mut handles = [MapHandle(0); MAX_UNMAP_BATCH];
        let mut sums = [0u64; MAX_UNMAP_BATCH];
        for j in 0..n {
            let req = ring.receive(&REQUESTS);
            if req.op != Op::Packet as u64 || req.id != seq {
                die("net-back: expected the next packet, got id", req.id)
            }
            let gref = u32::try_from(req.gref)
                .map(GrantRef)
                .unwrap_or_else(|_| die("net-back: gref", req.gref));
            must(
                "net-back: COPY of a packet header",
                door.copy(gref, 0, header, PACKET_HEADER, CopyDirection::FromGrant),
            );
            let h = |i: u64| rd(header.0 + i * 8);
            let (len, sum, flags) = (h(2), h(3), h(4));
            if h(0) != PACKET_MAGIC || h(1) != seq || len == 0 || len > PAYLOAD_MAX {
                die("net-back: bad packet header, packet", seq)
            }
            if (flags & INSPECT != 0) != plan.inspected(seq) {
                die(
                    "net-back: inspect flag disagrees with the plan, packet",
                    seq,
                )
            }
            if me == 0 && seq == 0 {
                refusals += net_refusals(&door, &slots, gref, header);
            }
            handles[j as usize] = must(
                "net-back: MAP of a packet",
                door.map(gref, slots.gfn(1 + j), false),
            );
            if flags & INSPECT != 0 {
                let at = slots.gva(1 + j).0 + PACKET_HEADER;
                let words = len.div_ceil(8);
                let mut got = 0u64;
                for w in 0..words {
                    let mut v = probe_read(at + w * 8).unwrap_or_else(|_| {
                        die("net-back: reading a mapped packet faulted at", at + w * 8)
                    });
                    if w == words - 1 {
                        v &= last_word_mask(len);
                    }
                    got = fold(got, v);
                }
                if got != sum {
                    die(
                        "net-back: payload checksum wrong through the mapping, packet",
                        seq,
                    )
                }
                read += 1;
            }
            sums[j as usize] = sum;
            seq += 1;
        }
        refusals += unmap_batch(
            &door,
            "net-back: UNMAP of a batch",
            &handles[..n as usize],
            me == 0 && b == 0,
        );
        for j in 0..n {
            ring.send(
                &RESPONSES,
                Msg {
                    op: Op::Packet as u64,
                    id: seq - n + j,
                    status: u64::from(grant_status::OK),
                    value: sums[j as usize],
                    ..Msg::default()
                },
            );
        }
    }
    let close = ring.receive(&REQUESTS);
    if close.op != Op::Close as u64 {
        die("net-back: expected Close after the plan, got op", close.op)
    }
    unmap_batch(&door, "UNMAP of the ring", &[ring_handle], false);
    // The ring's unmap is a batch too, and accessed (the backend used it).
    let batches = NET_BATCHES as u64 + 1;
    let accessed = inspected + 1;
    say!(
        "net-back v{me}: {seq} packets, {read} read via the mapping; {batches} batches, \
         {accessed} accessed (ring incl.), {retries} MAP retries"
    );
    let [packets, _, batches, accessed, refusals, _] =
        gather([seq, read, batches, accessed, refusals, 0]);
    let avoided = batches - accessed;
    say!(
        "net-back: {packets} packets, {batches} batches, {accessed} accessed: \
         expected avoided {avoided}/{batches} = {}; {refusals} refusals ok",
        Percent(avoided, batches)
    );
    finish(true, batches)
}

/// The refusals a net backend checks on packet `gref` (granted read-only,
/// not mapped yet): mapping it writable, a copy crossing the page. Returns
/// how many it checked.
fn net_refusals(door: &Door, slots: &Slots, gref: GrantRef, local: Gpa) -> u64 {
    let r = map_refused(door, door.map(gref, slots.gfn(SPARE), true));
    refused("MAP of a read-only packet writable", r, READ_ONLY);
    refused(
        "COPY of 200 bytes at offset 4000",
        door.copy(gref, 4000, local, 200, CopyDirection::FromGrant),
        COPY_CROSSES_PAGE,
    );
    2
}
