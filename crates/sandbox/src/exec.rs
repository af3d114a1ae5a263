//! Running one submission: a fresh box (a tmpfs of its own, mounted by the host with a
//! size and an inode limit), an optional compile step and the run step, each in new
//! namespaces (built by [`launch`], or by bubblewrap), under the seccomp filter, in a
//! cgroup of its own. The host writes the source before anything untrusted runs and afterwards never
//! opens a path inside the box: outputs come from pipes, the box goes by unmounting it.

use std::io::{Read as _, Seek as _, Write as _};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::cgroup::{Group, Mode};
use crate::config::{Language, Limits, Settings, find_program};
use crate::launch;

/// A submission's status, as Judge0 names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    /// Submitted, not yet taken by a worker.
    #[serde(rename = "In Queue")]
    InQueue,
    /// A worker runs it.
    Processing,
    /// Ran to exit code 0 (and printed the expected output, when one was given).
    Accepted,
    /// Ran to exit code 0 but printed something else than the expected output.
    #[serde(rename = "Wrong Answer")]
    WrongAnswer,
    /// Over its CPU or wall-clock time.
    #[serde(rename = "Time Limit Exceeded")]
    TimeLimitExceeded,
    /// Killed for using more memory than its limit.
    #[serde(rename = "Memory Limit Exceeded")]
    MemoryLimitExceeded,
    /// Wrote more to stdout or stderr than its limit.
    #[serde(rename = "Output Limit Exceeded")]
    OutputLimitExceeded,
    /// The compile step failed (or went over its own limits).
    #[serde(rename = "Compilation Error")]
    CompilationError,
    /// Killed by a signal or ended with a non-zero exit code.
    #[serde(rename = "Runtime Error")]
    RuntimeError,
    /// The box could not be set up (nothing ran unsandboxed) or the run was stopped.
    #[serde(rename = "Internal Error")]
    InternalError,
}

impl Status {
    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::InQueue => "In Queue",
            Status::Processing => "Processing",
            Status::Accepted => "Accepted",
            Status::WrongAnswer => "Wrong Answer",
            Status::TimeLimitExceeded => "Time Limit Exceeded",
            Status::MemoryLimitExceeded => "Memory Limit Exceeded",
            Status::OutputLimitExceeded => "Output Limit Exceeded",
            Status::CompilationError => "Compilation Error",
            Status::RuntimeError => "Runtime Error",
            Status::InternalError => "Internal Error",
        }
    }

    /// The status named `s`.
    pub fn parse(s: &str) -> Option<Status> {
        serde_json::from_value(serde_json::Value::String(s.to_owned())).ok()
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The outcome of one submission.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// What became of it.
    pub status: Status,
    /// The run step's exit code, when it exited by itself.
    pub exit_code: Option<i32>,
    /// The signal that ended the run step.
    pub signal: Option<i32>,
    /// CPU time of the run step, ms.
    pub time_ms: u64,
    /// Wall-clock time of the run step, ms.
    pub wall_ms: u64,
    /// Peak memory of the run step, KiB.
    pub memory_kib: u64,
    /// The run step's stdout (up to the output limit).
    pub stdout: String,
    /// The run step's stderr (up to the output limit).
    pub stderr: String,
    /// The compile step's stdout and stderr.
    pub compile_output: String,
    /// Which limit was hit, or what went wrong (Internal Error).
    pub message: Option<String>,
    /// What enforced the limits: `cgroup v2`, `cgroup v1` or `rlimits` (weaker).
    pub limits: String,
}

impl Report {
    /// One line: status, CPU, wall, memory, exit, why, what enforced the limits.
    pub fn summary(&self) -> String {
        use std::fmt::Write as _;
        let mut s = format!(
            "{} · {} ms CPU · {} ms wall · {} KiB",
            self.status, self.time_ms, self.wall_ms, self.memory_kib
        );
        if let Some(c) = self.exit_code {
            let _ = write!(s, " · exit {c}");
        }
        if let Some(sig) = self.signal {
            let _ = write!(s, " · signal {sig}");
        }
        if let Some(m) = &self.message {
            let _ = write!(s, " · {m}");
        }
        let _ = write!(s, " · limits by {}", self.limits);
        s
    }

    /// An Internal Error: the box could not be set up; nothing ran.
    pub fn internal(message: impl Into<String>, limits: &str) -> Report {
        Report {
            status: Status::InternalError,
            exit_code: None,
            signal: None,
            time_ms: 0,
            wall_ms: 0,
            memory_kib: 0,
            stdout: String::new(),
            stderr: String::new(),
            compile_output: String::new(),
            message: Some(message.into()),
            limits: limits.to_owned(),
        }
    }
}

/// One run.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// The language.
    pub language: &'a Language,
    /// The code.
    pub source: &'a [u8],
    /// stdin of the run step (nothing: /dev/null).
    pub stdin: Option<&'a [u8]>,
    /// The output the run must print (compared line by line, trailing blanks ignored).
    pub expected: Option<&'a [u8]>,
    /// Limits of the run step.
    pub limits: Limits,
}

