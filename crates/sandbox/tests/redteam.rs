#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The red-team suite: hostile programs, one test each. Each must be contained, reported
//! with the right status, and leave the host as it was: no process, mount or cgroup of
//! the box left, host files untouched.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use sandbox::{Limits, Report, Request, Sandbox, Settings, Status};

/// The shipped settings with the launcher under test: `LABRELAY_TEST_SANDBOX_LAUNCHER`
/// (scripts/test runs this suite once with each), else the default.
fn settings() -> Settings {
    let mut s = Settings::shipped();
    if let Ok(l) = std::env::var("LABRELAY_TEST_SANDBOX_LAUNCHER") {
        s.sandbox.launcher = l;
    }
    s
}

fn sandbox() -> Sandbox {
    Sandbox::new(settings()).expect("a sandbox on this host (root, the launcher)")
}

fn run_with(lang: &str, src: &str, stdin: Option<&str>, f: impl FnOnce(&mut Limits)) -> Report {
    let sb = sandbox();
    let l = sb.settings().language(lang).unwrap();
    let mut limits = l.limits;
    f(&mut limits);
    let r = sb.run(
        &Request {
            language: l,
            source: src.as_bytes(),
            stdin: stdin.map(str::as_bytes),
            expected: None,
            limits,
        },
        &AtomicBool::new(false),
    );
    assert_host_clean();
    r
}

fn run(lang: &str, src: &str) -> Report {
    run_with(lang, src, None, |_| {})
}

/// Nothing of this process's boxes is left: no tmpfs mount, no box directory, no cgroup.
fn assert_host_clean() {
    let me = format!("{}-", std::process::id());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let left: Vec<&str> = mounts
        .lines()
        .filter(|l| l.contains("/labrelay-sandbox/") && l.contains(&format!("/{me}")))
        .collect();
    assert!(left.is_empty(), "mounts left: {left:?}");
    let dir = Path::new("/run/labrelay-sandbox");
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        assert!(!n.starts_with(&me), "box directory left: {n}");
    }
    for c in ["memory", "pids", "cpuacct", "unified", ""] {
        let p = Path::new("/sys/fs/cgroup").join(c).join("labrelay-sandbox");
        for e in std::fs::read_dir(&p).into_iter().flatten().flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            assert!(!n.starts_with(&me), "cgroup left: {}", e.path().display());
        }
    }
}

/// Processes on the host whose command line contains `marker`.
fn host_processes_with(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if !e
            .file_name()
            .to_string_lossy()
            .chars()
            .all(|c| c.is_ascii_digit())
        {
            continue;
        }
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(marker) {
                found.push(format!("{}: {cmd}", e.file_name().to_string_lossy()));
            }
        }
    }
    found
}

#[test]
fn fork_bomb_hits_the_process_limit() {
    let r = run(
        "python",
        "import os, time\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        time.sleep(0.01)\n",
    );
    // The fork bomb never ends by itself: the time limit ends it, the process limit held.
    assert_eq!(r.status, Status::TimeLimitExceeded, "{r:?}");
    assert!(
        r.message.as_deref().unwrap_or("").contains("process limit"),
        "{r:?}"
    );
}

#[test]
fn memory_bomb_is_memory_limit_exceeded() {
    let r = run(
        "python",
        "a = []\nwhile True:\n    a.append(bytearray(16 * 1024 * 1024))\n",
    );
    assert_eq!(r.status, Status::MemoryLimitExceeded, "{r:?}");
    assert!(r.memory_kib >= 200 * 1024, "{r:?}");
}

#[test]
fn one_big_file_stops_at_the_disk_and_file_size_limits() {
    let r = run_with(
        "python",
        "with open('big', 'wb') as f:\n    while True:\n        f.write(b'x' * (1 << 20))\n",
        None,
        |l| {
            l.file_mib = 1024;
            l.memory_mib = 512;
        },
    );
    // The 64 MiB tmpfs is full: ENOSPC.
    assert_eq!(r.status, Status::RuntimeError, "{r:?}");
    assert!(r.stderr.contains("No space left"), "{r:?}");
    let r = run(
        "python",
        "with open('big', 'wb') as f:\n    while True:\n        f.write(b'x' * (1 << 20))\n",
    );
    assert_eq!(r.status, Status::RuntimeError, "{r:?}");
}

