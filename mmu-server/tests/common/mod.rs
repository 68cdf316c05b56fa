//! Helpers shared by the mmu-server integration tests: one simulated
//! machine layout and the wire round trip.
#![allow(dead_code)] // each test binary uses its own subset

use abi::mmu::MemRegion;
use abi::MAX_MESSAGE;
use abi::{decode, dispatch, encode, Gfn, MemoryMap, Mfn, MmuReply, MmuRequest, MmuServer};
use mmu_server::sim::SimMem;

/// Host frames 0..4096: guest frames 0..1024 at host 1024..2048, shadow
/// pool 3072..4096; the rest of host memory is outside the guest.
pub fn memory() -> (SimMem, MemoryMap) {
    let mem = SimMem::new(4096, 3072..4096);
    let mut map = MemoryMap::new();
    map.push(MemRegion {
        gfn: Gfn(0),
        mfn: Mfn(1024),
        pages: 1024,
    })
    .unwrap();
    (mem, map)
}

/// Sends a request through the wire and decodes the reply.
pub fn send(s: &dyn MmuServer, req: MmuRequest) -> MmuReply {
    let mut buf = [0u8; MAX_MESSAGE];
    let n = encode(&req, &mut buf).unwrap();
    let mut out = [0u8; MAX_MESSAGE];
    let m = dispatch(s, &buf[..n], &mut out);
    decode(&out[..m]).unwrap()
}