/// The sandbox of this host.
#[derive(Debug)]
pub struct Sandbox {
    settings: Settings,
    mode: Mode,
    launcher: Launcher,
    /// The read-only /dev every box binds ([`shared_dev`]).
    dev: PathBuf,
    seq: AtomicU64,
}

/// How boxes are built.
#[derive(Debug)]
enum Launcher {
    /// bubblewrap, this program.
    Bwrap(PathBuf),
    /// System calls of our own ([`launch`]); the empty directory each box's new root is
    /// mounted on (in the box's own mount namespace).
    Direct(PathBuf),
}

fn pid_alive(name: &str) -> bool {
    let Some(pid) = name.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
        return false;
    };
    if pid == std::process::id() as i32 {
        return true;
    }
    rustix::process::Pid::from_raw(pid).is_some_and(|p| {
        !matches!(
            rustix::process::test_kill_process(p),
            Err(rustix::io::Errno::SRCH)
        )
    })
}

impl Sandbox {
    /// Check that boxes can be built here (root for the tmpfs, cgroups, bubblewrap with
    /// that launcher) and
    /// remove what boxes of dead workers left behind.
    pub fn new(settings: Settings) -> Result<Sandbox, String> {
        let dir = &settings.sandbox.dir;
        let launcher = match settings.sandbox.launcher.as_str() {
            "direct" => Launcher::Direct(dir.join(ROOT)),
            "bwrap" => {
                let host_path = std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into());
                Launcher::Bwrap(
                    find_program(&settings.sandbox.bwrap.to_string_lossy(), &host_path)
                        .ok_or_else(|| {
                            format!(
                                "bubblewrap ({}) is not installed: apt-get install bubblewrap",
                                settings.sandbox.bwrap.display()
                            )
                        })?,
                )
            }
            other => {
                return Err(format!(
                    "[sandbox] launcher = \"{other}\": expected \"direct\" or \"bwrap\""
                ));
            }
        };
        if !rustix::process::geteuid().is_root() {
            return Err(
                "the sandbox needs root to mount each box's tmpfs and create its cgroups \
                 (boxes themselves run as [sandbox] uid)"
                    .into(),
            );
        }
        let mode = Mode::detect(&settings.sandbox.cgroup, &settings.sandbox.cgroup_root)?;
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        // The box user must reach its box's mount point, and list nothing else.
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o711))
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        let dev = shared_dev(&dir.join(DEV))?;
        if let Launcher::Direct(root) = &launcher {
            empty_root(root)?;
        }
        let sb = Sandbox {
            settings,
            mode,
            launcher,
            dev,
            seq: AtomicU64::new(0),
        };
        sb.sweep();
        Ok(sb)
    }

    /// The settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// What enforces the limits here.
    pub fn limits_label(&self) -> &'static str {
        self.mode.label()
    }

    /// Unmount and remove the boxes and cgroups of processes that are gone.
    pub fn sweep(&self) {
        if let Ok(entries) = std::fs::read_dir(&self.settings.sandbox.dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name != DEV && name != ROOT && !pid_alive(&name) {
                    let _ = rustix::mount::unmount(e.path(), rustix::mount::UnmountFlags::DETACH);
                    let _ = std::fs::remove_dir(e.path());
                }
            }
        }
        self.mode.sweep(pid_alive);
    }

    /// Run `req`. `cancel` set from another thread stops it (Internal Error, "stopped").
    /// Blocks until the box is gone.
    pub fn run(&self, req: &Request<'_>, cancel: &AtomicBool) -> Report {
        let label = self.mode.label();
        let started = Instant::now();
        let name = format!(
            "{}-{}-{:08x}",
            std::process::id(),
            self.seq.fetch_add(1, Ordering::Relaxed),
            rand_u32()
        );
        let lang = req.language;
        let disk = req.limits.disk_mib.max(if lang.compile.is_some() {
            lang.compile_limits.disk_mib
        } else {
            0
        });
        let inodes = req.limits.inodes.max(if lang.compile.is_some() {
            lang.compile_limits.inodes
        } else {
            0
        });
        let bx = match BoxDir::create(
            &self.settings.sandbox.dir.join(&name),
            disk,
            inodes,
            self.settings.sandbox.uid,
            self.settings.sandbox.gid,
        ) {
            Ok(b) => b,
            Err(e) => return Report::internal(format!("setting up the box: {e}"), label),
        };
        if let Err(e) = bx.prepare(&lang.source, req.source) {
            return Report::internal(format!("setting up the box: {e}"), label);
        }
        tracing::debug!(
            us = started.elapsed().as_micros() as u64,
            "box mounted and prepared"
        );
        let mut compile_output = String::new();
        if let Some(argv) = &lang.compile {
            let c = match self.step(
                &name,
                "c",
                &bx,
                lang,
                argv,
                &lang.compile_limits,
                None,
                cancel,
            ) {
                Ok(c) => c,
                Err(e) => return Report::internal(e, label),
            };
            compile_output = lossy(&c.stdout);
            compile_output.push_str(&lossy(&c.stderr));
            let why = match c.killed {
                Some(Kill::Cancel) => return Report::internal("stopped", label),
                Some(Kill::Cpu) => Some("the compiler went over its CPU time limit"),
                Some(Kill::Wall) => Some("the compiler went over its wall-clock limit"),
                Some(Kill::Output) => Some("the compiler wrote too much output"),
                None if c.usage.oom_kills > 0 => Some("the compiler went over its memory limit"),
                None => None,
            };
            if why.is_some() || c.signal.is_some() || c.exit_code != Some(0) {
                return Report {
                    status: Status::CompilationError,
                    exit_code: c.exit_code,
                    signal: c.signal,
                    time_ms: c.cpu_ms(),
                    wall_ms: c.wall_ms,
                    memory_kib: c.memory_kib(),
                    stdout: String::new(),
                    stderr: String::new(),
                    compile_output,
                    message: why.map(str::to_owned),
                    limits: label.to_owned(),
                };
            }
        }
        let r = match self.step(
            &name,
            "r",
            &bx,
            lang,
            &lang.run,
            &req.limits,
            req.stdin,
            cancel,
        ) {
            Ok(r) => r,
            Err(e) => return Report::internal(e, label),
        };
        drop(bx);
        let limits = &req.limits;
        let (status, message) = match r.killed {
            Some(Kill::Cancel) => (Status::InternalError, Some("stopped".to_owned())),
            Some(Kill::Output) => (
                Status::OutputLimitExceeded,
                Some(format!("more than {} KiB of output", limits.output_kib)),
            ),
            Some(Kill::Cpu) => (
                Status::TimeLimitExceeded,
                Some(format!("CPU time limit of {} s", limits.time_secs)),
            ),
            Some(Kill::Wall) => (
                Status::TimeLimitExceeded,
                Some(format!("wall-clock limit of {} s", limits.wall_secs)),
            ),
            None if r.usage.oom_kills > 0 || (r.signal == Some(9) && r.memory_hit) => (
                Status::MemoryLimitExceeded,
                Some(format!("memory limit of {} MiB", limits.memory_mib)),
            ),
            // RLIMIT_CPU, the backstop, sends SIGXCPU.
            None if r.signal == Some(libc::SIGXCPU) => (
                Status::TimeLimitExceeded,
                Some(format!("CPU time limit of {} s", limits.time_secs)),
            ),
            None if r.signal.is_some() || r.exit_code != Some(0) => {
                let why = match r.signal {
                    Some(s) if s == libc::SIGXFSZ => {
                        format!("file size limit of {} MiB", limits.file_mib)
                    }
                    Some(s) => format!("killed by signal {s}"),
                    None => format!("exit code {}", r.exit_code.unwrap_or(-1)),
                };
                (Status::RuntimeError, Some(why))
            }
            None => match req.expected {
                Some(e) if !same_output(&r.stdout, e) => (
                    Status::WrongAnswer,
                    Some("the output differs from the expected output".into()),
                ),
                _ => (Status::Accepted, None),
            },
        };
        let message = if r.usage.pids_max_hits > 0 && status != Status::Accepted {
            let hit = format!("process limit of {} reached", limits.processes);
            Some(message.map_or(hit.clone(), |m| format!("{m}; {hit}")))
        } else {
            message
        };
        tracing::debug!(
            status = status.as_str(),
            total_ms = started.elapsed().as_millis() as u64,
            "box done"
        );
        Report {
            status,
            exit_code: r.exit_code,
            signal: r.signal,
            time_ms: r.cpu_ms(),
            wall_ms: r.wall_ms,
            memory_kib: r.memory_kib(),
            stdout: lossy(&r.stdout),
            stderr: lossy(&r.stderr),
            compile_output,
            message,
            limits: label.to_owned(),
        }
    }

    fn bwrap_args(&self, bx: &BoxDir, lang: &Language, seccomp_fd: RawFd) -> Vec<String> {
        let sb = &self.settings.sandbox;
        let mut a: Vec<String> = [
            "--unshare-user",
            "--unshare-ipc",
            "--unshare-pid",
            "--unshare-net",
            "--unshare-uts",
            "--unshare-cgroup",
            "--disable-userns",
            "--die-with-parent",
            "--new-session",
            "--cap-drop",
            "ALL",
            "--hostname",
            "box",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        let mut push = |v: &[&str]| a.extend(v.iter().map(|s| (*s).to_owned()));
        push(&["--uid", &sb.uid.to_string(), "--gid", &sb.gid.to_string()]);
        push(&["--ro-bind", "/usr", "/usr"]);
        for top in ["bin", "sbin", "lib", "lib64", "lib32", "libx32"] {
            let host = Path::new("/").join(top);
            match std::fs::read_link(&host) {
                Ok(target) => push(&[
                    "--symlink",
                    &target.to_string_lossy(),
                    &host.to_string_lossy(),
                ]),
                Err(_) if host.is_dir() => {
                    push(&[
                        "--ro-bind",
                        &host.to_string_lossy(),
                        &host.to_string_lossy(),
                    ]);
                }
                Err(_) => {}
            }
        }
        for b in sb.binds.iter().chain(&lang.binds) {
            if b.exists() {
                let s = b.to_string_lossy();
                push(&["--ro-bind", &s, &s]);
            }
        }
        push(&["--proc", "/proc"]);
        push(&["--dev-bind", &self.dev.to_string_lossy(), "/dev"]);
        push(&["--bind", &bx.path.to_string_lossy(), "/box"]);
        push(&["--symlink", "/box/tmp", "/tmp"]);
        push(&["--remount-ro", "/"]);
        push(&["--chdir", "/box", "--clearenv"]);
        push(&["--setenv", "PATH", &sb.path]);
        push(&["--setenv", "HOME", "/box"]);
        push(&["--setenv", "TMPDIR", "/box/tmp"]);
        push(&["--setenv", "LANG", "C.UTF-8"]);
        for (k, v) in &lang.env {
            push(&["--setenv", k, v]);
        }
        push(&["--seccomp", &seccomp_fd.to_string()]);
        push(&["--"]);
        a
    }

    /// Start a step's box with bubblewrap, as the box user.
    #[allow(clippy::too_many_arguments)] // the parts of one step
    fn spawn_bwrap(
        &self,
        bwrap: &Path,
        bx: &BoxDir,
        lang: &Language,
        argv: &[String],
        procs: &[OwnedFd],
        rlimits: Vec<(libc::__rlimit_resource_t, u64, u64)>,
        piped_stdin: bool,
    ) -> Result<Spawned, String> {
        let seccomp = seccomp_file()?;
        let mut bwrap_argv = self.bwrap_args(bx, lang, seccomp.as_raw_fd());
        bwrap_argv.extend(argv.iter().cloned());
        let mut cmd = Command::new(bwrap);
        cmd.args(&bwrap_argv)
            .env_clear()
            .uid(self.settings.sandbox.uid)
            .gid(self.settings.sandbox.gid)
            .current_dir("/")
            .stdin(if piped_stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let procs_raw: Vec<RawFd> = procs.iter().map(AsRawFd::as_raw_fd).collect();
        let seccomp_raw = seccomp.as_raw_fd();
        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe system calls (write, setrlimit, close_range, fcntl) on values
        // prepared before the fork; it allocates nothing and takes no lock.
        #[allow(unsafe_code)]
        unsafe {
            cmd.pre_exec(move || child_setup(&procs_raw, &rlimits, seccomp_raw));
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("starting {}: {e}", bwrap.display()))?;
        Ok(Spawned {
            pid: rustix::process::Pid::from_child(&child),
            stdout: Box::new(child.stdout.take().expect("piped stdout")),
            stderr: Box::new(child.stderr.take().expect("piped stderr")),
            stdin: child
                .stdin
                .take()
                .map(|w| Box::new(w) as Box<dyn std::io::Write + Send>),
            report: None,
        })
    }

    /// Start a step's box with the direct launcher ([`launch`]).
    #[allow(clippy::too_many_arguments)] // the parts of one step
    fn spawn_direct(
        &self,
        root: &Path,
        bx: &BoxDir,
        lang: &Language,
        argv: &[String],
        procs: &[OwnedFd],
        rlimits: Vec<(libc::__rlimit_resource_t, u64, u64)>,
        piped_stdin: bool,
    ) -> Result<Spawned, String> {
        let sb = &self.settings.sandbox;
        let seccomp = crate::seccomp::program()?;
        let plan = launch::Plan::new(&launch::Spec {
            root,
            dev: &self.dev,
            box_dir: &bx.path,
            binds: sb
                .binds
                .iter()
                .chain(&lang.binds)
                .map(PathBuf::as_path)
                .collect(),
            uid: sb.uid,
            gid: sb.gid,
            path: &sb.path,
            env: lang
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            argv,
            seccomp: &seccomp,
            rlimits,
        })?;
        let pipe = || {
            rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
                .map_err(|e| format!("a pipe: {e}"))
        };
        let (stdin_r, stdin_w) = if piped_stdin {
            let (r, w) = pipe()?;
            (r, Some(w))
        } else {
            let null = rustix::fs::open(
                "/dev/null",
                rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )
            .map_err(|e| format!("/dev/null: {e}"))?;
            (null, None)
        };
        let (stdout_r, stdout_w) = pipe()?;
        let (stderr_r, stderr_w) = pipe()?;
        let (report_r, report_w) = pipe()?;
        let pid = launch::launch(
            &plan,
            &launch::Fds {
                stdin: &stdin_r,
                stdout: &stdout_w,
                stderr: &stderr_w,
                report: &report_w,
                procs,
            },
        )?;
        Ok(Spawned {
            pid,
            stdout: Box::new(std::fs::File::from(stdout_r)),
            stderr: Box::new(std::fs::File::from(stderr_r)),
            stdin: stdin_w
                .map(|w| Box::new(std::fs::File::from(w)) as Box<dyn std::io::Write + Send>),
            report: Some((plan, std::fs::File::from(report_r))),
        })
    }

    /// One step in its own box; `Err` when the box could not be set up.
    #[allow(clippy::too_many_arguments)] // one call site per step kind
    fn step(
        &self,
        name: &str,
        kind: &str,
        bx: &BoxDir,
        lang: &Language,
        argv: &[String],
        limits: &Limits,
        stdin: Option<&[u8]>,
        cancel: &AtomicBool,
    ) -> Result<Step, String> {
        let t0 = Instant::now();
        let group = Group::create(&self.mode, &format!("{name}-{kind}"), limits)
            .map_err(|e| format!("setting up the box's cgroup: {e}"))?;
        let t_cgroup = t0.elapsed();
        let procs = group.procs_files()?;
        let rlimits = rlimits(limits, &self.mode);
        let started = Instant::now();
        let mut sp = match &self.launcher {
            Launcher::Bwrap(bwrap) => {
                self.spawn_bwrap(bwrap, bx, lang, argv, &procs, rlimits, stdin.is_some())?
            }
            Launcher::Direct(root) => {
                self.spawn_direct(root, bx, lang, argv, &procs, rlimits, stdin.is_some())?
            }
        };
        drop(procs);
        let t_spawned = t0.elapsed();
        let pid = sp.pid;
        let pidfd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok();
        let (tx, rx) = mpsc::channel::<Event>();
        let cap = usize::try_from(limits.output_kib * 1024).unwrap_or(usize::MAX);
        let over = Arc::new(AtomicBool::new(false));
        let reader = |stream: Box<dyn std::io::Read + Send>| {
            let tx = tx.clone();
            let over = over.clone();
            std::thread::spawn(move || read_capped(stream, cap, &over, &tx))
        };
        let out = reader(sp.stdout);
        let err = reader(sp.stderr);
        if let (Some(mut w), Some(data)) = (sp.stdin.take(), stdin) {
            let data = data.to_vec();
            std::thread::spawn(move || {
                // The program may not read it all: EPIPE is fine.
                let _ = w.write_all(&data);
            });
        }
        {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let _ = tx.send(Event::Exited(wait4(pid)));
            });
        }
        drop(tx);
        let cpu_limit_ns = (limits.time_secs * 1e9) as u64;
        let wall = Duration::from_secs_f64(limits.wall_secs);
        let mut killed: Option<Kill> = None;
        let kill = |why: Kill, killed: &mut Option<Kill>| {
            if killed.is_none() {
                *killed = Some(why);
            }
            if let Some(fd) = &pidfd {
                let _ = rustix::process::pidfd_send_signal(fd, rustix::process::Signal::KILL);
            }
            group.kill();
        };
        let exited = loop {
            match rx.recv_timeout(Duration::from_millis(10)) {
                Ok(Event::Exited(s)) => break s,
                Ok(Event::Output) => kill(Kill::Output, &mut killed),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break Waited::default(),
            }
            if killed.is_some() {
                continue;
            }
            if cancel.load(Ordering::Relaxed) {
                kill(Kill::Cancel, &mut killed);
            } else if started.elapsed() > wall {
                kill(Kill::Wall, &mut killed);
            } else if group.cpu_ns().is_some_and(|ns| ns > cpu_limit_ns) {
                kill(Kill::Cpu, &mut killed);
            } else if over.load(Ordering::Relaxed) {
                kill(Kill::Output, &mut killed);
            }
        };
        let wall_ms = started.elapsed().as_millis() as u64;
        let t_ran = t0.elapsed();
        // Whatever the program left (a daemon, a process that escaped the PID namespace's
        // end by racing it) dies with the cgroup.
        group.kill();
        let (stdout, stdout_over) = out.join().unwrap_or_default();
        let (stderr, stderr_over) = err.join().unwrap_or_default();
        if killed.is_none() && (stdout_over || stderr_over) {
            killed = Some(Kill::Output);
        }
        let mut usage = group.usage();
        if usage.cpu_ns.is_none() {
            usage.cpu_ns = Some(exited.cpu_ns);
        }
        if usage.memory_peak.is_none() {
            usage.memory_peak = Some(exited.maxrss_kib * 1024);
        }
        if killed.is_none() && usage.cpu_ns.is_some_and(|ns| ns > cpu_limit_ns) {
            killed = Some(Kill::Cpu);
        }
        let memory_hit = group.memory_limit_hit();
        let t_measured = t0.elapsed();
        drop(group);
        tracing::debug!(
            step = kind,
            cgroup_us = t_cgroup.as_micros() as u64,
            spawned_us = t_spawned.as_micros() as u64,
            ran_us = t_ran.as_micros() as u64,
            measured_us = t_measured.as_micros() as u64,
            removed_us = t0.elapsed().as_micros() as u64,
            "step timings (cumulative)"
        );
        let (exit_code, signal) = if let Some((plan, report)) = sp.report {
            direct_status(&plan, report, killed.is_some(), &exited)?
        } else {
            bwrap_status(killed.is_some(), &exited, &stderr)?
        };
        Ok(Step {
            exit_code,
            signal,
            wall_ms,
            stdout,
            stderr,
            killed,
            usage,
            memory_hit,
        })
    }
}