#[test]
fn many_small_files_stop_at_the_inode_limit() {
    let r = run(
        "python",
        "import os\ni = 0\nwhile True:\n    open(f'f{i}', 'w').close()\n    i += 1\n",
    );
    assert_eq!(r.status, Status::RuntimeError, "{r:?}");
    assert!(r.stderr.contains("No space left"), "{r:?}");
}

#[test]
fn endless_output_is_output_limit_exceeded() {
    let r = run("bash", "yes 'all work and no play'\n");
    assert_eq!(r.status, Status::OutputLimitExceeded, "{r:?}");
    assert!(r.stdout.len() <= 1024 * 1024, "{}", r.stdout.len());
    let r = run(
        "python",
        "import sys\nwhile True:\n    sys.stderr.write('e' * 65536)\n",
    );
    assert_eq!(r.status, Status::OutputLimitExceeded, "{r:?}");
}

#[test]
fn sleeping_is_time_limit_exceeded_by_the_wall_clock() {
    let started = Instant::now();
    let r = run_with("bash", "sleep 1000\n", None, |l| l.wall_secs = 2.0);
    assert_eq!(r.status, Status::TimeLimitExceeded, "{r:?}");
    assert!(
        r.message.as_deref().unwrap().contains("wall-clock"),
        "{r:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn reading_stdin_without_input_does_not_block() {
    let r = run_with(
        "python",
        "import sys\nprint(len(sys.stdin.read()))\nprint(len(sys.stdin.read()))\n",
        None,
        |l| l.wall_secs = 5.0,
    );
    assert_eq!(r.status, Status::Accepted, "{r:?}");
    assert_eq!(r.stdout, "0\n0\n");
    let r = run_with(
        "bash",
        "read -r a; echo \"got $a\"; read -r b || echo eof\n",
        Some("one\n"),
        |l| l.wall_secs = 5.0,
    );
    assert_eq!(r.stdout, "got one\neof\n", "{r:?}");
}

#[test]
fn busy_loop_is_time_limit_exceeded_by_cpu_time() {
    let r = run_with(
        "c",
        "int main(void){ volatile unsigned long i = 0; for(;;) i++; }\n",
        None,
        |l| {
            l.time_secs = 1.0;
            l.wall_secs = 10.0;
        },
    );
    assert_eq!(r.status, Status::TimeLimitExceeded, "{r:?}");
    assert!(r.message.as_deref().unwrap().contains("CPU"), "{r:?}");
    assert!(r.time_ms >= 1000 && r.time_ms < 3000, "{r:?}");
}

#[test]
fn the_network_is_not_there() {
    let r = run(
        "python",
        r#"import socket, os
for addr in [("127.0.0.1", 5432), ("127.0.0.1", 5672), ("192.0.2.1", 80)]:
    try:
        socket.create_connection(addr, timeout=2)
        print("CONNECTED", addr)
    except OSError as e:
        print("no", addr[1], e.errno)
for path in ["/var/run/postgresql/.s.PGSQL.5432", "/run/mysqld/mysqld.sock"]:
    try:
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        print("CONNECTED", path)
    except OSError as e:
        print("no", path, e.errno)
print(sorted(os.listdir("/sys/class/net")) if os.path.exists("/sys/class/net") else "no sysfs")
"#,
    );
    assert_eq!(r.status, Status::Accepted, "{r:?}");
    assert!(!r.stdout.contains("CONNECTED"), "{}", r.stdout);
    assert!(r.stdout.contains("no 5432 111"), "{}", r.stdout);
    assert!(r.stdout.contains("no 80 101"), "{}", r.stdout);
}

#[test]
fn host_secrets_are_not_readable() {
    // SAFETY of the test: this test's process only; the box must not see it.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("LABRELAY_TEST_SECRET", "s3cr3t-value-77");
    }
    let r = run(
        "python",
        r#"import os
for p in ["/etc/shadow", "/etc/passwd", "/root/.ssh", "/var/lib/postgresql", "/proc/1/environ"]:
    try:
        data = open(p, "rb").read() if not os.path.isdir(p) else os.listdir(p)
        print("READ", p, data[:200])
    except OSError as e:
        print("no", p, e.errno)
print("env", sorted(os.environ))
pids = [p for p in os.listdir("/proc") if p.isdigit()]
print("pids", len(pids))
for p in pids:
    try:
        print(p, open(f"/proc/{p}/cmdline", "rb").read().replace(b"\0", b" ")[:80])
    except OSError:
        pass
print("uid", os.getuid(), os.getgid(), os.getgroups())
print(open("/proc/self/status").read())
"#,
    );
    assert_eq!(r.status, Status::Accepted, "{r:?}");
    let out = &r.stdout;
    assert!(!out.contains("s3cr3t-value-77"), "{out}");
    assert!(out.contains("no /etc/shadow 2"), "{out}");
    assert!(out.contains("no /root/.ssh 2"), "{out}");
    assert!(
        out.contains("env ['HOME', 'LANG', 'PATH', 'PWD', 'TMPDIR']"),
        "{out}"
    );
    // Only the box's own processes: the box's init and the program.
    let pids: usize = out
        .lines()
        .find_map(|l| l.strip_prefix("pids "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(pids <= 3, "{out}");
    assert!(out.contains("uid 65534 65534"), "{out}");
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
    assert!(out.contains("CapEff:\t0000000000000000"), "{out}");
    assert!(out.contains("Seccomp:\t2"), "{out}");
}

#[test]
fn dev_holds_only_harmless_devices_and_is_read_only() {
    let r = run(
        "python",
        r#"import os
print("dev", sorted(os.listdir("/dev")))
for p in ["/dev/x", "/dev/null2"]:
    try:
        open(p, "w")
        print("CREATED", p)
    except OSError as e:
        print("no", p, e.errno)
try:
    os.mknod("/box/tmp/sda", 0o600 | 0o060000, os.makedev(8, 0))
    print("MKNOD")
except OSError as e:
    print("no mknod", e.errno)
try:
    os.remove("/dev/null")
    print("REMOVED")
except OSError as e:
    print("no remove", e.errno)
open("/dev/null", "w").write("x" * 1000)
print("zero", open("/dev/zero", "rb").read(4) == bytes(4))
print("urandom", len(open("/dev/urandom", "rb").read(16)))
open("/dev/shm/seg", "w").write("shared")
print("shm", open("/box/tmp/seg").read())
print("fd", sorted(os.listdir("/dev/fd")) [:3])
"#,
    );
    assert_eq!(r.status, Status::Accepted, "{r:?}");
    let out = &r.stdout;
    assert!(
        out.contains(
            "dev ['fd', 'full', 'null', 'random', 'shm', 'stderr', 'stdin', 'stdout', 'urandom', 'zero']"
        ),
        "{out}"
    );
    // EROFS for a new file in /dev and for removing a node; EPERM for mknod.
    assert!(out.contains("no /dev/x 30"), "{out}");
    assert!(out.contains("no /dev/null2 30"), "{out}");
    assert!(out.contains("no mknod 1"), "{out}");
    assert!(out.contains("no remove 30"), "{out}");
    assert!(out.contains("zero True"), "{out}");
    assert!(out.contains("urandom 16"), "{out}");
    assert!(out.contains("shm shared"), "{out}");
    assert!(out.contains("fd ['0', '1', '2']"), "{out}");
}

#[test]
fn denied_system_calls_fail() {
    let r = run(
        "python",
        r#"import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
# ptrace(PTRACE_TRACEME), unshare(CLONE_NEWUSER), mount, keyctl, bpf, perf_event_open
for name, nr, args in [("ptrace", 101, (0, 0, 0, 0)), ("unshare", 272, (0x10000000,)),
                       ("mount", 165, (0, 0, 0, 0, 0)), ("keyctl", 250, (0, 0)),
                       ("bpf", 321, (0, 0, 0)), ("perf_event_open", 298, (0, 0, 0, 0, 0))]:
    r = libc.syscall(nr, *args)
    print(name, r, ctypes.get_errno())
"#,
    );
    assert_eq!(r.status, Status::Accepted, "{r:?}");
    for name in [
        "ptrace",
        "unshare",
        "mount",
        "keyctl",
        "bpf",
        "perf_event_open",
    ] {
        assert!(
            r.stdout.contains(&format!("{name} -1 1\n")),
            "{name} was not refused with EPERM: {}",
            r.stdout
        );
    }
}

#[test]
fn a_symlink_planted_in_the_box_is_never_followed_by_the_host() {
    let before = std::fs::read("/etc/passwd").unwrap();
    let r = run(
        "bash",
        "rm -rf /box/tmp; ln -s /etc /box/tmp; ln -s /etc/passwd /box/stdout; \
         ln -s /etc/passwd /box/main.sh.out; ln -s / /box/root; mkdir -p d; ln -s /etc d/x; echo planted\n",
    );
    assert_eq!(r.status, Status::Accepted, "{r:?}");
    assert_eq!(r.stdout, "planted\n");
    assert_eq!(std::fs::read("/etc/passwd").unwrap(), before);
    assert!(Path::new("/etc/hostname").exists() || Path::new("/etc/passwd").exists());
}

#[test]
fn a_daemon_does_not_outlive_the_run() {
    let marker = "4242.123";
    let r = run(
        "bash",
        &format!(
            "setsid bash -c 'sleep {marker} & disown' </dev/null >/dev/null 2>&1 &\n( ( sleep {marker} & ) & )\necho started\n"
        ),
    );
    assert_eq!(r.status, Status::Accepted, "{r:?}");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        host_processes_with(&format!("sleep {marker}")),
        Vec::<String>::new()
    );
}

#[test]
fn killing_everything_it_sees_kills_only_the_box() {
    // A process of the box's own uid outside the box.
    let mut outside = std::process::Command::new("setpriv")
        .args([
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            "sleep",
            "77.5",
        ])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let r = run("bash", "kill -9 -1; echo survived\n");
    // bash itself may be among the killed: either way the box ends, nothing else.
    assert!(
        matches!(r.status, Status::Accepted | Status::RuntimeError),
        "{r:?}"
    );
    assert!(
        outside.try_wait().unwrap().is_none(),
        "the outside process was killed"
    );
    outside.kill().unwrap();
    let _ = outside.wait();
}

#[test]
fn compile_bombs_are_compilation_errors() {
    let sb = sandbox();
    let c = sb.settings().language("c").unwrap();
    let mut l = c.clone();
    l.compile_limits.time_secs = 5.0;
    l.compile_limits.wall_secs = 10.0;
    let go = |src: &str| {
        sb.run(
            &Request {
                language: &l,
                source: src.as_bytes(),
                stdin: None,
                expected: None,
                limits: l.limits,
            },
            &AtomicBool::new(false),
        )
    };
    let r = go("#include \"/dev/random\"\nint main(void){return 0;}\n");
    assert_eq!(r.status, Status::CompilationError, "{r:?}");
    // A huge initialised array: the assembler's object file hits the compile step's
    // file size limit.
    let r = go("char a[1024 * 1024 * 1024] = {1};\nint main(void){return a[0];}\n");
    assert_eq!(r.status, Status::CompilationError, "{r:?}");
    assert!(r.compile_output.contains("File size limit"), "{r:?}");
    // Template recursion: the compiler's own memory or time limit.
    let cpp = sb.settings().language("cpp").unwrap();
    let mut l2 = cpp.clone();
    l2.compile_limits.time_secs = 5.0;
    l2.compile_limits.wall_secs = 10.0;
    l2.compile_limits.memory_mib = 256;
    let r = sb.run(
        &Request {
            language: &l2,
            source: b"template<int N> struct F { static const long v = F<N-1>::v + F<N-2>::v; };\n\
template<> struct F<0> { static const long v = 0; }; template<> struct F<1> { static const long v = 1; };\n\
int main(){ return F<90000>::v; }\n",
            stdin: None,
            expected: None,
            limits: l2.limits,
        },
        &AtomicBool::new(false),
    );
    assert_eq!(r.status, Status::CompilationError, "{r:?}");
    assert_host_clean();
}

#[test]
fn hostile_file_names_inside_the_box_do_no_harm() {
    let r = run(
        "python",
        r#"import os
names = ["$(touch pwned)", "`id`", "a\nb", "..\u202e", "-rf", " ", "x" * 255, "\\", "\x01\x02"]
for n in names:
    open(n, "w").write("x")
os.makedirs("deep/" * 40, exist_ok=True)
print(len(os.listdir(".")))
"#,
    );
    assert_eq!(r.status, Status::Accepted, "{r:?}");
    assert!(!Path::new("/tmp/pwned").exists());
}

#[test]
fn the_box_init_is_out_of_reach() {
    // The direct launcher's init is a copy of the host process (its memory and
    // environment): the program must not read it, signal it or trace it.
    // SAFETY of the test: this test's process only; the box must not see it.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("LABRELAY_TEST_INIT_SECRET", "init-s3cr3t-91");
    }
    let r = run(
        "python",
        r#"import os, signal
for f in ["environ", "maps", "mem", "cmdline", "stack", "fd"]:
    p = "/proc/1/" + f
    try:
        data = os.listdir(p) if f == "fd" else open(p, "rb").read(4096)
        print("READ", f, data[:400])
    except OSError as e:
        print("no", f, e.errno)
for sig in [signal.SIGKILL, signal.SIGTERM, signal.SIGSTOP]:
    try:
        os.kill(1, sig)
        print("signalled", int(sig))
    except OSError as e:
        print("no signal", int(sig), e.errno)
print("alive")
"#,
    );
    assert_eq!(r.status, Status::Accepted, "{r:?}");
    let out = &r.stdout;
    assert!(!out.contains("init-s3cr3t-91"), "{out}");
    assert!(out.contains("alive"), "{out}");
    if settings().sandbox.launcher == "direct" {
        for f in ["environ", "maps", "mem", "stack", "fd"] {
            assert!(out.contains(&format!("no {f} 13")), "{f}: {out}");
        }
        for sig in [9, 15, 19] {
            assert!(out.contains(&format!("no signal {sig} 1")), "{sig}: {out}");
        }
    }
}

