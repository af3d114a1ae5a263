//! Tests of `delivery-upload`, run as a binary against the real servers of
//! scripts/services. One test binary for the crate keeps link time down.

// The whole crate is tests: a panic with the value is the clearest failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cli;
mod common;
mod concurrent_start;
mod crashloop;
mod deliver;
mod hardening;
mod listen;
mod resume;
