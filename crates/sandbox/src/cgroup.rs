//! One cgroup per box step: limits (memory, processes), accounting (CPU time, peak
//! memory, OOM kills) and a kill of every process in it. cgroup v2 when its memory and
//! pids controllers are available; else cgroup v1 (memory, pids, cpuacct), with the v2
//! hierarchy of a hybrid host used only for `cgroup.kill`; else none (rlimits, weaker).

use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::config::Limits;

/// The parent cgroup of every box.
const PARENT: &str = "labrelay-sandbox";

/// Which cgroup hierarchy limits the boxes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// The unified hierarchy at this path has the memory and pids controllers.
    V2(PathBuf),
    /// v1 controllers under the root; `kill` is a v2 hierarchy for `cgroup.kill`.
    V1 {
        /// e.g. /sys/fs/cgroup.
        root: PathBuf,
        /// e.g. /sys/fs/cgroup/unified, when it has cgroup.kill.
        kill: Option<PathBuf>,
    },
    /// No cgroups: rlimits only.
    None,
}

impl Mode {
    /// How results name it.
    pub fn label(&self) -> &'static str {
        match self {
            Mode::V2(_) => "cgroup v2",
            Mode::V1 { .. } => "cgroup v1",
            Mode::None => "rlimits",
        }
    }

    /// Find the mode `wanted` (`auto`, `v1`, `v2`, `none`) under `root`.
    pub fn detect(wanted: &str, root: &Path) -> Result<Mode, String> {
        let v2 = [root.to_path_buf(), root.join("unified")]
            .into_iter()
            .find(|p| p.join("cgroup.controllers").exists());
        let v2_full = v2.as_ref().filter(|p| {
            std::fs::read_to_string(p.join("cgroup.controllers")).is_ok_and(|c| {
                let c: Vec<&str> = c.split_whitespace().collect();
                c.contains(&"memory") && c.contains(&"pids") && c.contains(&"cpu")
            })
        });
        let v1_ok = ["memory", "pids", "cpuacct"]
            .iter()
            .all(|c| root.join(c).join("cgroup.procs").exists());
        let kill = v2
            .clone()
            .filter(|p| p.join("cgroup.kill").exists() || writable_dir(p));
        match wanted {
            "none" => Ok(Mode::None),
            "v2" => v2_full.cloned().map(Mode::V2).ok_or_else(|| {
                format!(
                    "[sandbox] cgroup = \"v2\": no cgroup v2 hierarchy with the memory, pids and cpu controllers under {}",
                    root.display()
                )
            }),
            "v1" => {
                if v1_ok {
                    Ok(Mode::V1 {
                        root: root.to_path_buf(),
                        kill,
                    })
                } else {
                    Err(format!(
                        "[sandbox] cgroup = \"v1\": the memory, pids and cpuacct controllers are not mounted under {}",
                        root.display()
                    ))
                }
            }
            _ => Ok(if let Some(p) = v2_full {
                Mode::V2(p.clone())
            } else if v1_ok {
                Mode::V1 {
                    root: root.to_path_buf(),
                    kill,
                }
            } else {
                Mode::None
            }),
        }
    }

    /// The directories a box named `name` uses.
    fn dirs(&self, name: &str) -> Vec<PathBuf> {
        match self {
            Mode::V2(root) => vec![root.join(PARENT).join(name)],
            Mode::V1 { root, kill } => {
                let mut v: Vec<PathBuf> = ["memory", "pids", "cpuacct"]
                    .iter()
                    .map(|c| root.join(c).join(PARENT).join(name))
                    .collect();
                if let Some(k) = kill {
                    v.push(k.join(PARENT).join(name));
                }
                v
            }
            Mode::None => Vec::new(),
        }
    }

    /// Remove the cgroups of boxes whose owner process is gone (a worker killed with -9):
    /// kill what is left in them, then rmdir.
    pub fn sweep(&self, alive: impl Fn(&str) -> bool) {
        let parents: Vec<PathBuf> = self
            .dirs("x")
            .into_iter()
            .filter_map(|d| d.parent().map(Path::to_path_buf))
            .collect();
        for parent in parents {
            let Ok(entries) = std::fs::read_dir(&parent) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if e.path().is_dir() && !alive(&name) {
                    kill_all(&e.path(), Duration::from_secs(2));
                    let _ = std::fs::remove_dir(e.path());
                }
            }
        }
    }
}

fn writable_dir(p: &Path) -> bool {
    rustix::fs::access(p, rustix::fs::Access::WRITE_OK).is_ok()
}

