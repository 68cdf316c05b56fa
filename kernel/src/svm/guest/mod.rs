//! The guest kernels: code in the kernel image that runs inside guests from
//! each guest's private copy of the image (see `domain`), plus the layout
//! and boot structures the loader and the guests agree on.

pub mod layout;
pub mod rt;
pub mod work;
