//! Integration tests of the labrelay crate against real servers (see scripts/services).
//! One test binary for the whole crate keeps link time down.

// The whole crate is tests: a panic with the value is the clearest failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod db;
mod mail;
mod queue;
mod secrets;
mod ssh;
mod storage;
mod tls;