/// The exit code and signal of a direct launcher's step: the program's own wait status,
/// which its init wrote to the report pipe (nothing when init was killed).
fn direct_status(
    plan: &launch::Plan,
    mut report: std::fs::File,
    killed: bool,
    exited: &Waited,
) -> Result<(Option<i32>, Option<i32>), String> {
    let mut bytes = Vec::new();
    let _ = report.read_to_end(&mut bytes);
    match plan.outcome(&bytes) {
        launch::Outcome::Status(st) => Ok((
            libc::WIFEXITED(st).then(|| libc::WEXITSTATUS(st)),
            libc::WIFSIGNALED(st).then(|| libc::WTERMSIG(st)),
        )),
        launch::Outcome::Failed(why) if !killed => {
            Err(format!("the box could not be set up: {why}"))
        }
        launch::Outcome::Nothing if !killed && exited.signal.is_none() => {
            Err("lost the box's process".into())
        }
        launch::Outcome::Failed(_) | launch::Outcome::Nothing => Ok((None, exited.signal)),
    }
}

/// The exit code and signal of a bubblewrap step: bubblewrap ends with 128 + N when the
/// program was killed by signal N, and with 1 and a `bwrap: ` message when it could not
/// build the box.
fn bwrap_status(
    killed: bool,
    exited: &Waited,
    stderr: &[u8],
) -> Result<(Option<i32>, Option<i32>), String> {
    let (mut exit_code, mut signal) = (exited.code, exited.signal);
    if let Some(c) = exit_code
        && (129..=128 + 64).contains(&c)
    {
        signal = Some(c - 128);
        exit_code = None;
    }
    if !killed && exit_code == Some(1) && stderr.starts_with(b"bwrap: ") {
        return Err(format!(
            "the box could not be set up: {}",
            lossy(stderr).trim()
        ));
    }
    if exited.code.is_none() && exited.signal.is_none() && !killed {
        return Err("lost the box's process".into());
    }
    Ok((exit_code, signal))
}

