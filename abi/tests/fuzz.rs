//! Property test by a seeded random loop: at least 100,000 random and mutated
//! messages per run go through `decode` and `dispatch`; garbage must give an
//! error (never a panic) and valid messages must round-trip exactly.

use abi::mmu::{Resource, DIRTY_CHUNK_BYTES, MAX_REGIONS};
use abi::*;

/// xorshift64*: small, deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// A value biased towards edge cases and small numbers.
    fn val(&mut self) -> u64 {
        match self.below(6) {
            0 => 0,
            1 => u64::MAX >> self.below(64),
            2 => self.below(256),
            3 => 1 << self.below(64),
            _ => self.next(),
        }
    }
    fn u32(&mut self) -> u32 {
        self.val() as u32
    }
    fn flush(&mut self) -> Option<FlushObligation> {
        if self.below(3) == 0 {
            return None;
        }
        let scope = match self.below(4) {
            0 => FlushScope::Page(Gva(self.val())),
            1 => FlushScope::Range {
                start: Gva(self.val()),
                pages: self.u32(),
            },
            2 => FlushScope::All,
            _ => FlushScope::AllReloadRoots,
        };
        Some(FlushObligation {
            cpus: CpuSet(self.val()),
            scope,
        })
    }
}

fn random_request(r: &mut Rng) -> MmuRequest {
    let v = VcpuId(r.u32());
    let p = PcpuId(r.u32());
    let d = DomainId(r.u32());
    match r.below(18) {
        0 => MmuRequest::Hello { version: r.u32() },
        16 => MmuRequest::MapForeign {
            domain: d,
            gfn: Gfn(r.val()),
            owner: DomainId(r.u32()),
            mfn: Mfn(r.val()),
            writable: r.below(2) == 0,
        },
        17 => MmuRequest::UnmapForeign {
            domain: d,
            gfn: Gfn(r.val()),
        },
        1 => {
            let mut memory = MemoryMap::new();
            for _ in 0..r.below(MAX_REGIONS as u64 + 1) {
                memory
                    .push(MemRegion {
                        gfn: Gfn(r.val()),
                        mfn: Mfn(r.val()),
                        pages: r.val(),
                    })
                    .unwrap();
            }
            MmuRequest::CreateDomain { domain: d, memory }
        }
        2 => MmuRequest::DestroyDomain { domain: d },
        3 => MmuRequest::CreateVcpu { domain: d, vcpu: v },
        4 => MmuRequest::VcpuScheduled { vcpu: v, pcpu: p },
        5 => MmuRequest::VcpuDescheduled { vcpu: v, pcpu: p },
        6 => MmuRequest::PageFault {
            vcpu: v,
            pcpu: p,
            gva: Gva(r.val()),
            error_code: PfErrorCode(r.u32()),
        },
        7 => MmuRequest::WriteCr3 {
            vcpu: v,
            pcpu: p,
            cr3: GuestCr3(r.val()),
        },
        8 => MmuRequest::SetPagingMode {
            vcpu: v,
            pcpu: p,
            mode: PagingMode(r.u32()),
        },
        9 => MmuRequest::Invlpg {
            vcpu: v,
            pcpu: p,
            gva: Gva(r.val()),
        },
        10 => MmuRequest::EmulatedWrite {
            vcpu: v,
            pcpu: p,
            gpa: Gpa(r.val()),
            value: r.val(),
            size: r.val() as u8,
        },
        11 => MmuRequest::EnableDirtyLog { domain: d },
        12 => MmuRequest::DisableDirtyLog { domain: d },
        13 => MmuRequest::GetAndClearDirty {
            domain: d,
            start: Gfn(r.val()),
        },
        14 => MmuRequest::ZapAll { domain: d },
        _ => MmuRequest::GetCounters {
            domain: if r.below(2) == 0 { None } else { Some(d) },
        },
    }
}

