//! The grant server's state machine fuzzed through the wire: seeded random
//! request sequences (valid, near-valid and mutated bytes) from several
//! domains against each registered grant server over every registered MMU
//! server. Never a panic, every reply decodes and fits, the levels stay
//! consistent (pins = live handles) after every step, every unmap status
//! matches the model, and after every domain is destroyed nothing is left
//! in either server (no grant, pin or handle; every domain's MMU state can
//! be destroyed, which the MMU server refuses while a frame is mapped).

use abi::mmu::{MemRegion, MemoryMap, MmuError, MmuReply, MmuServer};
use abi::{
    decode, encode, grant_dispatch, CopyDirection, DomainId, Gfn, Gpa, GrantRef, GrantReply,
    GrantRequest, GrantServer, MapHandle, Mfn, MAX_MESSAGE, MAX_UNMAP_BATCH,
};
use conformance::random::Rng;
use grant_server::{registry, DispatchPort};
use mmu_server::sim::SimMem;

const DOMS: u32 = 4;
const FRAMES: u64 = 32;

fn memory_of(d: u32) -> MemoryMap {
    let mut m = MemoryMap::new();
    m.push(MemRegion {
        gfn: Gfn(0),
        mfn: Mfn(1024 + u64::from(d) * FRAMES),
        pages: FRAMES,
    })
    .unwrap();
    m
}

fn send(g: &dyn GrantServer, bytes: &[u8]) -> GrantReply {
    let mut out = [0u8; MAX_MESSAGE];
    let n = grant_dispatch(g, bytes, &mut out);
    assert!(n > 0 && n <= MAX_MESSAGE);
    decode(&out[..n]).expect("grant replies decode")
}

fn call(g: &dyn GrantServer, req: &GrantRequest) -> GrantReply {
    let mut buf = [0u8; MAX_MESSAGE];
    let n = encode(req, &mut buf).unwrap();
    send(g, &buf[..n])
}

/// (grants, pins, live handles) of the whole server.
fn levels(g: &dyn GrantServer) -> (u64, u64, u64) {
    match call(g, &GrantRequest::GetCounters { domain: None }) {
        GrantReply::Counters { counters: c, .. } => {
            (c.grants_active, c.maps_active, c.handles_in_use)
        }
        other => panic!("{other:?}"),
    }
}

/// A live handle in the model: (mapping domain, handle, granter).
type Live = (u32, MapHandle, u32);

/// A grant the server accepted: (granter, reference, grantee).
type Granted = (u32, u32, u32);

fn random_request(r: &mut Rng, handles: &[Live], granted: &[Granted]) -> GrantRequest {
    let d = DomainId(1 + r.below(u64::from(DOMS) + 1) as u32);
    let p = DomainId(1 + r.below(u64::from(DOMS) + 1) as u32);
    let gref = GrantRef(if r.below(8) == 0 {
        r.next_u64() as u32
    } else {
        r.below(12) as u32
    });
    // Mostly name a grant that exists (else maps almost never succeed).
    let known = granted
        .get(r.below(granted.len() as u64 + 1) as usize)
        .copied();
    match r.below(40) {
        0 => GrantRequest::DestroyDomain { domain: d },
        5..=14 if known.is_some() && r.below(5) != 0 => {
            let (g, gref, to) = known.unwrap_or_default();
            GrantRequest::Map {
                domain: DomainId(to),
                granter: DomainId(g),
                gref: GrantRef(gref),
                gfn: Gfn(0x100 + r.below(20)),
                writable: r.chance(50),
            }
        }
        38 | 39 if known.is_some() => {
            let (g, gref, _) = known.unwrap_or_default();
            GrantRequest::EndAccess {
                domain: DomainId(g),
                gref: GrantRef(gref),
            }
        }
        1..=2 => GrantRequest::CreateDomain {
            domain: d,
            memory: memory_of(d.0),
        },
        3..=8 => GrantRequest::Grant {
            domain: d,
            gref,
            grantee: p,
            gfn: Gfn(r.below(FRAMES + 2)),
            readonly: r.chance(50),
        },
        9 => GrantRequest::EndAccess { domain: d, gref },
        10..=14 => GrantRequest::Map {
            domain: d,
            granter: p,
            gref,
            gfn: Gfn(0x100 + r.below(20)),
            writable: r.chance(50),
        },
        15..=30 => {
            let mut hs = heapless::Vec::<MapHandle, MAX_UNMAP_BATCH>::new();
            for _ in 0..r.below(6) {
                let pick = r.below(handles.len() as u64 + 1) as usize;
                let h = match handles.get(pick) {
                    Some(&(_, h, _)) if r.below(4) != 0 => h,
                    _ => MapHandle(r.next_u64() as u32),
                };
                let _ = hs.push(h);
            }
            GrantRequest::Unmap {
                domain: d,
                handles: hs,
            }
        }
        _ => GrantRequest::Copy {
            domain: d,
            granter: p,
            gref,
            offset: r.below(4200) as u16,
            local: Gpa(r.below((FRAMES + 2) * 4096)),
            len: r.below(300) as u16,
            direction: if r.chance(50) {
                CopyDirection::FromGrant
            } else {
                CopyDirection::ToGrant
            },
        },
    }
}

