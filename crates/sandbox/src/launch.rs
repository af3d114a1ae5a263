//! The direct launcher: a box built with system calls between fork and exec, without
//! bubblewrap, so a run costs what the kernel charges and little more.
//!
//! The host prepares everything first ([`Plan`]: every path, argument and environment
//! string as a C string, the seccomp program, the rlimits), then clones one process
//! into new mount, PID, IPC, UTS and network namespaces. That process, PID 1 of the box
//! ("init"), enters the box's cgroups and a cgroup namespace, builds a new root on a
//! small tmpfs (the toolchain and a few /etc files bound read-only, the shared
//! read-only /dev, a new /proc, the box's tmpfs at /box), pivots into it, makes it
//! read-only, brings the loopback interface up, and forks the program. The program
//! starts a session, drops to the box user on the host, creates a user namespace that
//! maps only that user, drops every capability, sets NO_NEW_PRIVS, loads the seccomp
//! filter and execs. Init stays as the box's reaper and, when the program ends, writes
//! its wait status to the report pipe and exits, which kills whatever else the box
//! still holds (the PID namespace ends with its init).
//!
//! Between the clone and exec only plain system calls run on memory prepared before
//! the clone: nothing allocates, takes a lock or calls a C library function that keeps
//! state (credentials change through raw system calls, not the C library's wrappers,
//! which would try to signal the host's other threads). A failure at any step writes the
//! step and `errno` to the report pipe and ends the box: the host reports an Internal
//! Error; nothing runs outside the box.
#![allow(unsafe_code)] // the exception documented in docs/contributing.md

use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd as _, OwnedFd, RawFd};
use std::path::Path;

/// One step of building the new root, relative to it.
#[derive(Debug)]
enum Op {
    Mkdir(CString),
    /// An empty file to bind a file on.
    Touch(CString),
    Symlink {
        target: CString,
        link: CString,
    },
    /// A recursive bind, then made read-only, nosuid, nodev with every mount below it.
    BindRo {
        src: CString,
        dst: CString,
    },
    /// A plain bind (the box: writable; /dev: read-only already).
    Bind {
        src: CString,
        dst: CString,
    },
    Proc(CString),
}

/// Fixed steps, numbered after the ops in error reports.
#[derive(Debug, Clone, Copy)]
#[repr(u16)]
enum Fixed {
    Cgroup = 0xf000,
    CgroupNs,
    Fds,
    Rlimit,
    Private,
    RootTmpfs,
    Chdir,
    Pivot,
    RootRo,
    Hostname,
    Loopback,
    Fork,
    Workdir,
    Session,
    Creds,
    UserNs,
    Maps,
    Caps,
    NoNewPrivs,
    Seccomp,
    Exec,
}

impl Fixed {
    const ALL: [Fixed; 21] = [
        Fixed::Cgroup,
        Fixed::CgroupNs,
        Fixed::Fds,
        Fixed::Rlimit,
        Fixed::Private,
        Fixed::RootTmpfs,
        Fixed::Chdir,
        Fixed::Pivot,
        Fixed::RootRo,
        Fixed::Hostname,
        Fixed::Loopback,
        Fixed::Fork,
        Fixed::Workdir,
        Fixed::Session,
        Fixed::Creds,
        Fixed::UserNs,
        Fixed::Maps,
        Fixed::Caps,
        Fixed::NoNewPrivs,
        Fixed::Seccomp,
        Fixed::Exec,
    ];

    fn what(self) -> &'static str {
        match self {
            Fixed::Cgroup => "entering the box's cgroups",
            Fixed::CgroupNs => "a cgroup namespace",
            Fixed::Fds => "arranging descriptors",
            Fixed::Rlimit => "setting rlimits",
            Fixed::Private => "making the mounts private",
            Fixed::RootTmpfs => "mounting the new root",
            Fixed::Chdir => "entering the new root",
            Fixed::Pivot => "pivot_root",
            Fixed::RootRo => "making the root read-only",
            Fixed::Hostname => "setting the host name",
            Fixed::Loopback => "bringing up the loopback interface",
            Fixed::Fork => "forking the program",
            Fixed::Workdir => "entering /box",
            Fixed::Session => "a new session",
            Fixed::Creds => "dropping to the box user",
            Fixed::UserNs => "a user namespace",
            Fixed::Maps => "writing the user namespace's maps",
            Fixed::Caps => "dropping capabilities",
            Fixed::NoNewPrivs => "NO_NEW_PRIVS",
            Fixed::Seccomp => "loading the seccomp filter",
            Fixed::Exec => "exec",
        }
    }
}