fn random_reply(r: &mut Rng) -> MmuReply {
    let flush = r.flush();
    match r.below(12) {
        0 => MmuReply::Welcome { version: r.u32() },
        11 => MmuReply::Mmio {
            gpa: Gpa(r.val()),
            write: r.below(2) == 0,
            flush,
        },
        10 => MmuReply::ForeignUnmapped {
            mfn: Mfn(r.val()),
            accessed: r.below(2) == 0,
            cpus: CpuSet(r.val()),
            flush,
        },
        9 => MmuReply::Counters {
            counters: ServerCounters {
                page_faults: r.val(),
                faults_fixed: r.val(),
                faults_injected: r.val(),
                fast_path_fixes: r.val(),
                shadow_pages_created: r.val(),
                shadow_pages_freed: r.val(),
                shadow_pages_in_use: r.val(),
                zaps: r.val(),
                reclaims: r.val(),
                emulate_write_replies: r.val(),
                emulated_writes: r.val(),
                unsyncs: r.val(),
                resyncs: r.val(),
                unshadowed: r.val(),
                flush_obligations: r.val(),
                flush_cpus: r.val(),
                shadow_pages_peak: r.val(),
            },
            flush,
        },
        1 => MmuReply::Done { flush },
        2 => MmuReply::Resume { flush },
        3 => MmuReply::InjectPageFault {
            error_code: PfErrorCode(r.u32()),
            address: Gva(r.val()),
            flush,
        },
        4 => MmuReply::LoadShadowRoot {
            vcpu: VcpuId(r.u32()),
            root: Hpa(r.val()),
            flush,
        },
        5 => MmuReply::EmulateWrite {
            gpa: Gpa(r.val()),
            flush,
        },
        6 => MmuReply::WriteDone { flush },
        7 => {
            let mut bits = heapless::Vec::new();
            for _ in 0..r.below(DIRTY_CHUNK_BYTES as u64 + 1) {
                bits.push(r.next() as u8).unwrap();
            }
            MmuReply::DirtyBitmap {
                chunk: DirtyChunk {
                    start: Gfn(r.val()),
                    bits,
                    next: if r.below(2) == 0 {
                        None
                    } else {
                        Some(Gfn(r.val()))
                    },
                },
                flush,
            }
        }
        _ => {
            let reason = match r.below(11) {
                10 => MmuError::FaultOutsideMode(Gva(r.val())),
                6 => MmuError::GfnInUse(Gfn(r.val())),
                7 => MmuError::NotForeignMapped(Gfn(r.val())),
                8 => MmuError::NotOwnedBy {
                    mfn: Mfn(r.val()),
                    owner: DomainId(r.u32()),
                },
                9 => MmuError::FramesMapped {
                    mapper: DomainId(r.u32()),
                    gfn: Gfn(r.val()),
                },
                0 => MmuError::UnknownDomain(DomainId(r.u32())),
                1 => MmuError::CapacityExceeded {
                    what: Resource::Domains,
                    limit: r.u32(),
                },
                2 => MmuError::Memory(MemError::Misaligned(Hpa(r.val()))),
                3 => MmuError::Malformed(DecodeError::TrailingBytes(r.u32())),
                4 => MmuError::UnsupportedPagingMode(PagingMode(r.u32())),
                _ => MmuError::WriteCrossesPage(Gpa(r.val())),
            };
            MmuReply::Error { reason, flush }
        }
    }
}

/// Mutates an encoded message in one of several ways.
fn mutate(r: &mut Rng, bytes: &mut Vec<u8>) {
    for _ in 0..=r.below(3) {
        match r.below(6) {
            0 if !bytes.is_empty() => {
                let i = r.below(bytes.len() as u64) as usize;
                bytes[i] ^= 1 << r.below(8);
            }
            1 if !bytes.is_empty() => {
                let i = r.below(bytes.len() as u64) as usize;
                bytes[i] = r.next() as u8;
            }
            2 => {
                let n = r.below(bytes.len() as u64 + 1) as usize;
                bytes.truncate(n);
            }
            3 => {
                let i = r.below(bytes.len() as u64 + 1) as usize;
                bytes.insert(i, r.next() as u8);
            }
            4 if !bytes.is_empty() => {
                let i = r.below(bytes.len() as u64) as usize;
                bytes.remove(i);
            }
            _ => {
                for _ in 0..r.below(2000) {
                    bytes.push(r.next() as u8);
                }
            }
        }
    }
}

/// A server that answers every call with a reply naming the call, so the test
/// can check dispatch reached the right method with the right arguments.
struct Echo;

