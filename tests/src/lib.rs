//! The MMU protocol conformance suite. (Filled by the MMU protocol issue.)
#![cfg_attr(not(test), no_std)]
