//! Integration tests of the labrelay crate against real servers (see scripts/services).
//! One test binary for the whole crate keeps link time down.

mod db;
mod mail;
mod queue;
mod ssh;
mod storage;