fn rand_u32() -> u32 {
    rand::random()
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Same output, ignoring trailing blanks on each line and trailing empty lines.
pub fn same_output(got: &[u8], want: &[u8]) -> bool {
    let norm = |b: &[u8]| {
        let s = String::from_utf8_lossy(b).replace("\r\n", "\n");
        let lines: Vec<String> = s.lines().map(|l| l.trim_end().to_owned()).collect();
        let mut lines = lines;
        while lines.last().is_some_and(String::is_empty) {
            lines.pop();
        }
        lines
    };
    norm(got) == norm(want)
}

/// Why the host killed a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kill {
    Cpu,
    Wall,
    Output,
    Cancel,
}

enum Event {
    Exited(Waited),
    Output,
}

#[derive(Debug, Default)]
struct Waited {
    code: Option<i32>,
    signal: Option<i32>,
    cpu_ns: u64,
    maxrss_kib: u64,
}

/// A started step: its init (direct) or bubblewrap process and its pipes.
struct Spawned {
    pid: rustix::process::Pid,
    stdout: Box<dyn std::io::Read + Send>,
    stderr: Box<dyn std::io::Read + Send>,
    stdin: Option<Box<dyn std::io::Write + Send>>,
    /// The direct launcher's plan and report pipe.
    report: Option<(launch::Plan, std::fs::File)>,
}