/// Everything the box needs, prepared before the clone.
#[derive(Debug)]
pub(crate) struct Plan {
    /// An empty host directory the new root is mounted on (in the box's namespace only).
    root: CString,
    ops: Vec<Op>,
    uid: u32,
    gid: u32,
    uid_map: CString,
    gid_map: CString,
    /// Paths to try for the program, in order (a `/` in its name: that path only).
    candidates: Vec<CString>,
    argv: Vec<CString>,
    envp: Vec<CString>,
    filter: Vec<libc::sock_filter>,
    rlimits: Vec<(libc::__rlimit_resource_t, libc::rlimit)>,
}

/// What a box needs besides the plan: its settings.
pub(crate) struct Spec<'a> {
    pub root: &'a Path,
    pub dev: &'a Path,
    pub box_dir: &'a Path,
    pub binds: Vec<&'a Path>,
    pub uid: u32,
    pub gid: u32,
    pub path: &'a str,
    pub env: Vec<(String, String)>,
    pub argv: &'a [String],
    pub seccomp: &'a [u8],
    pub rlimits: Vec<(libc::__rlimit_resource_t, u64, u64)>,
}

fn cstr(s: impl AsRef<std::ffi::OsStr>) -> Result<CString, String> {
    use std::os::unix::ffi::OsStrExt as _;
    let s = s.as_ref();
    CString::new(s.as_bytes()).map_err(|_| format!("{}: a NUL byte", s.to_string_lossy()))
}

/// `path` without its leading `/`, as the new root's relative path.
fn rel(path: &Path) -> Result<CString, String> {
    let s = path.to_string_lossy();
    let r = s.trim_start_matches('/');
    if r.is_empty() || !path.is_absolute() || r.split('/').any(|c| c == ".." || c == ".") {
        return Err(format!("{s}: not a plain absolute path"));
    }
    cstr(r)
}