impl MmuServer for Echo {
    fn name(&self) -> &'static str {
        "echo"
    }
    fn create_domain(&self, domain: DomainId, memory: &MemoryMap) -> MmuReply {
        MmuReply::LoadShadowRoot {
            vcpu: VcpuId(domain.0),
            root: Hpa(memory.len() as u64),
            flush: None,
        }
    }
    fn destroy_domain(&self, domain: DomainId) -> MmuReply {
        MmuReply::error(MmuError::UnknownDomain(domain))
    }
    fn create_vcpu(&self, domain: DomainId, vcpu: VcpuId) -> MmuReply {
        MmuReply::LoadShadowRoot {
            vcpu,
            root: Hpa(domain.0 as u64),
            flush: None,
        }
    }
    fn vcpu_scheduled(&self, vcpu: VcpuId, pcpu: PcpuId) -> MmuReply {
        MmuReply::LoadShadowRoot {
            vcpu,
            root: Hpa(pcpu.0 as u64),
            flush: None,
        }
    }
    fn vcpu_descheduled(&self, vcpu: VcpuId, _pcpu: PcpuId) -> MmuReply {
        MmuReply::error(MmuError::UnknownVcpu(vcpu))
    }
    fn page_fault(&self, _v: VcpuId, _p: PcpuId, gva: Gva, error_code: PfErrorCode) -> MmuReply {
        MmuReply::InjectPageFault {
            error_code,
            address: gva,
            flush: None,
        }
    }
    fn write_cr3(&self, vcpu: VcpuId, _p: PcpuId, cr3: GuestCr3) -> MmuReply {
        MmuReply::LoadShadowRoot {
            vcpu,
            root: Hpa(cr3.0),
            flush: None,
        }
    }
    fn set_paging_mode(&self, _v: VcpuId, _p: PcpuId, mode: PagingMode) -> MmuReply {
        MmuReply::error(MmuError::UnsupportedPagingMode(mode))
    }
    fn invlpg(&self, _v: VcpuId, pcpu: PcpuId, gva: Gva) -> MmuReply {
        MmuReply::Done {
            flush: Some(FlushObligation {
                cpus: CpuSet::single(pcpu),
                scope: FlushScope::Page(gva),
            }),
        }
    }
    fn emulated_write(&self, _v: VcpuId, _p: PcpuId, gpa: Gpa, _val: u64, size: u8) -> MmuReply {
        MmuReply::EmulateWrite {
            gpa: Gpa(gpa.0 ^ size as u64),
            flush: None,
        }
    }
    fn enable_dirty_log(&self, domain: DomainId) -> MmuReply {
        MmuReply::error(MmuError::DomainExists(domain))
    }
    fn disable_dirty_log(&self, domain: DomainId) -> MmuReply {
        MmuReply::error(MmuError::DirtyLogDisabled(domain))
    }
    fn get_and_clear_dirty(&self, _d: DomainId, start: Gfn) -> MmuReply {
        MmuReply::DirtyBitmap {
            chunk: DirtyChunk {
                start,
                bits: heapless::Vec::new(),
                next: None,
            },
            flush: None,
        }
    }
    fn zap_all(&self, domain: DomainId) -> MmuReply {
        MmuReply::error(MmuError::OutOfShadowMemory(domain))
    }
}

fn check_dispatch(bytes: &[u8], stats: &mut [u64; 3]) {
    let mut out = [0u8; MAX_MESSAGE];
    let n = dispatch(&Echo, bytes, &mut out);
    assert!(n > 0 && n <= MAX_MESSAGE);
    let reply: MmuReply = decode(&out[..n]).expect("dispatch replies decode");
    match decode::<MmuRequest>(bytes) {
        Ok(req) => {
            stats[0] += 1;
            assert_eq!(reply, call(&Echo, &req));
            // Valid requests round-trip byte-exactly (the encoding is canonical
            // for everything the decoder accepts, except non-minimal varints,
            // so compare values instead of bytes).
            let mut buf = [0u8; MAX_MESSAGE];
            let m = encode(&req, &mut buf).unwrap();
            assert_eq!(decode::<MmuRequest>(&buf[..m]).unwrap(), req);
        }
        Err(e) => {
            stats[1] += 1;
            assert_eq!(reply, MmuReply::error(MmuError::Malformed(e)));
        }
    }
}

const ROUNDS: u64 = 40_000;

#[test]
fn random_and_mutated_requests_never_panic() {
    let mut r = Rng(0x9e37_79b9_7f4a_7c15 ^ 0x1234);
    let mut stats = [0u64; 3];
    let mut total = 0u64;
    let mut buf = [0u8; MAX_MESSAGE];
    for _ in 0..ROUNDS {
        // A valid message round-trips through bytes and dispatch.
        let req = random_request(&mut r);
        let n = encode(&req, &mut buf).expect("every request fits MAX_MESSAGE");
        assert_eq!(decode::<MmuRequest>(&buf[..n]).unwrap(), req);
        check_dispatch(&buf[..n], &mut stats);
        // The same message mutated.
        let mut bytes = buf[..n].to_vec();
        mutate(&mut r, &mut bytes);
        check_dispatch(&bytes, &mut stats);
        // Pure noise of random length.
        let len = r.below(64) as usize;
        let noise: Vec<u8> = (0..len).map(|_| r.next() as u8).collect();
        check_dispatch(&noise, &mut stats);
        total += 3;
    }
    assert!(total >= 100_000, "ran {total} messages");
    // The generator must exercise both paths substantially.
    assert!(stats[0] > ROUNDS && stats[1] > ROUNDS / 2, "{stats:?}");
}

#[test]
fn random_and_mutated_replies_round_trip_or_fail_cleanly() {
    let mut r = Rng(0xdead_beef_cafe_f00d);
    let mut buf = [0u8; MAX_MESSAGE];
    let (mut ok, mut bad) = (0u64, 0u64);
    for _ in 0..ROUNDS {
        let rep = random_reply(&mut r);
        let n = encode(&rep, &mut buf).expect("every reply fits MAX_MESSAGE");
        assert_eq!(decode::<MmuReply>(&buf[..n]).unwrap(), rep);
        let mut bytes = buf[..n].to_vec();
        mutate(&mut r, &mut bytes);
        match decode::<MmuReply>(&bytes) {
            Ok(m) => {
                ok += 1;
                let k = encode(&m, &mut buf).unwrap();
                assert_eq!(decode::<MmuReply>(&buf[..k]).unwrap(), m);
            }
            Err(_) => bad += 1,
        }
    }
    assert!(ok + bad == ROUNDS && bad > ROUNDS / 4, "ok {ok} bad {bad}");
}

