//! The ONE place that lists the scheduler policies, by name. The
//! conformance suite, the tests and the kernel's `sched=<name>` (the xtask's
//! `--sched`) all take the list from here.
//!
//! To add a policy: add its name to [`NAMES`] and an arm to [`create_with`].

use crate::credit::{self, Credit};
use crate::global_rr::{self, GlobalRr};
use crate::pinned::{self, Pinned};
use crate::server::Server;
use crate::Config;
use abi::SchedServer;
use alloc::boxed::Box;
use core::fmt;

/// Every registered policy, in the order reports list them.
pub const NAMES: &[&str] = &[pinned::NAME, global_rr::NAME, credit::NAME];

/// The name asked for is not registered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownPolicy<'n>(pub &'n str);

impl fmt::Display for UnknownPolicy<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "no scheduler policy named {:?}; known: {:?}",
            self.0, NAMES
        )
    }
}

/// Creates the policy `name` with the default [`Config`].
pub fn create(name: &str) -> Result<Box<dyn SchedServer>, UnknownPolicy<'_>> {
    create_with(name, Config::default())
}

/// Creates the policy `name` with `config`.
pub fn create_with(name: &str, config: Config) -> Result<Box<dyn SchedServer>, UnknownPolicy<'_>> {
    match name {
        pinned::NAME => Ok(Box::new(Server::new(Pinned, config))),
        global_rr::NAME => Ok(Box::new(Server::new(GlobalRr, config))),
        credit::NAME => Ok(Box::new(Server::new(Credit, config))),
        _ => Err(UnknownPolicy(name)),
    }
}

#[cfg(test)]
mod tests {
    use super::{create, UnknownPolicy, NAMES};

    #[test]
    fn every_name_creates_its_policy_and_unknown_names_are_refused() {
        for &name in NAMES {
            assert_eq!(create(name).map(|s| s.name()).ok(), Some(name));
        }
        let err = create("lottery").err();
        assert_eq!(err, Some(UnknownPolicy("lottery")));
        assert!(format!("{}", err.unwrap()).contains("credit"));
    }
}