impl Plan {
    pub(crate) fn new(spec: &Spec<'_>) -> Result<Plan, String> {
        let mut ops = Vec::new();
        let mut made: Vec<String> = Vec::new();
        let mut mkdir_p = |ops: &mut Vec<Op>, dir: &str| -> Result<(), String> {
            let mut cur = String::new();
            for c in dir.split('/').filter(|c| !c.is_empty()) {
                if !cur.is_empty() {
                    cur.push('/');
                }
                cur.push_str(c);
                if !made.contains(&cur) {
                    made.push(cur.clone());
                    ops.push(Op::Mkdir(cstr(&cur)?));
                }
            }
            Ok(())
        };
        let mut bind_ro = |ops: &mut Vec<Op>, host: &Path| -> Result<(), String> {
            // The source is followed (as mount(2) does); the mount point is made to match.
            let Ok(meta) = std::fs::metadata(host) else {
                return Ok(());
            };
            let r = rel(host)?;
            let rs = r.to_string_lossy().into_owned();
            if meta.is_dir() {
                mkdir_p(ops, &rs)?;
            } else {
                if let Some((parent, _)) = rs.rsplit_once('/') {
                    mkdir_p(ops, parent)?;
                }
                ops.push(Op::Touch(r.clone()));
            }
            ops.push(Op::BindRo {
                src: cstr(host)?,
                dst: r,
            });
            Ok(())
        };
        bind_ro(&mut ops, Path::new("/usr"))?;
        for top in ["bin", "sbin", "lib", "lib64", "lib32", "libx32"] {
            let host = Path::new("/").join(top);
            match std::fs::read_link(&host) {
                Ok(target) => ops.push(Op::Symlink {
                    target: cstr(&target)?,
                    link: cstr(top)?,
                }),
                Err(_) if host.is_dir() => bind_ro(&mut ops, &host)?,
                Err(_) => {}
            }
        }
        let mut bound: Vec<&Path> = vec![Path::new("/usr")];
        for b in &spec.binds {
            // Once each; a path below one bound already is there (read-only) already.
            if bound.iter().any(|have| b.starts_with(have)) {
                continue;
            }
            bound.push(b);
            bind_ro(&mut ops, b)?;
        }
        for d in ["proc", "dev", "box"] {
            mkdir_p(&mut ops, d)?;
        }
        ops.push(Op::Proc(cstr("proc")?));
        ops.push(Op::Bind {
            src: cstr(spec.dev)?,
            dst: cstr("dev")?,
        });
        ops.push(Op::Bind {
            src: cstr(spec.box_dir)?,
            dst: cstr("box")?,
        });
        ops.push(Op::Symlink {
            target: cstr("/box/tmp")?,
            link: cstr("tmp")?,
        });

        let prog = spec.argv.first().ok_or("an empty command")?;
        let candidates = if prog.contains('/') {
            vec![cstr(prog)?]
        } else {
            spec.path
                .split(':')
                .filter(|d| d.starts_with('/'))
                .map(|d| cstr(format!("{}/{prog}", d.trim_end_matches('/'))))
                .collect::<Result<_, _>>()?
        };
        let mut env = vec![
            ("PATH".to_owned(), spec.path.to_owned()),
            ("HOME".to_owned(), "/box".to_owned()),
            ("PWD".to_owned(), "/box".to_owned()),
            ("TMPDIR".to_owned(), "/box/tmp".to_owned()),
            ("LANG".to_owned(), "C.UTF-8".to_owned()),
        ];
        for (k, v) in &spec.env {
            env.retain(|(have, _)| have != k);
            env.push((k.clone(), v.clone()));
        }
        let filter = spec
            .seccomp
            .chunks_exact(8)
            .map(|c| libc::sock_filter {
                code: u16::from_ne_bytes([c[0], c[1]]),
                jt: c[2],
                jf: c[3],
                k: u32::from_ne_bytes([c[4], c[5], c[6], c[7]]),
            })
            .collect::<Vec<_>>();
        if filter.is_empty() || filter.len() > 4096 {
            return Err("no seccomp program".into());
        }
        Ok(Plan {
            root: cstr(spec.root)?,
            ops,
            uid: spec.uid,
            gid: spec.gid,
            uid_map: cstr(format!("{0} {0} 1", spec.uid))?,
            gid_map: cstr(format!("{0} {0} 1", spec.gid))?,
            candidates,
            argv: spec.argv.iter().map(cstr).collect::<Result<_, _>>()?,
            envp: env
                .iter()
                .map(|(k, v)| cstr(format!("{k}={v}")))
                .collect::<Result<_, _>>()?,
            filter,
            rlimits: spec
                .rlimits
                .iter()
                .map(|&(r, soft, hard)| {
                    (
                        r,
                        libc::rlimit {
                            rlim_cur: soft,
                            rlim_max: hard,
                        },
                    )
                })
                .collect(),
        })
    }

    /// What step `n` of an error report was.
    fn what(&self, n: u16) -> String {
        if let Some(f) = Fixed::ALL.iter().find(|f| **f as u16 == n) {
            return f.what().to_owned();
        }
        let show = |c: &CStr| c.to_string_lossy().into_owned();
        match self.ops.get(usize::from(n)) {
            Some(Op::Mkdir(p)) => format!("mkdir /{}", show(p)),
            Some(Op::Touch(p)) => format!("creating /{}", show(p)),
            Some(Op::Symlink { link, .. }) => format!("symlink /{}", show(link)),
            Some(Op::BindRo { src, .. }) => format!("binding {} read-only", show(src)),
            Some(Op::Bind { src, dst }) => format!("binding {} on /{}", show(src), show(dst)),
            Some(Op::Proc(_)) => "mounting /proc".to_owned(),
            None => format!("step {n}"),
        }
    }
}

