/* bench/sandbox-floor.c: the kernel's floor for one box on a cgroup v1 host, in plain C
 * with nothing but the mechanisms the sandbox uses, so bench/sandbox.sh can show what a
 * box costs before any supervisor (bubblewrap, code-submit) adds its share:
 *   host: three cgroups (memory with a limit, pids with a limit, cpuacct), a size- and
 *     inode-limited tmpfs for the box, the file copied in;
 *   child: enters the cgroups; new mount, PID, IPC, UTS, network and cgroup namespaces;
 *   its child (PID 1 of the box): a tmpfs root with /usr and five /etc files bound
 *     read-only, the shared read-only /dev, a new /proc, the box; pivot_root; the root
 *     made read-only; uid/gid 65534 on the host, then a user namespace mapping only it;
 *     NO_NEW_PRIVS; exec;
 *   host: reads the CPU time and peak memory, removes the cgroups, unmounts the box.
 * Left out (microseconds each here): the seccomp filter, rlimits, dropping the bounding
 * set. Usage (root): sandbox-floor CGROUP_ROOT BOXDIR FILE PROGRAM [ARGS...] runs PROGRAM
 * in /box with FILE copied there; BOXDIR/dev must hold the device nodes. Exit status:
 * the program's, 125 when the floor itself failed. */
#define _GNU_SOURCE
#include <errno.h>
#include <grp.h>
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <sys/syscall.h>
#include <unistd.h>

static void die(const char *what) { perror(what); exit(125); }
static void put(const char *path, const char *v) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0 || write(fd, v, strlen(v)) != (ssize_t)strlen(v)) die(path);
    close(fd);
}

