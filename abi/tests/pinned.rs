//! Pins the exact postcard bytes of every request and reply variant. postcard
//! is positional: if one of these changes, the wire changed (a variant or
//! field was reordered, removed or retyped), which the protocol forbids.

use abi::mmu::{DIRTY_CHUNK_BYTES, MAX_REGIONS};
use abi::*;

/// One sample of every request variant, in declaration order. The exhaustive
/// match makes adding a variant without pinning it a compile error.
fn requests() -> Vec<MmuRequest> {
    let mut memory = MemoryMap::new();
    memory
        .push(MemRegion {
            gfn: Gfn(0),
            mfn: Mfn(0x100),
            pages: 0x200,
        })
        .unwrap();
    memory
        .push(MemRegion {
            gfn: Gfn(0x1000),
            mfn: Mfn(0x8000),
            pages: 1,
        })
        .unwrap();
    let v = VcpuId(3);
    let p = PcpuId(7);
    let all = vec![
        MmuRequest::Hello { version: 1 },
        MmuRequest::CreateDomain {
            domain: DomainId(2),
            memory,
        },
        MmuRequest::DestroyDomain {
            domain: DomainId(2),
        },
        MmuRequest::CreateVcpu {
            domain: DomainId(2),
            vcpu: v,
        },
        MmuRequest::VcpuScheduled { vcpu: v, pcpu: p },
        MmuRequest::VcpuDescheduled { vcpu: v, pcpu: p },
        MmuRequest::PageFault {
            vcpu: v,
            pcpu: p,
            gva: Gva(0x7fff_1234_5678),
            error_code: PfErrorCode(PfErrorCode::W | PfErrorCode::U),
        },
        MmuRequest::WriteCr3 {
            vcpu: v,
            pcpu: p,
            cr3: GuestCr3(0x8000_0000_0012_3005),
        },
        MmuRequest::SetPagingMode {
            vcpu: v,
            pcpu: p,
            mode: PagingMode(PagingMode::WP | PagingMode::NXE),
        },
        MmuRequest::Invlpg {
            vcpu: v,
            pcpu: p,
            gva: Gva(0xffff_8000_0000_1000),
        },
        MmuRequest::EmulatedWrite {
            vcpu: v,
            pcpu: p,
            gpa: Gpa(0x5008),
            value: 0x8000_0000_0000_6067,
            size: 8,
        },
        MmuRequest::EnableDirtyLog {
            domain: DomainId(2),
        },
        MmuRequest::DisableDirtyLog {
            domain: DomainId(2),
        },
        MmuRequest::GetAndClearDirty {
            domain: DomainId(2),
            start: Gfn(0x1000),
        },
        MmuRequest::ZapAll {
            domain: DomainId(2),
        },
        MmuRequest::GetCounters {
            domain: Some(DomainId(2)),
        },
        MmuRequest::MapForeign {
            domain: DomainId(2),
            gfn: Gfn(0x9000),
            owner: DomainId(5),
            mfn: Mfn(0x1234),
            writable: true,
        },
        MmuRequest::UnmapForeign {
            domain: DomainId(2),
            gfn: Gfn(0x9000),
        },
    ];
    for (i, r) in all.iter().enumerate() {
        let idx = match r {
            MmuRequest::Hello { .. } => 0,
            MmuRequest::CreateDomain { .. } => 1,
            MmuRequest::DestroyDomain { .. } => 2,
            MmuRequest::CreateVcpu { .. } => 3,
            MmuRequest::VcpuScheduled { .. } => 4,
            MmuRequest::VcpuDescheduled { .. } => 5,
            MmuRequest::PageFault { .. } => 6,
            MmuRequest::WriteCr3 { .. } => 7,
            MmuRequest::SetPagingMode { .. } => 8,
            MmuRequest::Invlpg { .. } => 9,
            MmuRequest::EmulatedWrite { .. } => 10,
            MmuRequest::EnableDirtyLog { .. } => 11,
            MmuRequest::DisableDirtyLog { .. } => 12,
            MmuRequest::GetAndClearDirty { .. } => 13,
            MmuRequest::ZapAll { .. } => 14,
            MmuRequest::GetCounters { .. } => 15,
            MmuRequest::MapForeign { .. } => 16,
            MmuRequest::UnmapForeign { .. } => 17,
        };
        assert_eq!(i, idx, "requests() must list variants in declaration order");
        assert_eq!(r.variant_index() as usize, idx, "variant_index of {r:?}");
    }
    all
}

/// Counters with a distinct value per field (1..=17, the 16th 300 to
/// pin a two-byte varint), so a reordered field changes the bytes.
fn sample_counters() -> ServerCounters {
    // Exhaustive destructuring: a new field must be pinned here.
    let ServerCounters {
        page_faults,
        faults_fixed,
        faults_injected,
        fast_path_fixes,
        shadow_pages_created,
        shadow_pages_freed,
        shadow_pages_in_use,
        zaps,
        reclaims,
        emulate_write_replies,
        emulated_writes,
        unsyncs,
        resyncs,
        unshadowed,
        flush_obligations,
        flush_cpus,
        shadow_pages_peak,
    } = ServerCounters::default();
    let _ = (
        page_faults,
        faults_fixed,
        faults_injected,
        fast_path_fixes,
        shadow_pages_created,
        shadow_pages_freed,
        shadow_pages_in_use,
        zaps,
        reclaims,
        emulate_write_replies,
        emulated_writes,
        unsyncs,
        resyncs,
        unshadowed,
        flush_obligations,
        flush_cpus,
        shadow_pages_peak,
    );
    ServerCounters {
        page_faults: 1,
        faults_fixed: 2,
        faults_injected: 3,
        fast_path_fixes: 4,
        shadow_pages_created: 5,
        shadow_pages_freed: 6,
        shadow_pages_in_use: 7,
        zaps: 8,
        reclaims: 9,
        emulate_write_replies: 10,
        emulated_writes: 11,
        unsyncs: 12,
        resyncs: 13,
        unshadowed: 14,
        flush_obligations: 15,
        flush_cpus: 300,
        shadow_pages_peak: 17,
    }
}