/// The descriptors of one box: the program's stdin (a pipe's read end or /dev/null),
/// stdout and stderr (pipes' write ends), the report pipe's write end and the cgroups'
/// `cgroup.procs` files. The host closes its copies once [`launch`] returns.
pub(crate) struct Fds<'a> {
    pub stdin: &'a OwnedFd,
    pub stdout: &'a OwnedFd,
    pub stderr: &'a OwnedFd,
    pub report: &'a OwnedFd,
    pub procs: &'a [OwnedFd],
}

/// What the report pipe said.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The program's wait status.
    Status(i32),
    /// The box could not be built: which step, and why.
    Failed(String),
    /// Nothing: init was killed (by the host's limits, or from outside).
    Nothing,
}

const TAG_STATUS: u8 = b'S';
const TAG_ERROR: u8 = b'E';

impl Plan {
    /// Decode what init and the program wrote to the report pipe.
    pub(crate) fn outcome(&self, bytes: &[u8]) -> Outcome {
        let mut status = None;
        for m in bytes.chunks_exact(8) {
            let step = u16::from_ne_bytes([m[2], m[3]]);
            let v = i32::from_ne_bytes([m[4], m[5], m[6], m[7]]);
            match m[0] {
                TAG_ERROR => {
                    return Outcome::Failed(format!(
                        "{}: {}",
                        self.what(step),
                        std::io::Error::from_raw_os_error(v)
                    ));
                }
                TAG_STATUS => status = Some(v),
                _ => {}
            }
        }
        status.map_or(Outcome::Nothing, Outcome::Status)
    }
}

/// Clone init; returns its PID on the host.
pub(crate) fn launch(plan: &Plan, fds: &Fds<'_>) -> Result<rustix::process::Pid, String> {
    let procs: Vec<RawFd> = fds
        .procs
        .iter()
        .map(std::os::fd::AsRawFd::as_raw_fd)
        .collect();
    let raw = Raw {
        stdin: fds.stdin.as_raw_fd(),
        stdout: fds.stdout.as_raw_fd(),
        stderr: fds.stderr.as_raw_fd(),
        report: fds.report.as_raw_fd(),
        procs: &procs,
    };
    let argv: Vec<*const libc::c_char> = plan
        .argv
        .iter()
        .map(|c| c.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let envp: Vec<*const libc::c_char> = plan
        .envp
        .iter()
        .map(|c| c.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let fprog = libc::sock_fprog {
        len: plan.filter.len() as libc::c_ushort,
        filter: plan.filter.as_ptr().cast_mut(),
    };
    let flags = libc::CLONE_NEWNS
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWNET;
    // SAFETY: a fork-like clone (no shared memory, no new stack): the child continues
    // here on its own copy of this thread's stack and runs only `init`, which makes
    // plain system calls on the memory prepared above and never returns.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            libc::c_long::from(flags | libc::SIGCHLD),
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if pid == 0 {
        init(plan, &raw, &argv, &envp, &fprog);
    }
    if pid < 0 {
        return Err(format!(
            "clone into new namespaces: {}",
            std::io::Error::last_os_error()
        ));
    }
    rustix::process::Pid::from_raw(pid as i32).ok_or_else(|| "clone returned no PID".into())
}

struct Raw<'a> {
    stdin: RawFd,
    stdout: RawFd,
    stderr: RawFd,
    report: RawFd,
    procs: &'a [RawFd],
}

/// The report pipe, once init has moved it.
const REPORT: RawFd = 3;

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Write one report message (8 bytes: atomic on a pipe).
fn report(fd: RawFd, tag: u8, step: u16, value: i32) {
    let s = step.to_ne_bytes();
    let v = value.to_ne_bytes();
    let m = [tag, 0, s[0], s[1], v[0], v[1], v[2], v[3]];
    // SAFETY: a write of a local buffer.
    unsafe {
        libc::write(fd, m.as_ptr().cast(), m.len());
    }
}

/// Report step `step` failed with the current errno and end this process.
fn fail(fd: RawFd, step: u16) -> ! {
    report(fd, TAG_ERROR, step, errno());
    // SAFETY: ends this process without running anything of the host's.
    unsafe { libc::_exit(127) }
}

fn check(r: libc::c_long, fd: RawFd, step: Fixed) {
    if r < 0 {
        fail(fd, step as u16);
    }
}

/// Every signal back to its default action, none blocked: the host's handlers (the
/// runtime's, SIGPIPE ignored) must not reach the program.
fn reset_signals() {
    // SAFETY: sigaction and sigprocmask on local values.
    unsafe {
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        for sig in 1..libc::SIGRTMAX() {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::sigaction(sig, &raw const dfl, std::ptr::null_mut());
            }
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&raw mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &raw const none, std::ptr::null_mut());
    }
}

