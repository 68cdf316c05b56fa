//! The ONE place that lists the grant server implementations, by name. The
//! grant conformance suite and the kernel's `--grant <name>` take the list
//! from here.
//!
//! To add an implementation: add its name to [`NAMES`] and an arm to
//! [`create_with`].

use crate::policy::{AccessedHint, AlwaysFlush, FlushPolicy};
use crate::port::MmuPort;
use crate::table::{Config, GrantTable};
use abi::GrantServer;
use alloc::boxed::Box;
use core::fmt;

/// Every registered implementation, in the order reports list them.
pub const NAMES: &[&str] = &[ALWAYS_FLUSH, ACCESSED_HINT];

/// One flush of the dirty mask per unmap batch (Xen upstream).
pub const ALWAYS_FLUSH: &str = AlwaysFlush::NAME;
/// No flush for a batch whose frames were never accessed.
pub const ACCESSED_HINT: &str = AccessedHint::NAME;

/// The name asked for is not registered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownImpl<'n>(pub &'n str);

impl fmt::Display for UnknownImpl<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "no grant server implementation named {:?}; known: {:?}",
            self.0, NAMES
        )
    }
}

/// Creates the implementation `name` talking to the MMU server through
/// `port`, with the default [`Config`].
pub fn create<'p, 'n>(
    name: &'n str,
    port: &'p dyn MmuPort,
) -> Result<Box<dyn GrantServer + 'p>, UnknownImpl<'n>> {
    create_with(name, port, Config::default())
}

/// Creates the implementation `name` with `config`.
pub fn create_with<'p, 'n>(
    name: &'n str,
    port: &'p dyn MmuPort,
    config: Config,
) -> Result<Box<dyn GrantServer + 'p>, UnknownImpl<'n>> {
    match name {
        ALWAYS_FLUSH => Ok(Box::new(GrantTable::<AlwaysFlush>::new(port, config))),
        ACCESSED_HINT => Ok(Box::new(GrantTable::<AccessedHint>::new(port, config))),
        _ => Err(UnknownImpl(name)),
    }
}
