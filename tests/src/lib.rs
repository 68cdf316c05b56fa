//! The MMU protocol conformance suite: a black-box judge of any MMU server.
//!
//! The suite plays the kernel and the hardware ([`machine`]) around a server
//! it reaches only through encoded messages, owns the memory the server runs
//! on ([`ram`]), and after every step checks what any pCPU could use against
//! an independent x86-64 page walker ([`arch`]) over the guest's tables,
//! past and present ([`history`]), with a TLB model per pCPU ([`tlb`]).
//!
//! Everything here is `no_std` + `alloc`, so the kernel runs the same
//! scripted scenarios in the image over real frames: see [`run_scenario`].
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod arch;
pub mod history;
pub mod machine;
pub mod ram;
pub mod tlb;