/// PID 1 of the box. Never returns.
fn init(
    plan: &Plan,
    fds: &Raw<'_>,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    fprog: &libc::sock_fprog,
) -> ! {
    // Until the descriptors are arranged, errors go to the report pipe where it is.
    let early = fds.report;
    reset_signals();
    // SAFETY (whole function): plain system calls on memory prepared before the clone;
    // C strings outlive the call; nothing allocates.
    unsafe {
        // First, so that the descriptors of other boxes a concurrent clone copied here
        // are not held: stdin, stdout, stderr, report → 0, 1, 2, 3, the cgroups'
        // `cgroup.procs` files → 4…; everything else of the host closed.
        let mut moved = [0; 16];
        let wanted = 4 + fds.procs.len();
        if wanted > moved.len() {
            fail(early, Fixed::Fds as u16);
        }
        for (i, fd) in [fds.stdin, fds.stdout, fds.stderr, fds.report]
            .iter()
            .chain(fds.procs)
            .enumerate()
        {
            moved[i] = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 64);
            if moved[i] < 0 {
                fail(early, Fixed::Fds as u16);
            }
        }
        for (i, fd) in moved[..wanted].iter().enumerate() {
            if libc::dup2(*fd, i as RawFd) < 0 {
                fail(early, Fixed::Fds as u16);
            }
        }
        if libc::syscall(libc::SYS_close_range, wanted as u32, u32::MAX, 0u32) < 0 {
            fail(REPORT, Fixed::Fds as u16);
        }
        for p in 4..wanted {
            if libc::write(p as RawFd, b"0".as_ptr().cast(), 1) != 1 {
                fail(REPORT, Fixed::Cgroup as u16);
            }
            libc::close(p as RawFd);
        }
        check(
            libc::c_long::from(libc::unshare(libc::CLONE_NEWCGROUP)),
            REPORT,
            Fixed::CgroupNs,
        );
        // The host may die (kill -9): the box goes with it.
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        for (res, lim) in &plan.rlimits {
            check(
                libc::c_long::from(libc::setrlimit(*res, lim)),
                REPORT,
                Fixed::Rlimit,
            );
        }
        let m = |src: *const libc::c_char,
                 dst: *const libc::c_char,
                 fstype: *const libc::c_char,
                 flags: libc::c_ulong,
                 data: *const libc::c_char| {
            libc::c_long::from(libc::mount(src, dst, fstype, flags, data.cast()))
        };
        let null = std::ptr::null();
        check(
            m(
                null,
                c"/".as_ptr(),
                null,
                libc::MS_REC | libc::MS_PRIVATE,
                null,
            ),
            REPORT,
            Fixed::Private,
        );
        check(
            m(
                c"labrelay-root".as_ptr(),
                plan.root.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                c"mode=0755,size=1m,nr_inodes=512".as_ptr(),
            ),
            REPORT,
            Fixed::RootTmpfs,
        );
        check(
            libc::c_long::from(libc::chdir(plan.root.as_ptr())),
            REPORT,
            Fixed::Chdir,
        );
        for (n, op) in plan.ops.iter().enumerate() {
            let ok = match op {
                Op::Mkdir(p) => libc::mkdir(p.as_ptr(), 0o755) == 0 || errno() == libc::EEXIST,
                Op::Touch(p) => {
                    let fd = libc::open(
                        p.as_ptr(),
                        libc::O_RDONLY | libc::O_CREAT | libc::O_CLOEXEC,
                        0o644,
                    );
                    fd >= 0 && libc::close(fd) == 0
                }
                Op::Symlink { target, link } => libc::symlink(target.as_ptr(), link.as_ptr()) == 0,
                Op::BindRo { src, dst } => {
                    m(
                        src.as_ptr(),
                        dst.as_ptr(),
                        null,
                        libc::MS_BIND | libc::MS_REC,
                        null,
                    ) == 0
                        && read_only(dst)
                }
                Op::Bind { src, dst } => {
                    m(src.as_ptr(), dst.as_ptr(), null, libc::MS_BIND, null) == 0
                }
                Op::Proc(p) => {
                    m(
                        c"proc".as_ptr(),
                        p.as_ptr(),
                        c"proc".as_ptr(),
                        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                        null,
                    ) == 0
                }
            };
            if !ok {
                fail(REPORT, n as u16);
            }
        }
        // pivot_root(".", "."): the old root ends up on top of the new one, and goes.
        check(
            libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()),
            REPORT,
            Fixed::Pivot,
        );
        check(
            libc::c_long::from(libc::umount2(c".".as_ptr(), libc::MNT_DETACH)),
            REPORT,
            Fixed::Pivot,
        );
        check(
            libc::c_long::from(libc::chdir(c"/".as_ptr())),
            REPORT,
            Fixed::Pivot,
        );
        check(
            m(
                null,
                c"/".as_ptr(),
                null,
                libc::MS_REMOUNT
                    | libc::MS_BIND
                    | libc::MS_RDONLY
                    | libc::MS_NOSUID
                    | libc::MS_NODEV,
                null,
            ),
            REPORT,
            Fixed::RootRo,
        );
        check(
            libc::c_long::from(libc::sethostname(c"box".as_ptr(), 3)),
            REPORT,
            Fixed::Hostname,
        );
        loopback_up();
        // Init holds the host's memory (copied at the clone): nobody in the box may read
        // it through /proc.
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
        let pid = libc::syscall(
            libc::SYS_clone,
            libc::c_long::from(libc::SIGCHLD),
            0usize,
            0usize,
            0usize,
            0usize,
        );
        if pid == 0 {
            program(plan, argv, envp, fprog);
        }
        check(pid, REPORT, Fixed::Fork);
        for fd in 0..3 {
            libc::close(fd);
        }
        loop {
            let mut st: libc::c_int = 0;
            let r = libc::waitpid(-1, &raw mut st, 0);
            if r == pid as libc::pid_t {
                report(REPORT, TAG_STATUS, 0, st);
                libc::_exit(0);
            }
            if r < 0 && errno() != libc::EINTR {
                libc::_exit(1);
            }
        }
    }
}