fn flush(cpus: u64, scope: FlushScope) -> Option<FlushObligation> {
    Some(FlushObligation {
        cpus: CpuSet(cpus),
        scope,
    })
}

/// One sample of every reply variant (several for nested enums), in order.
fn replies() -> Vec<MmuReply> {
    let mut bits = heapless::Vec::new();
    bits.extend_from_slice(&[0x01, 0x80, 0x00, 0xff]).unwrap();
    let all = vec![
        MmuReply::Welcome { version: 1 },
        MmuReply::Done { flush: None },
        MmuReply::Resume {
            flush: flush(0b1010, FlushScope::Page(Gva(0x40_1000))),
        },
        MmuReply::InjectPageFault {
            error_code: PfErrorCode(PfErrorCode::P | PfErrorCode::W),
            address: Gva(0x1234),
            flush: None,
        },
        MmuReply::LoadShadowRoot {
            vcpu: VcpuId(3),
            root: Hpa(0x1_2345_6000),
            flush: flush(
                1 << 63,
                FlushScope::Range {
                    start: Gva(0x20_0000),
                    pages: 512,
                },
            ),
        },
        MmuReply::EmulateWrite {
            gpa: Gpa(0x5008),
            flush: None,
        },
        MmuReply::WriteDone {
            flush: flush(0xff, FlushScope::All),
        },
        MmuReply::DirtyBitmap {
            chunk: DirtyChunk {
                start: Gfn(0x100),
                bits,
                next: Some(Gfn(0x1100)),
            },
            flush: flush(1, FlushScope::AllReloadRoots),
        },
        MmuReply::Error {
            reason: MmuError::UnknownVcpu(VcpuId(9)),
            flush: None,
        },
        MmuReply::Counters {
            counters: sample_counters(),
            flush: None,
        },
        MmuReply::ForeignUnmapped {
            mfn: Mfn(0x1234),
            accessed: true,
            cpus: CpuSet(0b110),
            flush: None,
        },
        MmuReply::Mmio {
            gpa: Gpa(0xfee0_00b0),
            write: true,
            flush: flush(0b1, FlushScope::All),
        },
    ];
    for (i, r) in all.iter().enumerate() {
        let idx = match r {
            MmuReply::Welcome { .. } => 0,
            MmuReply::Done { .. } => 1,
            MmuReply::Resume { .. } => 2,
            MmuReply::InjectPageFault { .. } => 3,
            MmuReply::LoadShadowRoot { .. } => 4,
            MmuReply::EmulateWrite { .. } => 5,
            MmuReply::WriteDone { .. } => 6,
            MmuReply::DirtyBitmap { .. } => 7,
            MmuReply::Error { .. } => 8,
            MmuReply::Counters { .. } => 9,
            MmuReply::ForeignUnmapped { .. } => 10,
            MmuReply::Mmio { .. } => 11,
        };
        assert_eq!(i, idx, "replies() must list variants in declaration order");
    }
    all
}

/// One sample of every error reason, in declaration order.
fn errors() -> Vec<MmuError> {
    let all = vec![
        MmuError::Malformed(DecodeError::TrailingBytes(3)),
        MmuError::VersionMismatch {
            requested: 7,
            supported: 1,
        },
        MmuError::UnknownDomain(DomainId(4)),
        MmuError::DomainExists(DomainId(4)),
        MmuError::UnknownVcpu(VcpuId(5)),
        MmuError::VcpuExists(VcpuId(5)),
        MmuError::InvalidPcpu(PcpuId(64)),
        MmuError::BadRegion(MemRegion {
            gfn: Gfn(1),
            mfn: Mfn(2),
            pages: 0,
        }),
        MmuError::OverlappingRegions(Gfn(0x10)),
        MmuError::CapacityExceeded {
            what: abi::mmu::Resource::Vcpus,
            limit: 64,
        },
        MmuError::OutOfShadowMemory(DomainId(4)),
        MmuError::Memory(MemError::OutOfRange(Hpa(0x1000))),
        MmuError::BadWriteSize(3),
        MmuError::WriteCrossesPage(Gpa(0xffe)),
        MmuError::GpaNotInMemory(Gpa(0xdead_0000)),
        MmuError::UnsupportedPagingMode(PagingMode(PagingMode::SMAP)),
        MmuError::DirtyLogDisabled(DomainId(4)),
        MmuError::Unsupported(13),
        MmuError::VcpuRunning(VcpuId(5)),
        MmuError::GfnInUse(Gfn(0x10)),
        MmuError::NotForeignMapped(Gfn(0x11)),
        MmuError::NotOwnedBy {
            mfn: Mfn(0x12),
            owner: DomainId(4),
        },
        MmuError::FramesMapped {
            mapper: DomainId(6),
            gfn: Gfn(0x13),
        },
        MmuError::FaultOutsideMode(Gva(0x1_0000_0000)),
    ];
    for (i, e) in all.iter().enumerate() {
        let idx = match e {
            MmuError::Malformed(_) => 0,
            MmuError::VersionMismatch { .. } => 1,
            MmuError::UnknownDomain(_) => 2,
            MmuError::DomainExists(_) => 3,
            MmuError::UnknownVcpu(_) => 4,
            MmuError::VcpuExists(_) => 5,
            MmuError::InvalidPcpu(_) => 6,
            MmuError::BadRegion(_) => 7,
            MmuError::OverlappingRegions(_) => 8,
            MmuError::CapacityExceeded { .. } => 9,
            MmuError::OutOfShadowMemory(_) => 10,
            MmuError::Memory(_) => 11,
            MmuError::BadWriteSize(_) => 12,
            MmuError::WriteCrossesPage(_) => 13,
            MmuError::GpaNotInMemory(_) => 14,
            MmuError::UnsupportedPagingMode(_) => 15,
            MmuError::DirtyLogDisabled(_) => 16,
            MmuError::Unsupported(_) => 17,
            MmuError::VcpuRunning(_) => 18,
            MmuError::GfnInUse(_) => 19,
            MmuError::NotForeignMapped(_) => 20,
            MmuError::NotOwnedBy { .. } => 21,
            MmuError::FramesMapped { .. } => 22,
            MmuError::FaultOutsideMode(_) => 23,
        };
        assert_eq!(i, idx, "errors() must list variants in declaration order");
    }
    all
}

