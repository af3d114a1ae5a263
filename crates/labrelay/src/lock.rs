//! Single-instance locks: at most one copy of a tool (or of one tool's job) runs at a
//! time, which cron needs when a run can outlast its interval.
//!
//! The lock is an advisory `flock` on `<data_dir>/locks/<name>.lock`, held for the life
//! of the [`InstanceLock`]. The kernel releases it when the process dies, so a crash
//! never leaves a stale lock behind; the PID written into the file is only there to tell
//! the user who holds it.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use crate::exit::Exit;

/// Lock errors.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds the lock (exit 75: cron may simply try again next time).
    #[error("another {name} is already running (pid {pid}, lock {path})")]
    Held {
        /// Lock name.
        name: String,
        /// PID written by the holder, or `unknown`.
        pid: String,
        /// Lock file.
        path: PathBuf,
    },
    /// The lock file could not be created.
    #[error("cannot create lock file {path}: {source}")]
    Io {
        /// Lock file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

impl LockError {
    /// Held → 75, I/O → 1.
    pub fn exit(&self) -> Exit {
        match self {
            LockError::Held { .. } => Exit::TempFail,
            LockError::Io { .. } => Exit::Failed,
        }
    }
}

/// A held single-instance lock; dropping it releases the lock.
#[derive(Debug)]
pub struct InstanceLock {
    file: File,
    path: PathBuf,
}

impl InstanceLock {
    /// Take the lock `name` in `data_dir`, or fail at once naming the holder's PID.
    pub fn acquire(data_dir: &Path, name: &str) -> Result<InstanceLock, LockError> {
        let dir = data_dir.join("locks");
        let path = dir.join(format!("{name}.lock"));
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(io)?;
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let pid = pid.trim();
                return Err(LockError::Held {
                    name: name.to_owned(),
                    pid: if pid.is_empty() {
                        "unknown".into()
                    } else {
                        pid.to_owned()
                    },
                    path,
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        file.flush().map_err(io)?;
        Ok(InstanceLock { file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for InstanceLock {
    fn drop(&mut self) {
        // Clear the PID so a later reader does not blame a finished process; the lock
        // itself is released when the file is closed.
        let _ = self.file.set_len(0);
        let _ = self.file.unlock();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_refused_with_pid_and_exit_75() {
        let dir = tempfile::tempdir().unwrap();
        let first = InstanceLock::acquire(dir.path(), "mail-query").unwrap();
        let err = InstanceLock::acquire(dir.path(), "mail-query").unwrap_err();
        assert_eq!(err.exit(), Exit::TempFail);
        let msg = err.to_string();
        assert!(msg.contains(&std::process::id().to_string()), "{msg}");
        assert!(msg.contains("mail-query"), "{msg}");
        // A different name is a different lock.
        let _other = InstanceLock::acquire(dir.path(), "job-worker").unwrap();
        drop(first);
        let _again = InstanceLock::acquire(dir.path(), "mail-query").unwrap();
    }
}

impl crate::exit::ExitClass for LockError {
    fn exit_class(&self) -> Exit {
        self.exit()
    }
}
crate::exit_class!(LockError);