struct Step {
    exit_code: Option<i32>,
    signal: Option<i32>,
    wall_ms: u64,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    killed: Option<Kill>,
    usage: crate::cgroup::Usage,
    memory_hit: bool,
}

impl Step {
    fn cpu_ms(&self) -> u64 {
        self.usage.cpu_ns.unwrap_or(0) / 1_000_000
    }
    fn memory_kib(&self) -> u64 {
        self.usage.memory_peak.unwrap_or(0) / 1024
    }
}

/// Read a stream to its end, keeping `cap` bytes; past them, say so once.
fn read_capped(
    mut r: Box<dyn std::io::Read + Send>,
    cap: usize,
    over: &AtomicBool,
    tx: &mpsc::Sender<Event>,
) -> (Vec<u8>, bool) {
    let mut kept = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut exceeded = false;
    loop {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let room = cap.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
                if n > room && !exceeded {
                    exceeded = true;
                    over.store(true, Ordering::Relaxed);
                    let _ = tx.send(Event::Output);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    (kept, exceeded)
}

/// Wait for `pid` and take its resource usage (which includes every descendant it
/// reaped: the whole box).
fn wait4(pid: rustix::process::Pid) -> Waited {
    let mut status: libc::c_int = 0;
    // SAFETY: zeroed `rusage` is a valid value of a plain C struct.
    #[allow(unsafe_code)]
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: valid pointers to local values; `pid` is our child.
        #[allow(unsafe_code)]
        let r = unsafe { libc::wait4(pid.as_raw_nonzero().get(), &raw mut status, 0, &raw mut ru) };
        if r >= 0 {
            break;
        }
        if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return Waited::default();
        }
    }
    let tv = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1000;
    Waited {
        code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
        signal: libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status)),
        cpu_ns: tv(ru.ru_utime) + tv(ru.ru_stime),
        maxrss_kib: ru.ru_maxrss as u64,
    }
}