fn hex<T: serde::Serialize>(msg: &T) -> String {
    let mut buf = [0u8; MAX_MESSAGE];
    let n = encode(msg, &mut buf).expect("encodes");
    buf[..n].iter().map(|b| format!("{b:02x}")).collect()
}

fn check<T>(name: &str, msgs: Vec<T>, pinned: &[&str])
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + core::fmt::Debug,
{
    let got: Vec<String> = msgs.iter().map(hex).collect();
    if got != pinned {
        panic!("{name}: encoding changed; actual bytes:\n{got:#?}");
    }
    for m in msgs {
        let mut buf = [0u8; MAX_MESSAGE];
        let n = encode(&m, &mut buf).unwrap();
        let back: T = decode(&buf[..n]).unwrap();
        assert_eq!(back, m);
    }
}

#[test]
fn pinned_requests() {
    check("requests", requests(), &PINNED_REQUESTS);
}

#[test]
fn pinned_replies() {
    check("replies", replies(), &PINNED_REPLIES);
}

#[test]
fn pinned_error_reasons() {
    let replies: Vec<MmuReply> = errors().into_iter().map(MmuReply::error).collect();
    check("errors", replies, &PINNED_ERRORS);
}

#[test]
fn pinned_scopes_and_decode_errors() {
    let scopes = vec![
        FlushScope::Page(Gva(0x1000)),
        FlushScope::Range {
            start: Gva(0x2000),
            pages: 3,
        },
        FlushScope::All,
        FlushScope::AllReloadRoots,
    ];
    // Exhaustive: a new variant must be pinned here.
    for (i, sc) in scopes.iter().enumerate() {
        let idx = match sc {
            FlushScope::Page(_) => 0,
            FlushScope::Range { .. } => 1,
            FlushScope::All => 2,
            FlushScope::AllReloadRoots => 3,
        };
        assert_eq!(i, idx);
    }
    check("scopes", scopes, &["008020", "01804003", "02", "03"][..]);
    let decode_errors = vec![
        DecodeError::UnexpectedEnd,
        DecodeError::BadVarint,
        DecodeError::BadBool,
        DecodeError::BadOption,
        DecodeError::BadEnum,
        DecodeError::BadEncoding,
        DecodeError::TrailingBytes(2),
        DecodeError::TooLong(2000),
        DecodeError::Other,
    ];
    for (i, e) in decode_errors.iter().enumerate() {
        let idx = match e {
            DecodeError::UnexpectedEnd => 0,
            DecodeError::BadVarint => 1,
            DecodeError::BadBool => 2,
            DecodeError::BadOption => 3,
            DecodeError::BadEnum => 4,
            DecodeError::BadEncoding => 5,
            DecodeError::TrailingBytes(_) => 6,
            DecodeError::TooLong(_) => 7,
            DecodeError::Other => 8,
        };
        assert_eq!(i, idx);
    }
    check(
        "decode errors",
        decode_errors,
        &["00", "01", "02", "03", "04", "05", "0602", "07d00f", "08"][..],
    );
    let mem_errors = vec![
        MemError::Misaligned(Hpa(1)),
        MemError::OutOfRange(Hpa(2)),
        MemError::BadFrame(Mfn(3)),
    ];
    check("mem errors", mem_errors, &["0001", "0102", "0203"][..]);
    let resources = vec![
        abi::mmu::Resource::Domains,
        abi::mmu::Resource::Vcpus,
        abi::mmu::Resource::GuestFrames,
        abi::mmu::Resource::ForeignMaps,
    ];
    check("resources", resources, &["00", "01", "02", "03"][..]);
    // GetCounters for the whole server, and Counters with a flush.
    check(
        "counters extras",
        vec![
            MmuReply::Counters {
                counters: ServerCounters::default(),
                flush: flush(0b11, FlushScope::All),
            },
            MmuReply::error(MmuError::Unsupported(MmuRequest::GET_COUNTERS)),
        ],
        &["090000000000000000000000000000000000010302", "08110f00"][..],
    );
    check(
        "get counters (whole server)",
        vec![MmuRequest::GetCounters { domain: None }],
        &["0f00"][..],
    );
    // Version 5: paging off (bit 6) with MMIO emulation (bit 7), as the
    // kernel sends it for an unmodified guest at entry.
    check(
        "paging off",
        vec![MmuRequest::SetPagingMode {
            vcpu: VcpuId(2),
            pcpu: PcpuId(1),
            mode: PagingMode(PagingMode::OFF | PagingMode::MMIO),
        }],
        &["080201c001"][..],
    );
}