#[test]
fn a_missing_program_fails_closed() {
    let sb = sandbox();
    let mut lang = sb.settings().language("python").unwrap().clone();
    lang.run = vec!["no-such-interpreter-x".into(), "main.py".into()];
    let r = sb.run(
        &Request {
            language: &lang,
            source: b"print(1)\n",
            stdin: None,
            expected: None,
            limits: lang.limits,
        },
        &AtomicBool::new(false),
    );
    assert_host_clean();
    assert_eq!(r.status, Status::InternalError, "{r:?}");
    let m = r.message.unwrap_or_default();
    assert!(m.contains("the box could not be set up"), "{m}");
    assert!(m.contains("No such file"), "{m}");
}

#[test]
fn a_mount_below_a_read_only_bind_is_read_only_too() {
    // A host directory bound into every box, with a writable tmpfs mounted inside it.
    let dir = std::path::PathBuf::from(format!("/var/tmp/labrelay-rec-{}", std::process::id()));
    let sub = dir.join("sub");
    std::fs::create_dir_all(&sub).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m,mode=0777", "labrelay-rec"])
        .arg(&sub)
        .status()
        .unwrap();
    assert!(mounted.success());
    let mut s = settings();
    s.sandbox.binds.push(dir.clone());
    let sb = Sandbox::new(s).unwrap();
    let l = sb.settings().language("python").unwrap();
    let src = format!(
        "import os\nfor d in [{:?}, {:?}]:\n    try:\n        open(d + '/f', 'w').write('x')\n        print('WROTE', d)\n    except OSError as e:\n        print('no', d, e.errno)\n",
        dir.display().to_string(),
        sub.display().to_string()
    );
    let r = sb.run(
        &Request {
            language: l,
            source: src.as_bytes(),
            stdin: None,
            expected: None,
            limits: l.limits,
        },
        &AtomicBool::new(false),
    );
    let _ = std::process::Command::new("umount").arg(&sub).status();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(r.status, Status::Accepted, "{r:?}");
    assert!(!r.stdout.contains("WROTE"), "{}", r.stdout);
    assert_eq!(
        r.stdout.matches(" 30\n").count(),
        2,
        "EROFS twice: {}",
        r.stdout
    );
}
