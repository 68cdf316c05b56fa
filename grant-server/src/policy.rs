//! Flush policies: when an unmap batch needs a TLB flush.

/// Decides whether an unmap batch (or a revocation) owes a flush of the
/// mapping domain's dirty mask.
pub trait FlushPolicy: Send + Sync + 'static {
    /// The registry name of the grant server using this policy.
    const NAME: &'static str;
    /// Whether a batch that unmapped at least one frame needs a flush;
    /// `accessed`: whether any shadow entry of those frames had A set.
    fn needs_flush(accessed: bool) -> bool;
}

/// Xen upstream: every batch flushes (grant entries are made with A and D
/// set, so the hardware's A bit tells nothing).
pub struct AlwaysFlush;

impl FlushPolicy for AlwaysFlush {
    const NAME: &'static str = "always-flush";
    fn needs_flush(_accessed: bool) -> bool {
        true
    }
}

/// Accessed-bit flush hints: entries are made with A clear and the CPU sets
/// A before it caches a translation, so a batch none of whose entries was
/// accessed cannot be cached anywhere and needs no flush.
pub struct AccessedHint;

impl FlushPolicy for AccessedHint {
    const NAME: &'static str = "accessed-hint";
    fn needs_flush(accessed: bool) -> bool {
        accessed
    }
}
