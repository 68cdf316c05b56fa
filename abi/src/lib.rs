//! Umbra's wire: message types, address newtypes and postcard encoding shared
//! by the kernel and every server. (Filled by the MMU protocol issue.)
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]