/// The mount at `dst` (relative to the working directory) and every mount below it
/// read-only, nosuid and nodev: `mount_setattr` with `AT_RECURSIVE` (Linux 5.12), else a
/// remount of the top one (older kernels: a mount below it stays as it was).
fn read_only(dst: &CStr) -> bool {
    const MOUNT_ATTR_RDONLY: u64 = 0x1;
    const MOUNT_ATTR_NOSUID: u64 = 0x2;
    const MOUNT_ATTR_NODEV: u64 = 0x4;
    const AT_RECURSIVE: libc::c_uint = 0x8000;
    // struct mount_attr: attr_set, attr_clr, propagation, userns_fd.
    let attr: [u64; 4] = [
        MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
        0,
        0,
        0,
    ];
    // SAFETY: system calls on a C string and a local struct.
    unsafe {
        let r = libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            dst.as_ptr(),
            AT_RECURSIVE,
            attr.as_ptr(),
            std::mem::size_of_val(&attr),
        );
        if r == 0 {
            return true;
        }
        if errno() != libc::ENOSYS {
            return false;
        }
        libc::mount(
            std::ptr::null(),
            dst.as_ptr(),
            std::ptr::null(),
            libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
            std::ptr::null(),
        ) == 0
    }
}

/// `lo` up, as in any network namespace a program expects (connecting to 127.0.0.1
/// is then refused rather than unreachable); nothing else is there.
fn loopback_up() {
    // SAFETY: a socket and an ioctl on a local `struct ifreq` (name, then the flags at
    // offset 16).
    unsafe {
        let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if s < 0 {
            fail(REPORT, Fixed::Loopback as u16);
        }
        let mut ifr = [0u8; 40];
        ifr[..2].copy_from_slice(b"lo");
        let flags = (libc::IFF_UP | libc::IFF_LOOPBACK | libc::IFF_RUNNING) as i16;
        ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
        if libc::ioctl(s, libc::SIOCSIFFLAGS, ifr.as_mut_ptr()) < 0 {
            fail(REPORT, Fixed::Loopback as u16);
        }
        libc::close(s);
    }
}