#[test]
fn specific_garbage_gets_specific_errors() {
    let mut out = [0u8; MAX_MESSAGE];
    let reply = |out: &[u8; MAX_MESSAGE], n| decode::<MmuReply>(&out[..n]).unwrap();
    let n = dispatch(&Echo, &[], &mut out);
    assert_eq!(
        reply(&out, n),
        MmuReply::error(MmuError::Malformed(DecodeError::UnexpectedEnd))
    );
    // An unknown variant index (64) is reported by serde as invalid data.
    let n = dispatch(&Echo, &[0x40], &mut out);
    assert_eq!(
        reply(&out, n),
        MmuReply::error(MmuError::Malformed(DecodeError::BadEncoding))
    );
    let n = dispatch(&Echo, &[0x02, 0x05, 0x00], &mut out);
    assert_eq!(
        reply(&out, n),
        MmuReply::error(MmuError::Malformed(DecodeError::TrailingBytes(1)))
    );
    let n = dispatch(&Echo, &[0u8; MAX_MESSAGE + 1], &mut out);
    assert_eq!(
        reply(&out, n),
        MmuReply::error(MmuError::Malformed(DecodeError::TooLong(
            MAX_MESSAGE as u32 + 1
        )))
    );
    // A CreateDomain claiming 17 regions (over MAX_REGIONS) is refused.
    let mut msg = vec![0x01, 0x01, 17];
    for _ in 0..17 {
        msg.extend_from_slice(&[0, 0, 1]);
    }
    let n = dispatch(&Echo, &msg, &mut out);
    assert!(matches!(
        reply(&out, n),
        MmuReply::Error {
            reason: MmuError::Malformed(_),
            ..
        }
    ));
    // Wrong version in Hello.
    let n = dispatch(&Echo, &[0x00, 0x7f], &mut out);
    assert_eq!(
        reply(&out, n),
        MmuReply::error(MmuError::VersionMismatch {
            requested: 0x7f,
            supported: PROTOCOL_VERSION
        })
    );
    // GetCounters to a server without counters (Echo keeps the default).
    let n = dispatch(&Echo, &[0x0f, 0x00], &mut out);
    assert_eq!(
        reply(&out, n),
        MmuReply::error(MmuError::Unsupported(MmuRequest::GET_COUNTERS))
    );
    // A bad Option tag in GetCounters is malformed, not a call.
    let n = dispatch(&Echo, &[0x0f, 0x02], &mut out);
    assert_eq!(
        reply(&out, n),
        MmuReply::error(MmuError::Malformed(DecodeError::BadOption))
    );
    let n = dispatch(&Echo, &[0x00, PROTOCOL_VERSION as u8], &mut out);
    assert_eq!(
        reply(&out, n),
        MmuReply::Welcome {
            version: PROTOCOL_VERSION
        }
    );
}

// ---- the grant protocol ----------------------------------------------------

fn random_grant_error(r: &mut Rng) -> GrantError {
    let d = DomainId(r.u32());
    let g = GrantRef(r.u32());
    match r.below(17) {
        0 => GrantError::Malformed(DecodeError::TrailingBytes(r.u32())),
        1 => GrantError::VersionMismatch {
            requested: r.u32(),
            supported: r.u32(),
        },
        2 => GrantError::UnknownDomain(d),
        3 => GrantError::DomainExists(d),
        4 => GrantError::RefOutOfRange {
            gref: g,
            limit: r.u32(),
        },
        5 => GrantError::RefInUse(g),
        6 => GrantError::NotGranted {
            granter: d,
            gref: g,
        },
        7 => GrantError::NotGrantedTo { gref: g, domain: d },
        8 => GrantError::ReadOnly(g),
        9 => GrantError::StillMapped {
            gref: g,
            maps: r.u32(),
        },
        10 => GrantError::BadHandle(MapHandle(r.u32())),
        11 => GrantError::GfnNotInMemory(Gfn(r.val())),
        12 => GrantError::CopyCrossesPage {
            offset: r.val() as u16,
            len: r.val() as u16,
        },
        13 => GrantError::CapacityExceeded {
            what: GrantResource::MapHandles,
            limit: r.u32(),
        },
        14 => GrantError::Mmu(MmuError::FramesMapped {
            mapper: d,
            gfn: Gfn(r.val()),
        }),
        15 => GrantError::MmuProtocol(r.val() as u8),
        _ => GrantError::SelfGrant(d),
    }
}