/// The rlimits of a step: the file size limit, no core files, RLIMIT_CPU as a backstop
/// of the cgroup's CPU accounting; without cgroups also the address space and process
/// count (per uid: weaker).
fn rlimits(l: &Limits, mode: &Mode) -> Vec<(libc::__rlimit_resource_t, u64, u64)> {
    let cpu = l.time_secs.ceil() as u64 + 1;
    let mut v = vec![
        (libc::RLIMIT_FSIZE, l.file_mib << 20, l.file_mib << 20),
        (libc::RLIMIT_CORE, 0, 0),
        (libc::RLIMIT_CPU, cpu, cpu + 1),
    ];
    if *mode == Mode::None {
        v.push((libc::RLIMIT_AS, l.memory_mib << 20, l.memory_mib << 20));
        v.push((
            libc::RLIMIT_NPROC,
            u64::from(l.processes),
            u64::from(l.processes),
        ));
    }
    // Never above the current hard limit: after dropping to the box user, raising one
    // would fail (and the box would not start).
    for (res, soft, hard) in &mut v {
        let r = match *res {
            libc::RLIMIT_FSIZE => rustix::process::Resource::Fsize,
            libc::RLIMIT_CORE => rustix::process::Resource::Core,
            libc::RLIMIT_CPU => rustix::process::Resource::Cpu,
            libc::RLIMIT_AS => rustix::process::Resource::As,
            _ => rustix::process::Resource::Nproc,
        };
        if let Some(max) = rustix::process::getrlimit(r).maximum {
            *hard = (*hard).min(max);
            *soft = (*soft).min(*hard);
        }
    }
    v
}