/// The default `counters` of a server that does not count is an honest
/// `Unsupported(GetCounters)`, through the bytes.
#[test]
fn default_counters_is_unsupported() {
    struct NoCounters;
    impl MmuServer for NoCounters {
        fn name(&self) -> &'static str {
            "no-counters"
        }
        fn create_domain(&self, _: DomainId, _: &MemoryMap) -> MmuReply {
            unreachable!()
        }
        fn destroy_domain(&self, _: DomainId) -> MmuReply {
            unreachable!()
        }
        fn create_vcpu(&self, _: DomainId, _: VcpuId) -> MmuReply {
            unreachable!()
        }
        fn vcpu_scheduled(&self, _: VcpuId, _: PcpuId) -> MmuReply {
            unreachable!()
        }
        fn vcpu_descheduled(&self, _: VcpuId, _: PcpuId) -> MmuReply {
            unreachable!()
        }
        fn page_fault(&self, _: VcpuId, _: PcpuId, _: Gva, _: PfErrorCode) -> MmuReply {
            unreachable!()
        }
        fn write_cr3(&self, _: VcpuId, _: PcpuId, _: GuestCr3) -> MmuReply {
            unreachable!()
        }
        fn set_paging_mode(&self, _: VcpuId, _: PcpuId, _: PagingMode) -> MmuReply {
            unreachable!()
        }
        fn invlpg(&self, _: VcpuId, _: PcpuId, _: Gva) -> MmuReply {
            unreachable!()
        }
        fn emulated_write(&self, _: VcpuId, _: PcpuId, _: Gpa, _: u64, _: u8) -> MmuReply {
            unreachable!()
        }
        fn enable_dirty_log(&self, _: DomainId) -> MmuReply {
            unreachable!()
        }
        fn disable_dirty_log(&self, _: DomainId) -> MmuReply {
            unreachable!()
        }
        fn get_and_clear_dirty(&self, _: DomainId, _: Gfn) -> MmuReply {
            unreachable!()
        }
        fn zap_all(&self, _: DomainId) -> MmuReply {
            unreachable!()
        }
    }
    for domain in [None, Some(DomainId(1))] {
        let mut buf = [0u8; MAX_MESSAGE];
        let n = encode(&MmuRequest::GetCounters { domain }, &mut buf).unwrap();
        let mut out = [0u8; MAX_MESSAGE];
        let m = dispatch(&NoCounters, &buf[..n], &mut out);
        let reply: MmuReply = decode(&out[..m]).unwrap();
        assert_eq!(
            reply,
            MmuReply::error(MmuError::Unsupported(MmuRequest::GET_COUNTERS))
        );
    }
    let text = format!("{}", MmuError::Unsupported(MmuRequest::GET_COUNTERS));
    assert!(text.contains("does not report counters"), "{text}");
}

/// The largest message of each kind fits in MAX_MESSAGE.
#[test]
fn worst_case_messages_fit() {
    let mut memory = MemoryMap::new();
    for _ in 0..MAX_REGIONS {
        memory
            .push(MemRegion {
                gfn: Gfn(u64::MAX),
                mfn: Mfn(u64::MAX),
                pages: u64::MAX,
            })
            .unwrap();
    }
    let big_req = MmuRequest::CreateDomain {
        domain: DomainId(u32::MAX),
        memory,
    };
    let mut bits = heapless::Vec::new();
    bits.resize(DIRTY_CHUNK_BYTES, 0xff).unwrap();
    let worst_flush = Some(FlushObligation {
        cpus: CpuSet(u64::MAX),
        scope: FlushScope::Range {
            start: Gva(u64::MAX),
            pages: u32::MAX,
        },
    });
    let big_reply = MmuReply::DirtyBitmap {
        chunk: DirtyChunk {
            start: Gfn(u64::MAX),
            bits,
            next: Some(Gfn(u64::MAX)),
        },
        flush: worst_flush,
    };
    let mut buf = [0u8; MAX_MESSAGE];
    let a = encode(&big_req, &mut buf).expect("largest request fits");
    let b = encode(&big_reply, &mut buf).expect("largest reply fits");
    assert!(a <= MAX_MESSAGE && b <= MAX_MESSAGE);
    // Also every error reason with worst-case values.
    let e = MmuReply::Error {
        reason: MmuError::BadRegion(MemRegion {
            gfn: Gfn(u64::MAX),
            mfn: Mfn(u64::MAX),
            pages: u64::MAX,
        }),
        flush: worst_flush,
    };
    assert!(encode(&e, &mut buf).unwrap() < 100);
    // Counters with every field at u64::MAX (10-byte varints) and the worst
    // flush: well inside the bound.
    let c = ServerCounters {
        page_faults: u64::MAX,
        faults_fixed: u64::MAX,
        faults_injected: u64::MAX,
        fast_path_fixes: u64::MAX,
        shadow_pages_created: u64::MAX,
        shadow_pages_freed: u64::MAX,
        shadow_pages_in_use: u64::MAX,
        zaps: u64::MAX,
        reclaims: u64::MAX,
        emulate_write_replies: u64::MAX,
        emulated_writes: u64::MAX,
        unsyncs: u64::MAX,
        resyncs: u64::MAX,
        unshadowed: u64::MAX,
        flush_obligations: u64::MAX,
        flush_cpus: u64::MAX,
        shadow_pages_peak: u64::MAX,
    };
    let big_counters = MmuReply::Counters {
        counters: c,
        flush: worst_flush,
    };
    let n = encode(&big_counters, &mut buf).expect("largest Counters reply fits");
    // (200 < MAX_MESSAGE: far inside the bound.)
    assert!(n <= 200, "Counters reply is {n} bytes");
    let big_get = MmuRequest::GetCounters {
        domain: Some(DomainId(u32::MAX)),
    };
    assert!(encode(&big_get, &mut buf).unwrap() <= 7);
}

