//! Homing's policy engine: per-network policy files, network matching, budget
//! periods, ledger arithmetic and release decisions.
//!
//! This crate is pure: no IO, no clock of its own (time is a parameter; the
//! time-zone database is compiled in). The daemon reads the files, watches the
//! network, persists the ledger and asks [`decide`] what may go.
//!
//! - [`Policy`] — one network's policy, parsed from TOML with `file:line:column`
//!   errors ([`PolicyError`]); every key is documented in `policies/README.md`;
//! - [`PolicySet`] — the policies of a directory, checked together, and which one
//!   applies to what is observed of the link ([`Observation`]);
//! - [`Ledger`] — quarter-hour buckets of what went over a link, reservations
//!   that never pass the cap, billing periods in the policy's time zone;
//! - [`decide`] — what may go now, how fast, how much, and why.
//!
//! Examples of policies ship in `policies/examples/`.

mod decide;
mod error;
mod ledger;
mod matching;
mod policy;
mod size;

pub use decide::{Decision, Queue, decide};
pub use error::PolicyError;
pub use ledger::{BUCKET, Ledger, Span, Tally};
pub use matching::{Observation, PolicySet, Selection, specificity};
pub use policy::{
    Budget, Class, Link, LinkKind, Match, PeriodKind, Policy, Prefix, Rate, TCP_OVERHEAD,
    TCP_PAYLOAD, Window,
};
pub use size::parse_size;