int main(int argc, char **argv) {
    if (argc < 5) { fprintf(stderr, "usage: floor CGROUP_ROOT BOXDIR FILE PROGRAM [ARGS...]\n"); return 2; }
    const char *ctl[] = {"memory", "pids", "cpuacct"};
    char dirs[3][512], p[1024], box[512];
    snprintf(box, sizeof box, "%s/floor-%d", argv[2], getpid());
    for (int i = 0; i < 3; i++) {
        snprintf(dirs[i], sizeof dirs[i], "%s/%s/floor-%d", argv[1], ctl[i], getpid());
        if (mkdir(dirs[i], 0755)) die(dirs[i]);
    }
    snprintf(p, sizeof p, "%s/memory.limit_in_bytes", dirs[0]); put(p, "268435456");
    snprintf(p, sizeof p, "%s/pids.max", dirs[1]); put(p, "64");
    if (mkdir(box, 0700)) die(box);
    if (mount("floor", box, "tmpfs", MS_NOSUID | MS_NODEV, "size=64m,nr_inodes=4096,uid=65534,gid=65534"))
        die("mount box");
    {
        const char *base = strrchr(argv[3], '/') ? strrchr(argv[3], '/') + 1 : argv[3];
        char dst[1024], buf[65536];
        snprintf(dst, sizeof dst, "%s/%s", box, base);
        int in = open(argv[3], O_RDONLY | O_CLOEXEC), out = open(dst, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
        if (in < 0 || out < 0) die(argv[3]);
        ssize_t n;
        while ((n = read(in, buf, sizeof buf)) > 0) if (write(out, buf, n) != n) die(dst);
        close(in);
        close(out);
    }
    int procs[3];
    for (int i = 0; i < 3; i++) {
        snprintf(p, sizeof p, "%s/cgroup.procs", dirs[i]);
        if ((procs[i] = open(p, O_WRONLY | O_CLOEXEC)) < 0) die(p);
    }
    pid_t c = fork();
    if (c < 0) die("fork");
    if (c == 0) {
        for (int i = 0; i < 3; i++) if (write(procs[i], "0", 1) != 1) die("cgroup.procs");
        if (unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWNET | CLONE_NEWCGROUP))
            die("unshare");
        pid_t g = fork();
        if (g < 0) die("fork 2");
        if (g > 0) { int st; waitpid(g, &st, 0); _exit(WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st)); }
        if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL)) die("private");
        /* A new root: a tmpfs with the toolchain and a few /etc files bound read-only,
         * the shared /dev, a new /proc, the box; then pivot into it and drop the old one. */
        char root[600];
        snprintf(root, sizeof root, "%s/floor-root", argv[2]);
        mkdir(root, 0755);
        if (mount("floor-root", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")) die("root");
        if (chdir(root)) die("chdir root");
        const char *dirs_in[] = {"usr", "etc", "proc", "dev", "box", "oldroot"};
        for (size_t i = 0; i < sizeof dirs_in / sizeof *dirs_in; i++) mkdir(dirs_in[i], 0755);
        if (symlink("usr/lib", "lib") || symlink("usr/lib64", "lib64") || symlink("usr/bin", "bin"))
            die("symlink");
        const char *ro[][2] = {{"/usr", "usr"}, {"/etc/alternatives", "etc/alternatives"},
            {"/etc/ld.so.cache", "etc/ld.so.cache"}, {"/etc/ld.so.conf", "etc/ld.so.conf"},
            {"/etc/ld.so.conf.d", "etc/ld.so.conf.d"}, {"/etc/localtime", "etc/localtime"}};
        for (size_t i = 0; i < sizeof ro / sizeof *ro; i++) {
            struct stat sb;
            if (stat(ro[i][0], &sb)) continue;
            if (S_ISDIR(sb.st_mode)) mkdir(ro[i][1], 0755); else close(open(ro[i][1], O_CREAT | O_WRONLY, 0644));
            if (mount(ro[i][0], ro[i][1], NULL, MS_BIND | MS_REC, NULL)) die(ro[i][0]);
            if (mount(NULL, ro[i][1], NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, NULL))
                die("remount ro");
        }
        if (mount("proc", "proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL)) die("proc");
        char dev[600];
        snprintf(dev, sizeof dev, "%s/dev", argv[2]);
        if (mount(dev, "dev", NULL, MS_BIND, NULL)) die("dev");
        if (mount(box, "box", NULL, MS_BIND, NULL)) die("box");
        if (syscall(SYS_pivot_root, ".", "oldroot")) die("pivot_root");
        if (umount2("/oldroot", MNT_DETACH)) die("umount old root");
        rmdir("/oldroot");
        if (mount(NULL, "/", NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, NULL))
            die("root ro");
        if (chdir("/box")) die("chdir");
        /* The box user on the host, then a user namespace of its own mapping only it. */
        if (setgroups(0, NULL) || setresgid(65534, 65534, 65534) || setresuid(65534, 65534, 65534))
            die("drop to 65534");
        /* A uid change clears dumpable, which makes /proc/self root-owned. */
        if (prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)) die("dumpable");
        if (unshare(CLONE_NEWUSER)) die("userns");
        put("/proc/self/setgroups", "deny");
        put("/proc/self/uid_map", "65534 65534 1");
        put("/proc/self/gid_map", "65534 65534 1");
        if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)) die("no_new_privs");
        execv(argv[4], argv + 4);
        die("exec");
    }
    int st;
    waitpid(c, &st, 0);
    char buf[64];
    snprintf(p, sizeof p, "%s/cpuacct.usage", dirs[2]);
    int fd = open(p, O_RDONLY); if (fd >= 0) { (void)!read(fd, buf, sizeof buf); close(fd); }
    snprintf(p, sizeof p, "%s/memory.max_usage_in_bytes", dirs[0]);
    fd = open(p, O_RDONLY); if (fd >= 0) { (void)!read(fd, buf, sizeof buf); close(fd); }
    for (int i = 0; i < 3; i++) { close(procs[i]); while (rmdir(dirs[i]) && errno == EBUSY) usleep(100); }
    umount2(box, MNT_DETACH);
    rmdir(box);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 1;
}
