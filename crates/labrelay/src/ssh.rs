//! SSH (placeholder until the ssh module lands).
use crate::exit::Exit;

/// SSH errors.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    /// The server could not be reached.
    #[error("cannot connect to {server}: {message}")]
    Connect {
        /// host:port.
        server: String,
        /// Why.
        message: String,
    },
}

impl SshError {
    /// Exit status.
    pub fn exit(&self) -> Exit {
        Exit::TempFail
    }
}
