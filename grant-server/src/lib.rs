//! Grant server: grant tables between domains (grant, map, batched unmap,
//! copy) returning TLB flush hints from the Accessed bit of the entry the
//! hardware walked.
//!
//! Not built yet: this crate holds no code until the grant-table issue fills
//! it. Nothing in the image calls it.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]