fn random_grant_request(r: &mut Rng) -> GrantRequest {
    let d = DomainId(r.u32());
    let p = DomainId(r.u32());
    let g = GrantRef(r.u32());
    match r.below(9) {
        0 => GrantRequest::Hello { version: r.u32() },
        1 => {
            let mut memory = MemoryMap::new();
            for _ in 0..r.below(MAX_REGIONS as u64 + 1) {
                memory
                    .push(MemRegion {
                        gfn: Gfn(r.val()),
                        mfn: Mfn(r.val()),
                        pages: r.val(),
                    })
                    .unwrap();
            }
            GrantRequest::CreateDomain { domain: d, memory }
        }
        2 => GrantRequest::DestroyDomain { domain: d },
        3 => GrantRequest::Grant {
            domain: d,
            gref: g,
            grantee: p,
            gfn: Gfn(r.val()),
            readonly: r.below(2) == 0,
        },
        4 => GrantRequest::EndAccess { domain: d, gref: g },
        5 => GrantRequest::Map {
            domain: d,
            granter: p,
            gref: g,
            gfn: Gfn(r.val()),
            writable: r.below(2) == 0,
        },
        6 => {
            let mut handles = heapless::Vec::new();
            for _ in 0..r.below(MAX_UNMAP_BATCH as u64 + 1) {
                handles.push(MapHandle(r.u32())).unwrap();
            }
            GrantRequest::Unmap { domain: d, handles }
        }
        7 => GrantRequest::Copy {
            domain: d,
            granter: p,
            gref: g,
            offset: r.val() as u16,
            local: Gpa(r.val()),
            len: r.val() as u16,
            direction: if r.below(2) == 0 {
                CopyDirection::FromGrant
            } else {
                CopyDirection::ToGrant
            },
        },
        _ => GrantRequest::GetCounters {
            domain: if r.below(2) == 0 { None } else { Some(d) },
        },
    }
}

fn random_grant_reply(r: &mut Rng) -> GrantReply {
    let flush = r.flush();
    match r.below(7) {
        0 => GrantReply::Welcome { version: r.u32() },
        1 => GrantReply::Done { flush },
        2 => GrantReply::Mapped {
            handle: MapHandle(r.u32()),
            flush,
        },
        3 => {
            let mut status = heapless::Vec::new();
            for _ in 0..r.below(MAX_UNMAP_BATCH as u64 + 1) {
                let s = if r.below(2) == 0 {
                    Ok(())
                } else {
                    Err(random_grant_error(r))
                };
                status.push(s).unwrap();
            }
            GrantReply::Unmapped { status, flush }
        }
        4 => GrantReply::CopyPlan {
            src: Hpa(r.val()),
            dst: Hpa(r.val()),
            len: r.val() as u16,
            flush,
        },
        5 => GrantReply::Counters {
            counters: GrantCounters {
                grants: r.val(),
                maps: r.val(),
                unmaps: r.val(),
                batches: r.val(),
                flushes: r.val(),
                flushes_avoided: r.val(),
                flush_cpus: r.val(),
                copies: r.val(),
                grants_active: r.val(),
                maps_active: r.val(),
                handles_in_use: r.val(),
            },
            flush,
        },
        _ => GrantReply::Error {
            reason: random_grant_error(r),
            flush,
        },
    }
}

/// A grant server that answers every call with a reply naming the call and
/// its arguments.
struct GrantEcho;

impl GrantServer for GrantEcho {
    fn name(&self) -> &'static str {
        "grant-echo"
    }
    fn create_domain(&self, domain: DomainId, memory: &MemoryMap) -> GrantReply {
        GrantReply::Mapped {
            handle: MapHandle(domain.0 ^ memory.len() as u32),
            flush: None,
        }
    }
    fn destroy_domain(&self, domain: DomainId) -> GrantReply {
        GrantReply::error(GrantError::UnknownDomain(domain))
    }
    fn grant(&self, d: DomainId, gref: GrantRef, to: DomainId, gfn: Gfn, ro: bool) -> GrantReply {
        GrantReply::CopyPlan {
            src: Hpa(gfn.0),
            dst: Hpa(u64::from(d.0) << 32 | u64::from(to.0)),
            len: gref.0 as u16 ^ u16::from(ro),
            flush: None,
        }
    }
    fn end_access(&self, domain: DomainId, gref: GrantRef) -> GrantReply {
        GrantReply::error(GrantError::NotGranted {
            granter: domain,
            gref,
        })
    }
    fn map(&self, d: DomainId, g: DomainId, gref: GrantRef, gfn: Gfn, w: bool) -> GrantReply {
        GrantReply::CopyPlan {
            src: Hpa(gfn.0),
            dst: Hpa(u64::from(d.0) << 32 | u64::from(g.0)),
            len: gref.0 as u16 ^ u16::from(w),
            flush: None,
        }
    }
    fn unmap(&self, domain: DomainId, handles: &[MapHandle]) -> GrantReply {
        let mut status = heapless::Vec::new();
        for h in handles {
            status.push(Err(GrantError::BadHandle(*h))).unwrap();
        }
        GrantReply::Unmapped {
            status,
            flush: Some(FlushObligation {
                cpus: CpuSet(u64::from(domain.0)),
                scope: FlushScope::All,
            }),
        }
    }
    fn copy(
        &self,
        domain: DomainId,
        granter: DomainId,
        gref: GrantRef,
        offset: u16,
        local: Gpa,
        len: u16,
        direction: CopyDirection,
    ) -> GrantReply {
        GrantReply::CopyPlan {
            src: Hpa(local.0 ^ u64::from(offset)),
            dst: Hpa(u64::from(domain.0) << 32 | u64::from(granter.0 ^ gref.0)),
            len: len ^ (direction == CopyDirection::ToGrant) as u16,
            flush: None,
        }
    }
    fn counters(&self, domain: Option<DomainId>) -> GrantReply {
        GrantReply::Counters {
            counters: GrantCounters {
                grants: domain.map_or(u64::MAX, |d| u64::from(d.0)),
                ..GrantCounters::default()
            },
            flush: None,
        }
    }
}