fn write(path: &Path, value: &str) -> Result<(), String> {
    std::fs::write(path, value).map_err(|e| format!("writing {value:?} to {}: {e}", path.display()))
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// `key N` from a flat-keyed file such as memory.events.
fn read_key(path: &Path, key: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// Every pid in the cgroup at `dir` (and below it) gets SIGKILL until none is left.
fn kill_all(dir: &Path, within: Duration) -> bool {
    let until = Instant::now() + within;
    loop {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        let pids: Vec<i32> = procs
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        if pids.is_empty() {
            return true;
        }
        for p in pids {
            if let Some(pid) = rustix::process::Pid::from_raw(p) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
        if Instant::now() >= until {
            return false;
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// The cgroup(s) of one box step.
#[derive(Debug)]
pub struct Group {
    mode: Mode,
    dirs: Vec<PathBuf>,
}

/// What the cgroup measured.
#[derive(Debug, Default, Clone, Copy)]
pub struct Usage {
    /// CPU time of every process, ns.
    pub cpu_ns: Option<u64>,
    /// Peak memory, bytes.
    pub memory_peak: Option<u64>,
    /// Processes the kernel's OOM killer killed.
    pub oom_kills: u64,
    /// Times a fork failed on the process limit.
    pub pids_max_hits: u64,
}

impl Group {
    /// Create the cgroup(s) for a box named `name` with `limits`.
    pub fn create(mode: &Mode, name: &str, limits: &Limits) -> Result<Group, String> {
        let dirs = mode.dirs(name);
        let g = Group {
            mode: mode.clone(),
            dirs,
        };
        for d in &g.dirs {
            if let Some(parent) = d.parent()
                && !parent.exists()
            {
                std::fs::create_dir(parent)
                    .or_else(|e| {
                        if e.kind() == std::io::ErrorKind::AlreadyExists {
                            Ok(())
                        } else {
                            Err(e)
                        }
                    })
                    .map_err(|e| format!("creating {}: {e}", parent.display()))?;
                if let Mode::V2(_) = mode {
                    // Hand the controllers down to the boxes.
                    write(&parent.join("cgroup.subtree_control"), "+memory +pids +cpu")?;
                }
            }
            std::fs::create_dir(d).map_err(|e| format!("creating {}: {e}", d.display()))?;
        }
        let bytes = limits.memory_mib * 1024 * 1024;
        match mode {
            Mode::V2(_) => {
                let d = &g.dirs[0];
                write(&d.join("memory.max"), &bytes.to_string())?;
                write(&d.join("memory.swap.max"), "0")?;
                write(&d.join("pids.max"), &limits.processes.to_string())?;
            }
            Mode::V1 { .. } => {
                let mem = &g.dirs[0];
                write(&mem.join("memory.limit_in_bytes"), &bytes.to_string())?;
                let memsw = mem.join("memory.memsw.limit_in_bytes");
                if memsw.exists() {
                    write(&memsw, &bytes.to_string())?;
                }
                write(&g.dirs[1].join("pids.max"), &limits.processes.to_string())?;
            }
            Mode::None => {}
        }
        Ok(g)
    }

    /// `cgroup.procs` of each directory, opened for writing: the child writes "0" to
    /// each before it execs (moving itself in, so nothing it starts is ever outside).
    pub fn procs_files(&self) -> Result<Vec<OwnedFd>, String> {
        self.dirs
            .iter()
            .map(|d| {
                let p = d.join("cgroup.procs");
                File::options()
                    .write(true)
                    .open(&p)
                    .map(OwnedFd::from)
                    .map_err(|e| format!("opening {}: {e}", p.display()))
            })
            .collect()
    }

    /// CPU time so far, ns.
    pub fn cpu_ns(&self) -> Option<u64> {
        match &self.mode {
            Mode::V2(_) => read_key(&self.dirs[0].join("cpu.stat"), "usage_usec").map(|u| u * 1000),
            Mode::V1 { .. } => read_u64(&self.dirs[2].join("cpuacct.usage")),
            Mode::None => None,
        }
    }

    /// Kill every process in the group and wait until it is empty.
    pub fn kill(&self) {
        match &self.mode {
            Mode::V2(_) => {
                let _ = std::fs::write(self.dirs[0].join("cgroup.kill"), "1");
                kill_all(&self.dirs[0], Duration::from_secs(5));
            }
            Mode::V1 { kill, .. } => {
                if kill.is_some()
                    && let Some(k) = self.dirs.last()
                {
                    let _ = std::fs::write(k.join("cgroup.kill"), "1");
                }
                kill_all(&self.dirs[1], Duration::from_secs(5));
            }
            Mode::None => {}
        }
    }

    /// What was measured.
    pub fn usage(&self) -> Usage {
        let mut u = Usage {
            cpu_ns: self.cpu_ns(),
            ..Usage::default()
        };
        match &self.mode {
            Mode::V2(_) => {
                let d = &self.dirs[0];
                u.memory_peak = read_u64(&d.join("memory.peak"));
                u.oom_kills = read_key(&d.join("memory.events"), "oom_kill").unwrap_or(0);
                u.pids_max_hits = read_key(&d.join("pids.events"), "max").unwrap_or(0);
            }
            Mode::V1 { .. } => {
                let mem = &self.dirs[0];
                u.memory_peak = read_u64(&mem.join("memory.max_usage_in_bytes"));
                u.oom_kills = read_key(&mem.join("memory.oom_control"), "oom_kill").unwrap_or(0);
                if u.oom_kills == 0 {
                    // Kernels without the counter: the limit was hit and something died.
                    u.oom_kills =
                        read_key(&mem.join("memory.oom_control"), "under_oom").unwrap_or(0);
                }
                u.pids_max_hits = read_key(&self.dirs[1].join("pids.events"), "max").unwrap_or(0);
            }
            Mode::None => {}
        }
        u
    }

    /// Whether the memory limit was reached at least once.
    pub fn memory_limit_hit(&self) -> bool {
        match &self.mode {
            Mode::V2(_) => read_key(&self.dirs[0].join("memory.events"), "max").unwrap_or(0) > 0,
            Mode::V1 { .. } => read_u64(&self.dirs[0].join("memory.failcnt")).unwrap_or(0) > 0,
            Mode::None => false,
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.kill();
        for d in &self.dirs {
            // A cgroup whose last process is still being reaped is busy for a moment.
            for _ in 0..200 {
                match std::fs::remove_dir(d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        }
    }
}

/// Write "0" (this process) to each file: used between fork and exec.
pub fn enter(files: &[std::os::fd::RawFd]) -> std::io::Result<()> {
    for &fd in files {
        // SAFETY: see the caller; `write` on a raw descriptor is async-signal-safe.
        #[allow(unsafe_code)]
        let n = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
        if n != 1 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
