//! Message queues (placeholder until the queue module lands).
use crate::exit::Exit;

/// Queue errors.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The broker could not be reached.
    #[error("cannot reach the queue broker at {url}: {message}")]
    Connect {
        /// Redacted URL.
        url: String,
        /// Why.
        message: String,
    },
}

impl QueueError {
    /// Exit status.
    pub fn exit(&self) -> Exit {
        Exit::TempFail
    }
}