fn check_grant_dispatch(bytes: &[u8], stats: &mut [u64; 2]) {
    let mut out = [0u8; MAX_MESSAGE];
    let n = grant_dispatch(&GrantEcho, bytes, &mut out);
    assert!(n > 0 && n <= MAX_MESSAGE);
    let reply: GrantReply = decode(&out[..n]).expect("grant dispatch replies decode");
    match decode::<GrantRequest>(bytes) {
        Ok(req) => {
            stats[0] += 1;
            assert_eq!(reply, grant_call(&GrantEcho, &req));
            let mut buf = [0u8; MAX_MESSAGE];
            let m = encode(&req, &mut buf).unwrap();
            assert_eq!(decode::<GrantRequest>(&buf[..m]).unwrap(), req);
        }
        Err(e) => {
            stats[1] += 1;
            assert_eq!(reply, GrantReply::error(GrantError::Malformed(e)));
        }
    }
}

#[test]
fn random_and_mutated_grant_requests_never_panic() {
    let mut r = Rng(0x6a09_e667_f3bc_c908);
    let mut stats = [0u64; 2];
    let mut buf = [0u8; MAX_MESSAGE];
    for _ in 0..ROUNDS {
        let req = random_grant_request(&mut r);
        let n = encode(&req, &mut buf).expect("every grant request fits MAX_MESSAGE");
        assert_eq!(decode::<GrantRequest>(&buf[..n]).unwrap(), req);
        check_grant_dispatch(&buf[..n], &mut stats);
        let mut bytes = buf[..n].to_vec();
        mutate(&mut r, &mut bytes);
        check_grant_dispatch(&bytes, &mut stats);
        let len = r.below(64) as usize;
        let noise: Vec<u8> = (0..len).map(|_| r.next() as u8).collect();
        check_grant_dispatch(&noise, &mut stats);
    }
    assert!(stats[0] + stats[1] >= 100_000, "{stats:?}");
    assert!(stats[0] > ROUNDS && stats[1] > ROUNDS / 2, "{stats:?}");
}

#[test]
fn random_and_mutated_grant_replies_round_trip_or_fail_cleanly() {
    let mut r = Rng(0xbb67_ae85_84ca_a73b);
    let mut buf = [0u8; MAX_MESSAGE];
    let (mut ok, mut bad) = (0u64, 0u64);
    for _ in 0..ROUNDS {
        let rep = random_grant_reply(&mut r);
        let n = encode(&rep, &mut buf).expect("every grant reply fits MAX_MESSAGE");
        assert_eq!(decode::<GrantReply>(&buf[..n]).unwrap(), rep);
        let mut bytes = buf[..n].to_vec();
        mutate(&mut r, &mut bytes);
        match decode::<GrantReply>(&bytes) {
            Ok(m) => {
                ok += 1;
                let k = encode(&m, &mut buf).unwrap();
                assert_eq!(decode::<GrantReply>(&buf[..k]).unwrap(), m);
            }
            Err(_) => bad += 1,
        }
    }
    assert!(ok + bad == ROUNDS && bad > ROUNDS / 4, "ok {ok} bad {bad}");
}