const PINNED_REQUESTS: [&str; 18] = [
    "0001",
    "0102020080028004802080800201",
    "0202",
    "030203",
    "040307",
    "050307",
    "060307f8acd191f1ff1f06",
    "07030785e0c880808080808001",
    "08030703",
    "09030780a080808080e0ffff01",
    "0a030788a001e7c0818080808080800108",
    "0b02",
    "0c02",
    "0d028020",
    "0e02",
    "0f0102",
    "100280a00205b42401",
    "110280a002",
];
const PINNED_REPLIES: [&str; 12] = [
    "0001",
    "0100",
    "02010a0080a08002",
    "0303b42400",
    "040380c0959a12018080808080808080800101808080018004",
    "0588a00100",
    "0601ff0102",
    "07800204018000ff018022010103",
    "08040900",
    "090102030405060708090a0b0c0d0e0fac021100",
    "0ab424010600",
    "0bb08180f70f01010102",
];
const PINNED_ERRORS: [&str; 24] = [
    "0800060300",
    "0801070100",
    "08020400",
    "08030400",
    "08040500",
    "08050500",
    "08064000",
    "080701020000",
    "08081000",
    "0809014000",
    "080a0400",
    "080b01802000",
    "080c0300",
    "080dfe1f00",
    "080e8080b4f50d00",
    "080f1000",
    "08100400",
    "08110d00",
    "08120500",
    "08131000",
    "08141100",
    "0815120400",
    "0816061300",
    "0817808080801000",
];

// ---- the grant protocol ----------------------------------------------------

/// One sample of every grant request variant, in declaration order.
fn grant_requests() -> Vec<GrantRequest> {
    let mut memory = MemoryMap::new();
    memory
        .push(MemRegion {
            gfn: Gfn(0),
            mfn: Mfn(0x100),
            pages: 0x10,
        })
        .unwrap();
    let mut handles = heapless::Vec::new();
    handles
        .extend_from_slice(&[MapHandle(1), MapHandle(0x1002)])
        .unwrap();
    let all = vec![
        GrantRequest::Hello { version: 1 },
        GrantRequest::CreateDomain {
            domain: DomainId(2),
            memory,
        },
        GrantRequest::DestroyDomain {
            domain: DomainId(2),
        },
        GrantRequest::Grant {
            domain: DomainId(2),
            gref: GrantRef(7),
            grantee: DomainId(3),
            gfn: Gfn(0x12),
            readonly: true,
        },
        GrantRequest::EndAccess {
            domain: DomainId(2),
            gref: GrantRef(7),
        },
        GrantRequest::Map {
            domain: DomainId(3),
            granter: DomainId(2),
            gref: GrantRef(7),
            gfn: Gfn(0x9000),
            writable: false,
        },
        GrantRequest::Unmap {
            domain: DomainId(3),
            handles,
        },
        GrantRequest::Copy {
            domain: DomainId(3),
            granter: DomainId(2),
            gref: GrantRef(7),
            offset: 0x100,
            local: Gpa(0x5008),
            len: 64,
            direction: CopyDirection::ToGrant,
        },
        GrantRequest::GetCounters { domain: None },
    ];
    for (i, r) in all.iter().enumerate() {
        let idx = match r {
            GrantRequest::Hello { .. } => 0,
            GrantRequest::CreateDomain { .. } => 1,
            GrantRequest::DestroyDomain { .. } => 2,
            GrantRequest::Grant { .. } => 3,
            GrantRequest::EndAccess { .. } => 4,
            GrantRequest::Map { .. } => 5,
            GrantRequest::Unmap { .. } => 6,
            GrantRequest::Copy { .. } => 7,
            GrantRequest::GetCounters { .. } => 8,
        };
        assert_eq!(i, idx, "grant_requests() must list variants in order");
        assert_eq!(r.variant_index() as usize, idx);
    }
    all
}

/// Grant counters with a distinct value per field (1..=11).
fn sample_grant_counters() -> GrantCounters {
    // Exhaustive destructuring: a new field must be pinned here.
    let GrantCounters {
        grants,
        maps,
        unmaps,
        batches,
        flushes,
        flushes_avoided,
        flush_cpus,
        copies,
        grants_active,
        maps_active,
        handles_in_use,
    } = GrantCounters {
        grants: 1,
        maps: 2,
        unmaps: 3,
        batches: 4,
        flushes: 5,
        flushes_avoided: 6,
        flush_cpus: 7,
        copies: 8,
        grants_active: 9,
        maps_active: 10,
        handles_in_use: 11,
    };
    GrantCounters {
        grants,
        maps,
        unmaps,
        batches,
        flushes,
        flushes_avoided,
        flush_cpus,
        copies,
        grants_active,
        maps_active,
        handles_in_use,
    }
}