/// Between fork and exec: into the cgroups, the rlimits, every descriptor but the
/// seccomp program's closed at exec.
fn child_setup(
    procs: &[RawFd],
    rlimits: &[(libc::__rlimit_resource_t, u64, u64)],
    seccomp: RawFd,
) -> std::io::Result<()> {
    crate::cgroup::enter(procs)?;
    for &(res, soft, hard) in rlimits {
        let l = libc::rlimit {
            rlim_cur: soft,
            rlim_max: hard,
        };
        // SAFETY: a valid pointer to a local value.
        #[allow(unsafe_code)]
        let r = unsafe { libc::setrlimit(res, &raw const l) };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    // SAFETY: plain system calls on integers. close_range may be missing on old
    // kernels: every descriptor Rust opens is close-on-exec anyway.
    #[allow(unsafe_code)]
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            4u32, /* CLOEXEC */
        );
        if libc::fcntl(seccomp, libc::F_SETFD, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The seccomp program in a memory file, at offset 0, close-on-exec (cleared in the
/// child only).
fn seccomp_file() -> Result<std::fs::File, String> {
    let prog = crate::seccomp::program()?;
    let fd: OwnedFd = rustix::fs::memfd_create("labrelay-seccomp", rustix::fs::MemfdFlags::CLOEXEC)
        .map_err(|e| format!("memfd_create: {e}"))?;
    let mut f = std::fs::File::from(fd);
    f.write_all(&prog)
        .and_then(|()| f.rewind())
        .map_err(|e| format!("writing the seccomp program: {e}"))?;
    Ok(f)
}

/// The name of the shared /dev under `[sandbox] dir`.
const DEV: &str = "dev";

/// The name of the empty directory under `[sandbox] dir` on which the direct launcher
/// mounts each box's new root, in the box's own mount namespace.
const ROOT: &str = "root";

/// `root` as an empty directory owned by root, mode 0755, not a mount point (nothing is
/// ever mounted on it in the host's namespace; what is there is not ours).
fn empty_root(root: &Path) -> Result<(), String> {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    match std::fs::create_dir(root) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("creating {}: {e}", root.display())),
    }
    let m = std::fs::symlink_metadata(root).map_err(|e| format!("{}: {e}", root.display()))?;
    if !m.is_dir() || m.uid() != 0 {
        return Err(format!("{}: not a directory of root's", root.display()));
    }
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("{}: {e}", root.display()))?;
    if std::fs::read_dir(root).map_or(true, |mut d| d.next().is_some()) {
        return Err(format!("{}: not empty", root.display()));
    }
    Ok(())
}

/// The device nodes of a box's /dev: name, major, minor.
const DEVICES: [(&str, u32, u32); 5] = [
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
];

/// The links of a box's /dev: /dev/shm is the box's own /box/tmp.
const DEV_LINKS: [(&str, &str); 5] = [
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
    ("shm", "/box/tmp"),
];

/// Whether `dev` already holds exactly the nodes and links of [`shared_dev`].
fn dev_ready(dev: &Path) -> bool {
    use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
    let nodes = DEVICES.iter().all(|(name, major, minor)| {
        std::fs::symlink_metadata(dev.join(name)).is_ok_and(|m| {
            m.file_type().is_char_device()
                && m.rdev() == rustix::fs::makedev(*major, *minor)
                && m.mode() & 0o7777 == 0o666
        })
    });
    let links = DEV_LINKS.iter().all(|(name, target)| {
        std::fs::read_link(dev.join(name)).is_ok_and(|t| t == Path::new(target))
    });
    let entries = std::fs::read_dir(dev).map_or(usize::MAX, Iterator::count);
    nodes
        && links
        && entries == DEVICES.len() + DEV_LINKS.len()
        && rustix::fs::statvfs(dev)
            .is_ok_and(|v| v.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY))
}