#[test]
fn hostile_grant_batches_and_versions_get_specific_errors() {
    let mut out = [0u8; MAX_MESSAGE];
    let reply = |out: &[u8; MAX_MESSAGE], n| decode::<GrantReply>(&out[..n]).unwrap();
    // An unmap batch claiming 33 handles (over MAX_UNMAP_BATCH) is malformed.
    let mut msg = vec![0x06, 0x01, 33];
    msg.extend(std::iter::repeat_n(0x01, 33));
    let n = grant_dispatch(&GrantEcho, &msg, &mut out);
    assert_eq!(
        reply(&out, n),
        GrantReply::error(GrantError::Malformed(DecodeError::BadEncoding))
    );
    // 32 handles is fine and reaches the server.
    let mut msg = vec![0x06, 0x01, 32];
    msg.extend(std::iter::repeat_n(0x01, 32));
    let n = grant_dispatch(&GrantEcho, &msg, &mut out);
    assert!(matches!(reply(&out, n), GrantReply::Unmapped { status, .. } if status.len() == 32));
    // A copy length over u16 is a bad varint, not a call.
    let n = grant_dispatch(
        &GrantEcho,
        &[0x07, 1, 2, 3, 0, 0, 0xff, 0xff, 0x7f, 0],
        &mut out,
    );
    assert!(matches!(
        reply(&out, n),
        GrantReply::Error {
            reason: GrantError::Malformed(_),
            ..
        }
    ));
    let n = grant_dispatch(&GrantEcho, &[0x00, 0x7f], &mut out);
    assert_eq!(
        reply(&out, n),
        GrantReply::error(GrantError::VersionMismatch {
            requested: 0x7f,
            supported: GRANT_PROTOCOL_VERSION
        })
    );
    let n = grant_dispatch(&GrantEcho, &[0x00, GRANT_PROTOCOL_VERSION as u8], &mut out);
    assert_eq!(
        reply(&out, n),
        GrantReply::Welcome {
            version: GRANT_PROTOCOL_VERSION
        }
    );
}

/// The scheduler protocol under the same random and mutated bytes.
mod sched_wire {
    use super::{mutate, Rng, ROUNDS};
    use abi::sched::{
        call, dispatch, Guarantees, Micros, SchedError, SchedReply, SchedRequest, SchedServer,
        StopReason,
    };
    use abi::{decode, encode, CpuSet, DecodeError, DomainId, PcpuId, VcpuId, MAX_MESSAGE};

    fn random_request(r: &mut Rng) -> SchedRequest {
        let vcpu = VcpuId(r.u32());
        let pcpu = PcpuId(r.u32());
        match r.below(6) {
            0 => SchedRequest::Hello { version: r.u32() },
            1 => SchedRequest::CreateVcpu {
                vcpu,
                domain: DomainId(r.u32()),
                weight: r.u32(),
                hint: pcpu,
            },
            2 => SchedRequest::DestroyVcpu { vcpu },
            3 => SchedRequest::Wake { vcpu },
            4 => SchedRequest::Stopped {
                vcpu,
                pcpu,
                ran: Micros(r.val()),
                why: match r.below(4) {
                    0 => StopReason::Yielded,
                    1 => StopReason::Blocked,
                    2 => StopReason::SliceExpired,
                    _ => StopReason::Preempted,
                },
            },
            _ => SchedRequest::PickNext { pcpu },
        }
    }

    /// Answers every call with a reply naming the call and its arguments.
    struct Echo;

