//! The ONE place that lists the MMU server implementations, by name. The
//! conformance suite, the benches and the kernel's `--mmu <name>` all take
//! the list from here.
//!
//! To add an implementation: add its name to [`NAMES`] and an arm to
//! [`create_with`].

use crate::fast::policy::{PerPcpuCopies, SharedRoots};
use crate::fast::{DirtyMode, FastServer};
use crate::reference::{self, Reference};
use crate::Config;
use abi::{MmuServer, PhysMem};
use alloc::boxed::Box;
use core::fmt;

/// Every registered implementation, in the order reports list them.
pub const NAMES: &[&str] = &[reference::NAME, FAST_SHARED, FAST_PERCPU, FAST_DBIT];

/// The fast server with one shared shadow root per guest L4.
pub const FAST_SHARED: &str = "fast-shared";
/// The fast server with per-pCPU copies of the shadow L4.
pub const FAST_PERCPU: &str = "fast-percpu";
/// The fast server with shared roots, logging dirty pages by harvesting the
/// hardware D bits of its shadow leaves ([`DirtyMode::DirtyBits`]) instead
/// of write protection: no exit per page written while logging.
pub const FAST_DBIT: &str = "fast-dbit";

/// The name asked for is not registered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownImpl<'n>(pub &'n str);

impl fmt::Display for UnknownImpl<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "no MMU implementation named {:?}; known: {:?}",
            self.0, NAMES
        )
    }
}

/// Creates the implementation `name` over `mem` with the default [`Config`].
pub fn create<'m, 'n>(
    name: &'n str,
    mem: &'m dyn PhysMem,
) -> Result<Box<dyn MmuServer + 'm>, UnknownImpl<'n>> {
    create_with(name, mem, Config::default())
}

/// Creates the implementation `name` over `mem` with `config`.
pub fn create_with<'m, 'n>(
    name: &'n str,
    mem: &'m dyn PhysMem,
    config: Config,
) -> Result<Box<dyn MmuServer + 'm>, UnknownImpl<'n>> {
    match name {
        reference::NAME => Ok(Box::new(Reference::new(mem, config))),
        FAST_SHARED => Ok(Box::new(FastServer::<SharedRoots>::new(
            FAST_SHARED,
            mem,
            config,
        ))),
        FAST_PERCPU => Ok(Box::new(FastServer::<PerPcpuCopies>::new(
            FAST_PERCPU,
            mem,
            config,
        ))),
        FAST_DBIT => Ok(Box::new(FastServer::<SharedRoots>::with_dirty_mode(
            FAST_DBIT,
            mem,
            config,
            DirtyMode::DirtyBits,
        ))),
        _ => Err(UnknownImpl(name)),
    }
}
