//! Scheduler policy: which vCPU runs on which pCPU and for how long.
//!
//! Not built yet: this crate holds no code until the scheduling issue fills
//! it. Nothing in the image calls it.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]