    impl SchedServer for Echo {
        fn name(&self) -> &'static str {
            "echo"
        }
        fn guarantees(&self) -> Guarantees {
            Guarantees {
                weighted: true,
                pinned: true,
            }
        }
        fn create_vcpu(&self, vcpu: VcpuId, d: DomainId, weight: u32, hint: PcpuId) -> SchedReply {
            SchedReply::Run {
                vcpu: VcpuId(vcpu.0 ^ d.0 ^ hint.0),
                slice: Micros(weight as u64),
            }
        }
        fn destroy_vcpu(&self, vcpu: VcpuId) -> SchedReply {
            SchedReply::error(SchedError::UnknownVcpu(vcpu))
        }
        fn wake(&self, vcpu: VcpuId) -> SchedReply {
            SchedReply::error(SchedError::VcpuBlocked(vcpu))
        }
        fn stopped(&self, vcpu: VcpuId, pcpu: PcpuId, ran: Micros, why: StopReason) -> SchedReply {
            SchedReply::Run {
                vcpu: VcpuId(vcpu.0 ^ pcpu.0 ^ why as u32),
                slice: ran,
            }
        }
        fn pick_next(&self, pcpu: PcpuId) -> SchedReply {
            SchedReply::Done {
                kick: CpuSet::single(pcpu),
            }
        }
    }

    fn check_dispatch(bytes: &[u8], stats: &mut [u64; 2]) {
        let mut out = [0u8; MAX_MESSAGE];
        let n = dispatch(&Echo, bytes, &mut out);
        assert!(n > 0 && n <= MAX_MESSAGE);
        let reply: SchedReply = decode(&out[..n]).expect("dispatch replies decode");
        match decode::<SchedRequest>(bytes) {
            Ok(req) => {
                stats[0] += 1;
                assert_eq!(reply, call(&Echo, &req));
            }
            Err(e) => {
                stats[1] += 1;
                assert_eq!(reply, SchedReply::error(SchedError::Malformed(e)));
            }
        }
    }

    #[test]
    fn random_and_mutated_sched_requests_never_panic() {
        let mut r = Rng(0x5eed_5c4e_d000_0001);
        let mut stats = [0u64; 2];
        let mut buf = [0u8; MAX_MESSAGE];
        for _ in 0..ROUNDS {
            let req = random_request(&mut r);
            let n = encode(&req, &mut buf).expect("every request fits");
            assert_eq!(decode::<SchedRequest>(&buf[..n]).unwrap(), req);
            check_dispatch(&buf[..n], &mut stats);
            let mut bytes = buf[..n].to_vec();
            mutate(&mut r, &mut bytes);
            check_dispatch(&bytes, &mut stats);
            let noise: Vec<u8> = (0..r.below(32)).map(|_| r.next() as u8).collect();
            check_dispatch(&noise, &mut stats);
        }
        assert!(stats[0] + stats[1] >= 100_000, "{stats:?}");
        assert!(stats[0] > ROUNDS && stats[1] > ROUNDS / 2, "{stats:?}");
    }

    #[test]
    fn random_and_mutated_sched_replies_round_trip_or_fail_cleanly() {
        let mut r = Rng(0x5eed_5c4e_d000_0002);
        let mut buf = [0u8; MAX_MESSAGE];
        let (mut ok, mut bad) = (0u64, 0u64);
        for _ in 0..ROUNDS {
            let rep = match r.below(5) {
                0 => SchedReply::Welcome {
                    version: r.u32(),
                    guarantees: Guarantees {
                        weighted: r.below(2) == 0,
                        pinned: r.below(2) == 0,
                    },
                },
                1 => SchedReply::Done {
                    kick: CpuSet(r.val()),
                },
                2 => SchedReply::Run {
                    vcpu: VcpuId(r.u32()),
                    slice: Micros(r.val()),
                },
                3 => SchedReply::Idle,
                _ => SchedReply::error(SchedError::NotRunningHere {
                    vcpu: VcpuId(r.u32()),
                    pcpu: PcpuId(r.u32()),
                }),
            };
            let n = encode(&rep, &mut buf).unwrap();
            assert_eq!(decode::<SchedReply>(&buf[..n]).unwrap(), rep);
            let mut bytes = buf[..n].to_vec();
            mutate(&mut r, &mut bytes);
            match decode::<SchedReply>(&bytes) {
                Ok(m) => {
                    ok += 1;
                    let k = encode(&m, &mut buf).unwrap();
                    assert_eq!(decode::<SchedReply>(&buf[..k]).unwrap(), m);
                }
                Err(_) => bad += 1,
            }
        }
        assert!(ok + bad == ROUNDS && bad > ROUNDS / 4, "ok {ok} bad {bad}");
    }

    #[test]
    fn specific_sched_garbage_gets_specific_errors() {
        let mut out = [0u8; MAX_MESSAGE];
        let mut reply = |bytes: &[u8]| {
            let n = dispatch(&Echo, bytes, &mut out);
            decode::<SchedReply>(&out[..n]).unwrap()
        };
        let malformed = |e| SchedReply::error(SchedError::Malformed(e));
        assert_eq!(reply(&[]), malformed(DecodeError::UnexpectedEnd));
        assert_eq!(reply(&[0x06]), malformed(DecodeError::BadEncoding));
        assert_eq!(
            reply(&[0x05, 0x01, 0x00]),
            malformed(DecodeError::TrailingBytes(1))
        );
        // A stop reason past the last one.
        assert_eq!(
            reply(&[0x04, 0x01, 0x01, 0x01, 0x04]),
            malformed(DecodeError::BadEncoding)
        );
        assert_eq!(
            reply(&[0u8; MAX_MESSAGE + 1]),
            malformed(DecodeError::TooLong(MAX_MESSAGE as u32 + 1))
        );
        assert_eq!(
            reply(&[0x05, 0x02]),
            SchedReply::Done {
                kick: CpuSet::single(PcpuId(2))
            }
        );
    }
}

/// A guest's grant status number is the error's wire variant index plus
/// one, for every variant (the guest ABI promises it).
#[test]
fn grant_error_code_is_its_wire_variant_plus_one() {
    let mut r = Rng(0x6a09_e667_f3bc_c908);
    let mut seen = [false; 17];
    for _ in 0..2000 {
        let e = random_grant_error(&mut r);
        let mut buf = [0u8; MAX_MESSAGE];
        let n = encode(&e, &mut buf).expect("an error encodes");
        assert!(n > 0);
        assert_eq!(e.code(), u32::from(buf[0]) + 1, "{e:?}");
        seen[buf[0] as usize] = true;
    }
    assert!(seen.iter().all(|s| *s), "every variant drawn: {seen:?}");
}