/// The program: the box user in a user namespace of its own, no capabilities,
/// NO_NEW_PRIVS, the seccomp filter, exec. Never returns.
fn program(
    plan: &Plan,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    fprog: &libc::sock_fprog,
) -> ! {
    // SAFETY (whole function): as in `init`. Credentials change through raw system
    // calls: the C library's wrappers would signal the host's other threads.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        check(libc::c_long::from(libc::setsid()), REPORT, Fixed::Session);
        check(
            libc::c_long::from(libc::chdir(c"/box".as_ptr())),
            REPORT,
            Fixed::Workdir,
        );
        let (u, g) = (plan.uid, plan.gid);
        check(
            libc::syscall(libc::SYS_setgroups, 0usize, std::ptr::null::<libc::gid_t>()),
            REPORT,
            Fixed::Creds,
        );
        check(
            libc::syscall(libc::SYS_setresgid, g, g, g),
            REPORT,
            Fixed::Creds,
        );
        check(
            libc::syscall(libc::SYS_setresuid, u, u, u),
            REPORT,
            Fixed::Creds,
        );
        // A uid change clears dumpable, which would make /proc/self root's.
        libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0);
        check(
            libc::c_long::from(libc::unshare(libc::CLONE_NEWUSER)),
            REPORT,
            Fixed::UserNs,
        );
        for (file, text) in [
            (c"/proc/self/setgroups", c"deny"),
            (c"/proc/self/uid_map", plan.uid_map.as_c_str()),
            (c"/proc/self/gid_map", plan.gid_map.as_c_str()),
        ] {
            let fd = libc::open(file.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            let len = text.to_bytes().len();
            if fd < 0 || libc::write(fd, text.as_ptr().cast(), len) != len as isize {
                fail(REPORT, Fixed::Maps as u16);
            }
            libc::close(fd);
        }
        // The new user namespace granted every capability in it: drop them all, the
        // bounding and ambient sets included.
        for cap in 0..64 {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 && errno() != libc::EINVAL {
                fail(REPORT, Fixed::Caps as u16);
            }
        }
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        );
        let header = [0x2008_0522u32, 0]; // _LINUX_CAPABILITY_VERSION_3, this process
        let data = [0u32; 6]; // effective, permitted, inheritable × 2
        check(
            libc::syscall(libc::SYS_capset, header.as_ptr(), data.as_ptr()),
            REPORT,
            Fixed::Caps,
        );
        check(
            libc::c_long::from(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)),
            REPORT,
            Fixed::NoNewPrivs,
        );
        check(
            libc::c_long::from(libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                std::ptr::from_ref(fprog),
            )),
            REPORT,
            Fixed::Seccomp,
        );
        // The report pipe closes at exec: a program that started writes nothing there.
        libc::fcntl(REPORT, libc::F_SETFD, libc::FD_CLOEXEC);
        let mut last = libc::ENOENT;
        for c in &plan.candidates {
            libc::execve(c.as_ptr(), argv.as_ptr(), envp.as_ptr());
            let e = errno();
            // As execvp: a permission problem is remembered, a missing file skipped.
            if e == libc::EACCES {
                last = e;
            } else if e != libc::ENOENT && e != libc::ENOTDIR {
                last = e;
                break;
            }
        }
        report(REPORT, TAG_ERROR, Fixed::Exec as u16, last);
        libc::_exit(127)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec<'a>(argv: &'a [String], seccomp: &'a [u8]) -> Spec<'a> {
        Spec {
            root: Path::new("/run/x/root"),
            dev: Path::new("/run/x/dev"),
            box_dir: Path::new("/run/x/1-0-ab"),
            binds: vec![
                Path::new("/etc/ld.so.cache"),
                Path::new("/nonexistent/x"),
                Path::new("/etc/ld.so.cache"),
                Path::new("/usr/lib"),
            ],
            uid: 65534,
            gid: 65534,
            path: "/usr/local/bin:/usr/bin:relative",
            env: vec![("LANG".into(), "en_US.UTF-8".into())],
            argv,
            seccomp,
            rlimits: vec![],
        }
    }

    #[test]
    fn the_plan_binds_what_exists_and_searches_only_absolute_path_entries() {
        let argv = vec!["python3".to_owned(), "-S".to_owned()];
        let prog = crate::seccomp::program().unwrap();
        let p = Plan::new(&spec(&argv, &prog)).unwrap();
        let shown: Vec<String> = (0..p.ops.len()).map(|n| p.what(n as u16)).collect();
        assert!(
            shown.contains(&"binding /usr read-only".to_owned()),
            "{shown:?}"
        );
        assert!(shown.contains(&"mkdir /etc".to_owned()), "{shown:?}");
        assert!(
            shown.contains(&"creating /etc/ld.so.cache".to_owned()),
            "{shown:?}"
        );
        assert!(
            !shown.iter().any(|s| s.contains("nonexistent")),
            "{shown:?}"
        );
        // Each path once; nothing below /usr again.
        let binds = shown
            .iter()
            .filter(|s| s.starts_with("binding /etc/ld.so.cache"));
        assert_eq!(binds.count(), 1, "{shown:?}");
        assert!(!shown.iter().any(|s| s.contains("/usr/lib")), "{shown:?}");
        assert!(shown.contains(&"binding /run/x/1-0-ab on /box".to_owned()));
        let cands: Vec<_> = p.candidates.iter().map(|c| c.to_str().unwrap()).collect();
        assert_eq!(cands, ["/usr/local/bin/python3", "/usr/bin/python3"]);
        let env: Vec<_> = p.envp.iter().map(|c| c.to_str().unwrap()).collect();
        assert!(env.contains(&"LANG=en_US.UTF-8"), "{env:?}");
        assert!(!env.contains(&"LANG=C.UTF-8"), "{env:?}");
        assert_eq!(p.filter.len() * 8, prog.len());
    }

    #[test]
    fn reports_decode_into_the_step_that_failed() {
        let argv = vec!["/bin/true".to_owned()];
        let prog = crate::seccomp::program().unwrap();
        let p = Plan::new(&spec(&argv, &prog)).unwrap();
        let msg = |tag: u8, step: u16, v: i32| {
            let mut m = vec![tag, 0];
            m.extend_from_slice(&step.to_ne_bytes());
            m.extend_from_slice(&v.to_ne_bytes());
            m
        };
        assert_eq!(p.outcome(&msg(b'S', 0, 256)), Outcome::Status(256));
        assert_eq!(p.outcome(&[]), Outcome::Nothing);
        let Outcome::Failed(why) = p.outcome(&msg(b'E', Fixed::Exec as u16, libc::ENOENT)) else {
            panic!()
        };
        assert!(why.starts_with("exec: No such file"), "{why}");
        let Outcome::Failed(why) = p.outcome(&msg(b'E', 0, libc::EPERM)) else {
            panic!()
        };
        assert!(why.starts_with("mkdir /usr"), "{why}");
        assert!(Plan::new(&spec(&[], &prog)).is_err());
    }
}