/// One sample of every grant reply variant, in order.
fn grant_replies() -> Vec<GrantReply> {
    let mut status = heapless::Vec::new();
    status
        .extend_from_slice(&[Ok(()), Err(GrantError::BadHandle(MapHandle(5)))])
        .unwrap();
    let all = vec![
        GrantReply::Welcome { version: 1 },
        GrantReply::Done { flush: None },
        GrantReply::Mapped {
            handle: MapHandle(0x1001),
            flush: None,
        },
        GrantReply::Unmapped {
            status,
            flush: flush(0b11, FlushScope::All),
        },
        GrantReply::CopyPlan {
            src: Hpa(0x10_0000),
            dst: Hpa(0x20_0008),
            len: 64,
            flush: None,
        },
        GrantReply::Counters {
            counters: sample_grant_counters(),
            flush: None,
        },
        GrantReply::Error {
            reason: GrantError::ReadOnly(GrantRef(7)),
            flush: None,
        },
    ];
    for (i, r) in all.iter().enumerate() {
        let idx = match r {
            GrantReply::Welcome { .. } => 0,
            GrantReply::Done { .. } => 1,
            GrantReply::Mapped { .. } => 2,
            GrantReply::Unmapped { .. } => 3,
            GrantReply::CopyPlan { .. } => 4,
            GrantReply::Counters { .. } => 5,
            GrantReply::Error { .. } => 6,
        };
        assert_eq!(i, idx, "grant_replies() must list variants in order");
    }
    all
}

/// One sample of every grant error, in order.
fn grant_errors() -> Vec<GrantError> {
    let all = vec![
        GrantError::Malformed(DecodeError::BadEncoding),
        GrantError::VersionMismatch {
            requested: 9,
            supported: 1,
        },
        GrantError::UnknownDomain(DomainId(4)),
        GrantError::DomainExists(DomainId(4)),
        GrantError::RefOutOfRange {
            gref: GrantRef(600),
            limit: 512,
        },
        GrantError::RefInUse(GrantRef(7)),
        GrantError::NotGranted {
            granter: DomainId(2),
            gref: GrantRef(7),
        },
        GrantError::NotGrantedTo {
            gref: GrantRef(7),
            domain: DomainId(3),
        },
        GrantError::ReadOnly(GrantRef(7)),
        GrantError::StillMapped {
            gref: GrantRef(7),
            maps: 2,
        },
        GrantError::BadHandle(MapHandle(0x2001)),
        GrantError::GfnNotInMemory(Gfn(0x99)),
        GrantError::CopyCrossesPage {
            offset: 4000,
            len: 200,
        },
        GrantError::CapacityExceeded {
            what: GrantResource::MapHandles,
            limit: 1024,
        },
        GrantError::Mmu(MmuError::GfnInUse(Gfn(0x10))),
        GrantError::MmuProtocol(4),
        GrantError::SelfGrant(DomainId(2)),
    ];
    for (i, e) in all.iter().enumerate() {
        let idx = match e {
            GrantError::Malformed(_) => 0,
            GrantError::VersionMismatch { .. } => 1,
            GrantError::UnknownDomain(_) => 2,
            GrantError::DomainExists(_) => 3,
            GrantError::RefOutOfRange { .. } => 4,
            GrantError::RefInUse(_) => 5,
            GrantError::NotGranted { .. } => 6,
            GrantError::NotGrantedTo { .. } => 7,
            GrantError::ReadOnly(_) => 8,
            GrantError::StillMapped { .. } => 9,
            GrantError::BadHandle(_) => 10,
            GrantError::GfnNotInMemory(_) => 11,
            GrantError::CopyCrossesPage { .. } => 12,
            GrantError::CapacityExceeded { .. } => 13,
            GrantError::Mmu(_) => 14,
            GrantError::MmuProtocol(_) => 15,
            GrantError::SelfGrant(_) => 16,
        };
        assert_eq!(i, idx, "grant_errors() must list variants in order");
    }
    all
}

#[test]
fn pinned_grant_requests() {
    check("grant requests", grant_requests(), &PINNED_GRANT_REQUESTS);
}

#[test]
fn pinned_grant_replies() {
    check("grant replies", grant_replies(), &PINNED_GRANT_REPLIES);
}

#[test]
fn pinned_grant_errors_and_enums() {
    let replies: Vec<GrantReply> = grant_errors().into_iter().map(GrantReply::error).collect();
    check("grant errors", replies, &PINNED_GRANT_ERRORS);
    let resources = vec![
        GrantResource::Domains,
        GrantResource::MapHandles,
        GrantResource::MapsPerGrant,
    ];
    for (i, r) in resources.iter().enumerate() {
        let idx = match r {
            GrantResource::Domains => 0,
            GrantResource::MapHandles => 1,
            GrantResource::MapsPerGrant => 2,
        };
        assert_eq!(i, idx);
    }
    check("grant resources", resources, &["00", "01", "02"][..]);
    let dirs = vec![CopyDirection::FromGrant, CopyDirection::ToGrant];
    for (i, d) in dirs.iter().enumerate() {
        let idx = match d {
            CopyDirection::FromGrant => 0,
            CopyDirection::ToGrant => 1,
        };
        assert_eq!(i, idx);
    }
    check("copy directions", dirs, &["00", "01"][..]);
}

