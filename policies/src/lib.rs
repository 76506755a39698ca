//! Homing's policy engine: per-network policy files, network matching, budget
//! periods, ledger arithmetic and release decisions.
//!
//! This crate is pure: no IO, no clock of its own (time is a parameter). It is
//! filled by the daemon issue; until then it has no items, and nothing in Homing
//! consults it. The example policies it will ship live in `policies/examples/`.
