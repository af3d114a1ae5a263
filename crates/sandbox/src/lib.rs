//! The labrelay sandbox: run a submitted program in a fresh box and report what became
//! of it with Judge0's statuses. Usable without a queue or a database
//! (`code-submit exec`); the job platform runs code jobs through it.
//!
//! Each box: new user, mount, PID, IPC, UTS, cgroup and network namespaces (built by
//! system calls of our own between clone and exec by default, `[sandbox] launcher =
//! "bwrap"` for bubblewrap), no capabilities, NO_NEW_PRIVS, a seccomp filter
//! ([`seccomp`]), an unprivileged uid/gid, the toolchain read-only, a size- and
//! inode-limited tmpfs as the only writable place, a fixed environment; limits and
//! accounting by cgroups ([`cgroup`]).

pub mod cgroup;
pub mod config;
mod exec;
mod launch;
pub mod seccomp;

pub use config::{Language, Limits, SandboxConfig, Settings};
pub use exec::{Report, Request, Sandbox, Status, read_all, same_output};

/// Put this process in a mount namespace of its own whose mounts do not propagate to the
/// host (host mounts still propagate in): the boxes' tmpfs mounts then vanish with the
/// process however it ends, a kill -9 included. Call it first thing in `main`, while the
/// process has one thread; without root it does nothing (and boxes cannot be built).
pub fn private_mounts() {
    if !rustix::process::geteuid().is_root() {
        return;
    }
    // SAFETY: called at the start of main, before any thread exists, so the whole
    // process (one thread) moves to the new namespace.
    #[allow(unsafe_code)]
    let r = unsafe { libc::unshare(libc::CLONE_NEWNS) };
    if r != 0 {
        return;
    }
    let _ = rustix::mount::mount_change(
        "/",
        rustix::mount::MountPropagationFlags::DOWNSTREAM
            | rustix::mount::MountPropagationFlags::REC,
    );
}