/// The largest grant messages fit in MAX_MESSAGE.
#[test]
fn worst_case_grant_messages_fit() {
    let mut buf = [0u8; MAX_MESSAGE];
    let mut handles = heapless::Vec::new();
    let mut status = heapless::Vec::new();
    for _ in 0..MAX_UNMAP_BATCH {
        handles.push(MapHandle(u32::MAX)).unwrap();
        status
            .push(Err(GrantError::Mmu(MmuError::FramesMapped {
                mapper: DomainId(u32::MAX),
                gfn: Gfn(u64::MAX),
            })))
            .unwrap();
    }
    let req = GrantRequest::Unmap {
        domain: DomainId(u32::MAX),
        handles,
    };
    let worst_flush = flush(u64::MAX, FlushScope::All);
    let reply = GrantReply::Unmapped {
        status,
        flush: worst_flush,
    };
    let a = encode(&req, &mut buf).expect("largest unmap request fits");
    let b = encode(&reply, &mut buf).expect("largest unmap reply fits");
    assert!(a <= MAX_MESSAGE && b <= MAX_MESSAGE, "{a} {b}");
    let c = GrantReply::Counters {
        counters: GrantCounters {
            grants: u64::MAX,
            maps: u64::MAX,
            unmaps: u64::MAX,
            batches: u64::MAX,
            flushes: u64::MAX,
            flushes_avoided: u64::MAX,
            flush_cpus: u64::MAX,
            copies: u64::MAX,
            grants_active: u64::MAX,
            maps_active: u64::MAX,
            handles_in_use: u64::MAX,
        },
        flush: worst_flush,
    };
    assert!(encode(&c, &mut buf).unwrap() <= 200);
}

const PINNED_GRANT_REQUESTS: [&str; 9] = [
    "0001",
    "01020100800210",
    "0202",
    "030207031201",
    "040207",
    "0503020780a00200",
    "060302018220",
    "07030207800288a0014001",
    "0800",
];
const PINNED_GRANT_REPLIES: [&str; 7] = [
    "0001",
    "0100",
    "02812000",
    "030200010a05010302",
    "04808040888080014000",
    "050102030405060708090a0b00",
    "06080700",
];
const PINNED_GRANT_ERRORS: [&str; 17] = [
    "06000500",
    "0601090100",
    "06020400",
    "06030400",
    "0604d804800400",
    "06050700",
    "0606020700",
    "0607070300",
    "06080700",
    "0609070200",
    "060a814000",
    "060b990100",
    "060ca01fc80100",
    "060d01800800",
    "060e131000",
    "060f0400",
    "06100200",
];

/// The scheduler protocol's bytes, pinned like the MMU protocol's.
mod sched_wire {
    use super::check;
    use abi::sched::{
        dispatch, Guarantees, Micros, SchedError, SchedReply, SchedRequest, SchedServer,
        StopReason, MAX_SLICE, PROTOCOL_VERSION,
    };
    use abi::{decode, encode, CpuSet, DecodeError, DomainId, PcpuId, VcpuId, MAX_MESSAGE};

    const V: VcpuId = VcpuId(3);
    const P: PcpuId = PcpuId(7);

    /// One sample of every request variant, in declaration order (every
    /// stop reason in `Stopped`).
    fn requests() -> Vec<SchedRequest> {
        let stopped = |why| SchedRequest::Stopped {
            vcpu: V,
            pcpu: P,
            ran: Micros(1000),
            why,
        };
        let all = vec![
            SchedRequest::Hello { version: 1 },
            SchedRequest::CreateVcpu {
                vcpu: V,
                domain: DomainId(2),
                weight: 256,
                hint: P,
            },
            SchedRequest::DestroyVcpu { vcpu: V },
            SchedRequest::Wake { vcpu: V },
            stopped(StopReason::Yielded),
            SchedRequest::PickNext { pcpu: P },
            stopped(StopReason::Blocked),
            stopped(StopReason::SliceExpired),
            stopped(StopReason::Preempted),
        ];
        for (i, r) in all.iter().take(6).enumerate() {
            let idx = match r {
                SchedRequest::Hello { .. } => 0,
                SchedRequest::CreateVcpu { .. } => 1,
                SchedRequest::DestroyVcpu { .. } => 2,
                SchedRequest::Wake { .. } => 3,
                SchedRequest::Stopped { .. } => 4,
                SchedRequest::PickNext { .. } => 5,
            };
            assert_eq!(i, idx, "requests() must list variants in declaration order");
        }
        for (i, r) in all.iter().enumerate() {
            if let SchedRequest::Stopped { why, .. } = r {
                let idx = match why {
                    StopReason::Yielded => 4,
                    StopReason::Blocked => 6,
                    StopReason::SliceExpired => 7,
                    StopReason::Preempted => 8,
                };
                assert_eq!(i, idx, "every stop reason, in declaration order");
            }
        }
        all
    }

    /// One sample of every reply variant, in declaration order.
    fn replies() -> Vec<SchedReply> {
        let all = vec![
            SchedReply::Welcome {
                version: 1,
                guarantees: Guarantees {
                    weighted: true,
                    pinned: false,
                },
            },
            SchedReply::Done {
                kick: CpuSet(0b1010),
            },
            SchedReply::Run {
                vcpu: V,
                slice: Micros(2000),
            },
            SchedReply::Idle,
            SchedReply::error(SchedError::UnknownVcpu(V)),
        ];
        for (i, r) in all.iter().enumerate() {
            let idx = match r {
                SchedReply::Welcome { .. } => 0,
                SchedReply::Done { .. } => 1,
                SchedReply::Run { .. } => 2,
                SchedReply::Idle => 3,
                SchedReply::Error { .. } => 4,
            };
            assert_eq!(i, idx, "replies() must list variants in declaration order");
            assert_eq!(r.variant_index() as usize, idx);
        }
        all
    }