/// Checks an unmap reply against the model and updates it.
fn check_unmap(
    step: usize,
    domain: DomainId,
    hs: &[MapHandle],
    reply: &GrantReply,
    handles: &mut Vec<Live>,
) -> u64 {
    let GrantReply::Unmapped { status, .. } = reply else {
        assert!(
            !handles.iter().any(|(d, ..)| *d == domain.0),
            "step {step}: {reply:?}"
        );
        return 0; // an unknown caller gets an error
    };
    assert_eq!(status.len(), hs.len(), "step {step}");
    let mut ok = 0;
    for (h, s) in hs.iter().zip(status.iter()) {
        let live = handles.iter().any(|x| (x.0, x.1) == (domain.0, *h));
        assert_eq!(s.is_ok(), live, "step {step}: {h:?} -> {s:?}");
        handles.retain(|x| (x.0, x.1) != (domain.0, *h));
        ok += u64::from(live);
    }
    ok
}

/// Runs `steps` random requests; with `mutate`, one in twelve has a bit
/// flipped and only the levels' consistency is checked. Returns (maps,
/// unmaps) that succeeded.
fn fuzz_one(
    mmu: &dyn MmuServer,
    grant: &dyn GrantServer,
    seed: u64,
    steps: usize,
    mutate: bool,
) -> (u64, u64) {
    let mut r = Rng::new(seed);
    let mut handles: Vec<Live> = Vec::new();
    let mut granted: Vec<Granted> = Vec::new();
    let mut ids: Vec<u32> = (1..=DOMS + 1).collect();
    let trusted = !mutate;
    let (mut maps, mut unmaps) = (0, 0);
    for step in 0..steps {
        let req = random_request(&mut r, &handles, &granted);
        let mut buf = [0u8; MAX_MESSAGE];
        let n = encode(&req, &mut buf).unwrap();
        let mut bytes = buf[..n].to_vec();
        let mutated = mutate && r.below(12) == 0;
        if mutated {
            let i = r.below(bytes.len() as u64) as usize;
            bytes[i] ^= 1 << r.below(8);
        }
        // The kernel's part: the MMU server learns of a domain before the
        // grant server, and forgets it after.
        if let (false, GrantRequest::CreateDomain { domain, memory }) = (mutated, &req) {
            let _ = mmu.create_domain(*domain, memory);
        }
        let reply = send(grant, &bytes);
        // Remember every domain the bytes may have created (mutated ids too).
        if let Ok(GrantRequest::CreateDomain { domain, .. }) = decode::<GrantRequest>(&bytes) {
            ids.push(domain.0);
        }
        if !mutated {
            match (&req, &reply) {
                (
                    GrantRequest::Map {
                        domain, granter, ..
                    },
                    GrantReply::Mapped { handle, .. },
                ) => {
                    assert!(
                        !trusted || !handles.iter().any(|x| (x.0, x.1) == (domain.0, *handle)),
                        "step {step}: handle {handle:?} handed out twice"
                    );
                    handles.push((domain.0, *handle, granter.0));
                    maps += 1;
                }
                (
                    GrantRequest::Unmap {
                        domain,
                        handles: hs,
                    },
                    _,
                ) if trusted => {
                    unmaps += check_unmap(step, *domain, hs, &reply, &mut handles);
                }
                (
                    GrantRequest::Grant {
                        domain,
                        gref,
                        grantee,
                        ..
                    },
                    GrantReply::Done { .. },
                ) => granted.push((domain.0, gref.0, grantee.0)),
                (GrantRequest::EndAccess { domain, gref }, GrantReply::Done { .. }) => {
                    granted.retain(|x| (x.0, x.1) != (domain.0, gref.0));
                }
                (GrantRequest::DestroyDomain { domain }, GrantReply::Done { .. }) => {
                    granted.retain(|x| x.0 != domain.0);
                    let _ = mmu.destroy_domain(*domain);
                    // Its mappings and the mappings of its grants are gone.
                    handles.retain(|(d, _, g)| *d != domain.0 && *g != domain.0);
                }
                _ => {}
            }
        }
        let (_, pins, live) = levels(grant);
        assert_eq!(pins, live, "step {step}: pins and live handles differ");
        if trusted {
            assert_eq!(live, handles.len() as u64, "step {step}: live handles");
        }
    }
    // Tear down: every domain goes; nothing may be left anywhere.
    for &d in &ids {
        let _ = call(
            grant,
            &GrantRequest::DestroyDomain {
                domain: DomainId(d),
            },
        );
    }
    assert_eq!(levels(grant), (0, 0, 0), "seed {seed:#x}: left over");
    for d in 1..=DOMS + 1 {
        let r = mmu.destroy_domain(DomainId(d));
        assert!(
            matches!(
                r,
                MmuReply::Done { .. }
                    | MmuReply::Error {
                        reason: MmuError::UnknownDomain(_),
                        ..
                    }
            ),
            "seed {seed:#x}: the MMU server still holds domain {d}'s frames mapped: {r:?}"
        );
    }
    (maps, unmaps)
}

#[test]
fn random_grant_sequences_never_panic_and_leak_nothing() {
    for mmu_name in mmu_server::registry::NAMES {
        for name in registry::NAMES {
            let (mut maps, mut unmaps) = (0, 0);
            for seed in 0..8u64 {
                let mem = SimMem::new(4096, 3072..4096);
                let mmu = mmu_server::registry::create(mmu_name, &mem).unwrap();
                let port = DispatchPort(&*mmu);
                let grant = registry::create(name, &port).unwrap();
                let mutate = seed % 2 == 1;
                let (m, u) = fuzz_one(&*mmu, &*grant, 0x9e37_79b9 ^ (seed << 32) ^ 1, 2000, mutate);
                maps += m;
                unmaps += u;
            }
            // The sequences do real work, not just errors.
            assert!(
                maps > 100 && unmaps > 30,
                "{name} over {mmu_name}: {maps} maps, {unmaps} unmaps"
            );
        }
    }
}
