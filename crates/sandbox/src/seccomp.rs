//! The seccomp filter every box runs under: a classic BPF program (handed to bubblewrap
//! with `--seccomp FD`) that denies the system calls a submitted program never needs.
//! A call of another architecture (or the x32 ABI) kills the process; a denied call
//! fails with EPERM; `clone3` fails with ENOSYS so the C library falls back to `clone`,
//! whose flags the filter can see: a new namespace is refused.

/// `struct sock_filter`.
#[derive(Debug, Clone, Copy)]
struct Insn {
    code: u16,
    jt: u8,
    jf: u8,
    k: u32,
}

const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const JGE_K: u16 = 0x35; // BPF_JMP | BPF_JGE | BPF_K
const JSET_K: u16 = 0x45; // BPF_JMP | BPF_JSET | BPF_K
const RET_K: u16 = 0x06; // BPF_RET | BPF_K

const RET_KILL_PROCESS: u32 = 0x8000_0000;
const RET_ERRNO: u32 = 0x0005_0000;
const RET_ALLOW: u32 = 0x7fff_0000;

const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
/// Low 32 bits of args[0] (little-endian).
const OFF_ARG0_LO: u32 = 16;

/// Every `CLONE_NEW*` flag.
const CLONE_NEW_ANY: u32 = 0x0002_0000 // NEWNS
    | 0x0200_0000 // NEWCGROUP
    | 0x0400_0000 // NEWUTS
    | 0x0800_0000 // NEWIPC
    | 0x1000_0000 // NEWUSER
    | 0x2000_0000 // NEWPID
    | 0x4000_0000 // NEWNET
    | 0x0000_0080; // NEWTIME

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7;

/// The denied calls, by name (for the docs and the tests) and number.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub fn denied() -> Vec<(&'static str, i64)> {
    macro_rules! calls {
        ($($name:ident),* $(,)?) => { vec![$((stringify!($name), libc::$name as i64)),*] };
    }
    #[allow(unused_mut)]
    let mut v = calls![
        SYS_ptrace,
        SYS_mount,
        SYS_umount2,
        SYS_pivot_root,
        SYS_chroot,
        SYS_swapon,
        SYS_swapoff,
        SYS_reboot,
        SYS_kexec_load,
        SYS_kexec_file_load,
        SYS_init_module,
        SYS_finit_module,
        SYS_delete_module,
        SYS_keyctl,
        SYS_add_key,
        SYS_request_key,
        SYS_bpf,
        SYS_perf_event_open,
        SYS_userfaultfd,
        SYS_unshare,
        SYS_setns,
        SYS_process_vm_readv,
        SYS_process_vm_writev,
        SYS_open_by_handle_at,
        SYS_name_to_handle_at,
        SYS_acct,
        SYS_settimeofday,
        SYS_clock_settime,
        SYS_clock_adjtime,
        SYS_adjtimex,
        SYS_syslog,
        SYS_quotactl,
        SYS_fanotify_init,
        SYS_io_uring_setup,
        SYS_io_uring_enter,
        SYS_io_uring_register,
        SYS_kcmp,
        SYS_fsopen,
        SYS_fsmount,
        SYS_fsconfig,
        SYS_fspick,
        SYS_move_mount,
        SYS_open_tree,
        SYS_mount_setattr,
        SYS_pidfd_getfd,
        SYS_sethostname,
        SYS_setdomainname,
    ];
    #[cfg(target_arch = "x86_64")]
    v.extend(calls![SYS_iopl, SYS_ioperm, SYS_lookup_dcookie, SYS_uselib]);
    v
}

/// The filter as the bytes of a `struct sock_filter` array, or why there is none.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub fn program() -> Result<Vec<u8>, String> {
    let eperm = RET_ERRNO | libc::EPERM as u32;
    let enosys = RET_ERRNO | libc::ENOSYS as u32;
    let ld = |k| Insn {
        code: LD_W_ABS,
        jt: 0,
        jf: 0,
        k,
    };
    let ret = |k| Insn {
        code: RET_K,
        jt: 0,
        jf: 0,
        k,
    };
    let jeq = |k: i64, jt, jf| Insn {
        code: JEQ_K,
        jt,
        jf,
        k: k as u32,
    };
    let mut p = vec![
        ld(OFF_ARCH),
        jeq(i64::from(AUDIT_ARCH), 1, 0),
        ret(RET_KILL_PROCESS),
        ld(OFF_NR),
    ];
    #[cfg(target_arch = "x86_64")]
    p.extend([
        // The x32 ABI (numbers with bit 30 set) would bypass the numbers below.
        Insn {
            code: JGE_K,
            jt: 0,
            jf: 1,
            k: 0x4000_0000,
        },
        ret(RET_KILL_PROCESS),
    ]);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = JGE_K;
    for (_, nr) in denied() {
        p.push(jeq(nr, 0, 1));
        p.push(ret(eperm));
    }
    p.extend([
        jeq(libc::SYS_clone3, 0, 1),
        ret(enosys),
        jeq(libc::SYS_clone, 0, 4),
        ld(OFF_ARG0_LO),
        Insn {
            code: JSET_K,
            jt: 0,
            jf: 1,
            k: CLONE_NEW_ANY,
        },
        ret(eperm),
        ret(RET_ALLOW),
        ret(RET_ALLOW),
    ]);
    let mut out = Vec::with_capacity(p.len() * 8);
    for i in p {
        out.extend_from_slice(&i.code.to_ne_bytes());
        out.push(i.jt);
        out.push(i.jf);
        out.extend_from_slice(&i.k.to_ne_bytes());
    }
    Ok(out)
}

/// No filter is built for other architectures: boxes fail closed.
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
pub fn program() -> Result<Vec<u8>, String> {
    Err("no seccomp filter is built for this architecture".into())
}

/// No filter is built for other architectures.
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
pub fn denied() -> Vec<(&'static str, i64)> {
    Vec::new()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_program_is_whole_instructions_and_short_enough() {
        let p = super::program().unwrap();
        assert_eq!(p.len() % 8, 0);
        // BPF_MAXINSNS is 4096; jumps are 8-bit, so every jump must be local.
        assert!(p.len() / 8 < 256, "{}", p.len() / 8);
        assert!(super::denied().iter().any(|(n, _)| *n == "SYS_ptrace"));
    }
}