    /// One sample of every error reason, in declaration order.
    fn errors() -> Vec<SchedError> {
        let all = vec![
            SchedError::Malformed(DecodeError::TrailingBytes(3)),
            SchedError::VersionMismatch {
                requested: 7,
                supported: 1,
            },
            SchedError::UnknownVcpu(V),
            SchedError::VcpuExists(V),
            SchedError::InvalidPcpu(PcpuId(64)),
            SchedError::BadWeight(0),
            SchedError::TooManyVcpus(256),
            SchedError::VcpuRunning { vcpu: V, pcpu: P },
            SchedError::VcpuBlocked(V),
            SchedError::NotRunningHere { vcpu: V, pcpu: P },
            SchedError::PcpuBusy { pcpu: P, vcpu: V },
            SchedError::BadSlice(Micros(0)),
            SchedError::UnexpectedReply(1),
        ];
        for (i, e) in all.iter().enumerate() {
            let idx = match e {
                SchedError::Malformed(_) => 0,
                SchedError::VersionMismatch { .. } => 1,
                SchedError::UnknownVcpu(_) => 2,
                SchedError::VcpuExists(_) => 3,
                SchedError::InvalidPcpu(_) => 4,
                SchedError::BadWeight(_) => 5,
                SchedError::TooManyVcpus(_) => 6,
                SchedError::VcpuRunning { .. } => 7,
                SchedError::VcpuBlocked(_) => 8,
                SchedError::NotRunningHere { .. } => 9,
                SchedError::PcpuBusy { .. } => 10,
                SchedError::BadSlice(_) => 11,
                SchedError::UnexpectedReply(_) => 12,
            };
            assert_eq!(i, idx, "errors() must list variants in declaration order");
        }
        all
    }

    const PINNED_REQUESTS: [&str; 9] = [
        "0001",
        "010302800207",
        "0203",
        "0303",
        "040307e80700",
        "0507",
        "040307e80701",
        "040307e80702",
        "040307e80703",
    ];
    const PINNED_REPLIES: [&str; 5] = ["00010100", "010a", "0203d00f", "03", "040203"];
    const PINNED_ERRORS: [&str; 13] = [
        "04000603", "04010701", "040203", "040303", "040440", "040500", "04068002", "04070307",
        "040803", "04090307", "040a0703", "040b00", "040c01",
    ];

    #[test]
    fn pinned_sched_messages() {
        check("sched requests", requests(), &PINNED_REQUESTS);
        check("sched replies", replies(), &PINNED_REPLIES);
        let errs: Vec<SchedReply> = errors().into_iter().map(SchedReply::error).collect();
        check("sched errors", errs, &PINNED_ERRORS);
    }

    /// The largest scheduler messages are far inside [`MAX_MESSAGE`].
    #[test]
    fn worst_case_sched_messages_fit() {
        let mut buf = [0u8; MAX_MESSAGE];
        let v = VcpuId(u32::MAX);
        let p = PcpuId(u32::MAX);
        let big_req = SchedRequest::CreateVcpu {
            vcpu: v,
            domain: DomainId(u32::MAX),
            weight: u32::MAX,
            hint: p,
        };
        assert!(encode(&big_req, &mut buf).unwrap() <= 21);
        let big_stop = SchedRequest::Stopped {
            vcpu: v,
            pcpu: p,
            ran: Micros(u64::MAX),
            why: StopReason::Preempted,
        };
        assert!(encode(&big_stop, &mut buf).unwrap() <= 22);
        for reply in [
            SchedReply::Done {
                kick: CpuSet(u64::MAX),
            },
            SchedReply::Run {
                vcpu: v,
                slice: Micros(u64::MAX),
            },
            SchedReply::error(SchedError::VcpuRunning { vcpu: v, pcpu: p }),
            SchedReply::error(SchedError::VersionMismatch {
                requested: u32::MAX,
                supported: u32::MAX,
            }),
        ] {
            // At most: a tag, a 5-byte and a 10-byte varint.
            assert!(encode(&reply, &mut buf).unwrap() <= 16, "{reply:?}");
        }
        assert_eq!(format!("{MAX_SLICE}"), "100.000 ms");
    }

    /// `Hello` is answered by `call` with the server's guarantees, through
    /// the bytes; a wrong version is refused naming both versions.
    #[test]
    fn hello_carries_the_guarantees() {
        struct Claims;
        impl SchedServer for Claims {
            fn name(&self) -> &'static str {
                "claims"
            }
            fn guarantees(&self) -> Guarantees {
                Guarantees {
                    weighted: false,
                    pinned: true,
                }
            }
            fn create_vcpu(&self, _: VcpuId, _: DomainId, _: u32, _: PcpuId) -> SchedReply {
                unreachable!()
            }
            fn destroy_vcpu(&self, _: VcpuId) -> SchedReply {
                unreachable!()
            }
            fn wake(&self, _: VcpuId) -> SchedReply {
                unreachable!()
            }
            fn stopped(&self, _: VcpuId, _: PcpuId, _: Micros, _: StopReason) -> SchedReply {
                unreachable!()
            }
            fn pick_next(&self, _: PcpuId) -> SchedReply {
                unreachable!()
            }
        }
        let mut out = [0u8; MAX_MESSAGE];
        let n = dispatch(&Claims, &[0x00, PROTOCOL_VERSION as u8], &mut out);
        assert_eq!(
            decode::<SchedReply>(&out[..n]).unwrap(),
            SchedReply::Welcome {
                version: PROTOCOL_VERSION,
                guarantees: Guarantees {
                    weighted: false,
                    pinned: true
                }
            }
        );
        let n = dispatch(&Claims, &[0x00, 0x09], &mut out);
        assert_eq!(
            decode::<SchedReply>(&out[..n]).unwrap(),
            SchedReply::error(SchedError::VersionMismatch {
                requested: 9,
                supported: PROTOCOL_VERSION
            })
        );
    }
}
