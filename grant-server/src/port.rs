//! The narrow way from the grant server to the MMU server: send one
//! `MmuRequest`, get its `MmuReply`.

use abi::mmu::{MmuError, MmuReply, MmuRequest, MmuServer};
use abi::{DecodeError, MAX_MESSAGE};

/// Sends MMU requests on the grant server's behalf. In the image the kernel
/// implements it with its IPC door to the MMU server's task; on the host
/// [`DispatchPort`] encodes, dispatches and decodes.
///
/// The port does **not** carry out the reply's flush obligation: the grant
/// server merges it into its own reply, whose flush the kernel carries out.
pub trait MmuPort: Send + Sync {
    /// Sends `request` and returns the reply.
    fn call(&self, request: &MmuRequest) -> MmuReply;
}

/// A port to an MMU server in the same address space, through the bytes of
/// the wire (`abi::dispatch`), as a separate task would see it.
pub struct DispatchPort<'s>(pub &'s dyn MmuServer);

impl MmuPort for DispatchPort<'_> {
    fn call(&self, request: &MmuRequest) -> MmuReply {
        let mut req = [0u8; MAX_MESSAGE];
        let n = match abi::encode(request, &mut req) {
            Ok(n) => n,
            Err(_) => {
                return MmuReply::error(MmuError::Malformed(DecodeError::TooLong(
                    MAX_MESSAGE as u32,
                )))
            }
        };
        let mut out = [0u8; MAX_MESSAGE];
        let m = abi::dispatch(self.0, &req[..n], &mut out);
        match abi::decode::<MmuReply>(&out[..m]) {
            Ok(r) => r,
            Err(e) => MmuReply::error(MmuError::Malformed(e)),
        }
    }
}
