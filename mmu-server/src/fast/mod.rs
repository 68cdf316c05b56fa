//! The fast MMU server: cached shadows with rmaps, zap generations, a
//! lockless fast page fault and a swappable shadow-L4 policy.
//!
//! (Design notes and invariants are filled in as the server lands.)

pub mod lockless;
