//! Random (mostly valid, often hostile) request streams through `dispatch`
//! into the reference server: ids from a small space so requests hit live
//! objects, guest tables built and wrecked through `EmulatedWrite`, memory
//! maps that overlap or name frames that do not exist. Nothing may panic,
//! every reply must decode, and once every domain is destroyed no shadow
//! frame may be left allocated.

use abi::mmu::MemoryMap;
use abi::*;
use mmu_server::registry;
use mmu_server::sim::SimMem;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const FRAMES: u64 = 2048;
const POOL: std::ops::Range<u64> = 1024..2048;

fn request(r: &mut Rng) -> MmuRequest {
    let d = DomainId(r.below(3) as u32);
    let v = VcpuId(if r.below(2) == 0 {
        0
    } else {
        r.below(6) as u32
    });
    let p = PcpuId(if r.below(50) == 0 {
        64 + r.below(8) as u32
    } else {
        r.below(8) as u32
    });
    // Addresses near the few the guest tables use.
    let gva = Gva(match r.below(4) {
        0 => r.below(64) << 12,
        1 => (r.below(4) << 39) | (r.below(4) << 30) | (r.below(4) << 21) | (r.below(8) << 12),
        2 => 0xffff_8000_0000_0000 | (r.below(64) << 12),
        _ => r.next(),
    });
    match r.below(20) {
        0 => {
            let mut memory = MemoryMap::new();
            for _ in 0..1 + r.below(3) {
                // Guest frames come from 0..1024 (outside the pool) unless
                // the map is deliberately bad (and then refused or harmless).
                let (gfn, mfn, pages) = match r.below(6) {
                    0 => (r.below(1 << 20), r.below(1 << 40), r.below(1 << 30)),
                    1 => (r.below(64), 4000 + r.below(100), 1 + r.below(64)),
                    2 => (r.below(4) * 256, r.below(4) * 256, 1 + r.below(256)),
                    _ => (0, u64::from(d.0) * 256, 256),
                };
                let _ = memory.push(MemRegion {
                    gfn: Gfn(gfn),
                    mfn: Mfn(mfn),
                    pages,
                });
            }
            MmuRequest::CreateDomain { domain: d, memory }
        }
        1 if r.below(8) == 0 => MmuRequest::DestroyDomain { domain: d },
        2 => MmuRequest::CreateVcpu { domain: d, vcpu: v },
        3 => MmuRequest::VcpuScheduled { vcpu: v, pcpu: p },
        4 => MmuRequest::VcpuDescheduled { vcpu: v, pcpu: p },
        5..=7 => MmuRequest::PageFault {
            vcpu: v,
            pcpu: p,
            gva,
            error_code: PfErrorCode(r.next() as u32 & 0x1f),
        },
        8 => MmuRequest::WriteCr3 {
            vcpu: v,
            pcpu: p,
            cr3: GuestCr3(if r.below(4) == 0 { r.below(8) << 12 } else { 0 }),
        },
        9 => MmuRequest::SetPagingMode {
            vcpu: v,
            pcpu: p,
            mode: PagingMode(if r.below(8) == 0 {
                r.next() as u32 & 0x7f
            } else {
                r.next() as u32 & 3
            }),
        },
        10 => MmuRequest::Invlpg {
            vcpu: v,
            pcpu: p,
            gva,
        },
        11..=15 => {
            // The guest writes its tables: entries pointing at low frames.
            let value = match r.below(3) {
                0 => (r.below(16) << 12) | (r.next() & 0x8000_0000_0000_01ff),
                1 => r.next(),
                _ => (r.below(16) << 12) | 0x67,
            };
            MmuRequest::EmulatedWrite {
                vcpu: v,
                pcpu: p,
                gpa: Gpa((if r.below(128) == 0 {
                    r.below(4)
                } else {
                    4 + r.below(12)
                } << 12)
                    | (if r.below(4) == 0 {
                        r.below(512)
                    } else {
                        r.below(4)
                    } << 3)
                    | if r.below(8) == 0 { r.below(8) } else { 0 }),
                value,
                size: [8, 8, 8, 8, 8, 1, 2, 4, 3, 16][r.below(10) as usize],
            }
        }
        16 => MmuRequest::EnableDirtyLog { domain: d },
        17 => MmuRequest::DisableDirtyLog { domain: d },
        18 => MmuRequest::GetAndClearDirty {
            domain: d,
            start: Gfn(r.below(2) * r.next()),
        },
        _ => MmuRequest::ZapAll { domain: d },
    }
}

#[test]
fn hostile_request_streams_never_panic_or_leak() {
    let mut kinds = std::collections::BTreeMap::<&'static str, u64>::new();
    for seed in 1..=4u64 {
        let mem = SimMem::new(FRAMES, POOL);
        if seed == 4 {
            mem.set_frame_limit(24); // a tiny pool: exhaustion paths
        }
        let s = registry::create("reference", &mem).unwrap();
        let mut r = Rng(seed.wrapping_mul(0x2545_f491_4f6c_dd1d));
        let mut buf = [0u8; MAX_MESSAGE];
        let mut out = [0u8; MAX_MESSAGE];
        // A sane start: domain 0 with tables at gfn 0..3 mapping gva 0..64
        // pages (PML4 gfn 0 -> PDPT 1 -> PD 2 -> PT 3 -> data 16..80).
        let mut memory = MemoryMap::new();
        memory
            .push(MemRegion {
                gfn: Gfn(0),
                mfn: Mfn(0),
                pages: 256,
            })
            .unwrap();
        let mut prelude = vec![
            MmuRequest::CreateDomain {
                domain: DomainId(0),
                memory,
            },
            MmuRequest::CreateVcpu {
                domain: DomainId(0),
                vcpu: VcpuId(0),
            },
            MmuRequest::VcpuScheduled {
                vcpu: VcpuId(0),
                pcpu: PcpuId(0),
            },
        ];
        let ew = |gpa: u64, value: u64| MmuRequest::EmulatedWrite {
            vcpu: VcpuId(0),
            pcpu: PcpuId(0),
            gpa: Gpa(gpa),
            value,
            size: 8,
        };
        prelude.extend([ew(0, 0x1007), ew(0x1000, 0x2007), ew(0x2000, 0x3007)]);
        prelude.extend((0..64).map(|i| ew(0x3000 + 8 * i, ((16 + i) << 12) | 7)));
        let mut prelude = prelude.into_iter();
        for _ in 0..10_000 {
            let req = prelude.next().unwrap_or_else(|| request(&mut r));
            let n = encode(&req, &mut buf).unwrap();
            let m = dispatch(&*s, &buf[..n], &mut out);
            let reply: MmuReply = decode(&out[..m]).expect("reply decodes");
            let kind = match reply {
                MmuReply::Error { .. } => "error",
                MmuReply::Resume { .. } => "resume",
                MmuReply::InjectPageFault { .. } => "inject",
                MmuReply::LoadShadowRoot { .. } => "root",
                _ => "other",
            };
            *kinds.entry(kind).or_default() += 1;
        }
        for v in 0..6 {
            for p in 0..8 {
                s.vcpu_descheduled(VcpuId(v), PcpuId(p));
            }
        }
        for d in 0..3 {
            s.destroy_domain(DomainId(d));
        }
        assert_eq!(mem.frames_in_use(), 0, "seed {seed}: shadow frames leaked");
    }
    for k in ["error", "resume", "inject", "root"] {
        assert!(
            kinds.get(k).copied().unwrap_or(0) > 100,
            "too few {k}: {kinds:?}"
        );
    }
}