/// The /dev that every box binds read-only: a small tmpfs of this process (its mount
/// namespace is private, [`crate::private_mounts`]) holding null, zero, full, random,
/// urandom and the fd links, made read-only once populated. One bind per box instead of
/// bubblewrap's `--dev`, which builds a tmpfs, a devpts and a dozen binds for every box.
fn shared_dev(dev: &Path) -> Result<PathBuf, String> {
    if dev_ready(dev) {
        return Ok(dev.to_path_buf());
    }
    let err = |what: &str, e: rustix::io::Errno| format!("{what} {}: {e}", dev.display());
    match std::fs::create_dir(dev) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("creating {}: {e}", dev.display())),
    }
    rustix::mount::mount(
        "labrelay-dev",
        dev,
        "tmpfs",
        rustix::mount::MountFlags::NOSUID | rustix::mount::MountFlags::NOEXEC,
        Some(c"size=16k,nr_inodes=32,mode=0755"),
    )
    .map_err(|e| err("mounting a tmpfs on", e))?;
    let dir = rustix::fs::open(
        dev,
        rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| err("opening", e))?;
    for (name, major, minor) in DEVICES {
        rustix::fs::mknodat(
            &dir,
            name,
            rustix::fs::FileType::CharacterDevice,
            rustix::fs::Mode::from_raw_mode(0o666),
            rustix::fs::makedev(major, minor),
        )
        .map_err(|e| err(&format!("mknod {name} in"), e))?;
        // mknod applies the umask.
        rustix::fs::chmodat(
            &dir,
            name,
            rustix::fs::Mode::from_raw_mode(0o666),
            rustix::fs::AtFlags::empty(),
        )
        .map_err(|e| err(&format!("chmod {name} in"), e))?;
    }
    for (name, target) in DEV_LINKS {
        rustix::fs::symlinkat(target, &dir, name)
            .map_err(|e| err(&format!("symlink {name} in"), e))?;
    }
    rustix::mount::mount_remount(
        dev,
        rustix::mount::MountFlags::RDONLY
            | rustix::mount::MountFlags::NOSUID
            | rustix::mount::MountFlags::NOEXEC,
        c"",
    )
    .map_err(|e| err("making read-only", e))?;
    if !dev_ready(dev) {
        return Err(format!("{}: not the expected device nodes", dev.display()));
    }
    Ok(dev.to_path_buf())
}

/// The box's tmpfs, mounted by the host.
struct BoxDir {
    path: PathBuf,
    uid: u32,
    gid: u32,
}

impl BoxDir {
    fn create(
        path: &Path,
        disk_mib: u64,
        inodes: u64,
        uid: u32,
        gid: u32,
    ) -> Result<BoxDir, String> {
        std::fs::create_dir(path).map_err(|e| format!("creating {}: {e}", path.display()))?;
        let b = BoxDir {
            path: path.to_path_buf(),
            uid,
            gid,
        };
        let data = std::ffi::CString::new(format!(
            "size={disk_mib}m,nr_inodes={inodes},mode=0700,uid={uid},gid={gid}"
        ))
        .map_err(|e| e.to_string())?;
        rustix::mount::mount(
            "labrelay-box",
            path,
            "tmpfs",
            rustix::mount::MountFlags::NOSUID | rustix::mount::MountFlags::NODEV,
            Some(data.as_c_str()),
        )
        .map_err(|e| format!("mounting a tmpfs on {}: {e}", path.display()))?;
        Ok(b)
    }

    /// Before anything untrusted runs: the source file and /box/tmp.
    fn prepare(&self, source_name: &str, source: &[u8]) -> Result<(), String> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let file = self.path.join(source_name);
        let mut f = std::fs::File::options()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&file)
            .map_err(|e| format!("writing {}: {e}", file.display()))?;
        f.write_all(source)
            .map_err(|e| format!("writing {}: {e}", file.display()))?;
        let tmp = self.path.join("tmp");
        std::fs::create_dir(&tmp).map_err(|e| format!("creating {}: {e}", tmp.display()))?;
        rustix::fs::chown(
            &tmp,
            Some(rustix::fs::Uid::from_raw(self.uid)),
            Some(rustix::fs::Gid::from_raw(self.gid)),
        )
        .map_err(|e| format!("chown {}: {e}", tmp.display()))?;
        Ok(())
    }
}

impl Drop for BoxDir {
    fn drop(&mut self) {
        // By the mount point, which the host owns: nothing inside the box is followed.
        let _ = rustix::mount::unmount(&self.path, rustix::mount::UnmountFlags::DETACH);
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// Read everything from `r` (used by tests and tools for stdin files).
pub fn read_all(mut r: impl std::io::Read) -> std::io::Result<Vec<u8>> {
    let mut v = Vec::new();
    r.read_to_end(&mut v)?;
    Ok(v)
}
