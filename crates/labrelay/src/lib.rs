//! labrelay: the library every labrelay tool is built on.
//!
//! It owns what two tools would otherwise each write: command-line glue and exit codes
//! ([`cli`], [`exit`], [`output`], [`logging`]), configuration and secrets ([`config`],
//! [`secret`], [`env`]), and the clients for the systems a facility's back office talks
//! to: databases ([`db`]), mail ([`mail`]), message queues ([`queue`]), delivery storage
//! ([`storage`]) and SSH ([`ssh`]), plus single-instance locks ([`lock`]) and rest hours
//! ([`schedule`]). Tool-specific behaviour never lives here.
#![deny(missing_docs)]

pub mod cli;
pub mod config;
pub mod db;
pub mod env;
pub mod exit;
pub mod hash;
pub mod lock;
pub mod logging;
pub mod mail;
pub mod output;
pub mod queue;
pub mod retry;
pub mod schedule;
pub mod secret;
pub mod sign;
pub mod ssh;
pub mod storage;

pub use exit::Exit;
