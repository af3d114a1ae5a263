#!/usr/bin/env bash
# Sandbox benchmark (issue 12), release build, side by side in one run with hyperfine:
#
#   1. Python `print('hi')`, RUNS runs each: bare (/usr/bin/python3 -S -B, the argv the
#      box uses), in plain `bwrap --unshare-all`, and through `code-submit exec` (a fresh
#      box with every limit: tmpfs mount, cgroups, seccomp, uid, namespaces) with the
#      default direct launcher and with `[sandbox] launcher = "bwrap"`.
#   2. A compiled C hello, RUNS runs each: bare, in plain bwrap, and through
#      `code-submit exec` with the language `elf` (the prebuilt binary run through the
#      dynamic loader, so the figure is the box, not gcc).
#   In both, on cgroup v1 hosts, the kernel's floor: bench/sandbox-floor.c, the same
#      namespaces, mounts, cgroups and uid change in plain C (what any box costs here
#      before a supervisor adds its share).
#   3. End to end: JOBS Python hello submissions (`code-submit add` + `run`, not timed),
#      then `job-worker run --once --concurrency 2` on the embedded SQLite state database
#      until all are done: runs/s.
#
# Prints p50 / mean per command and the overhead over bare (p50). Targets (issue 12):
# overhead over bare <= 10 ms p50 with every limit applied; >= 40 Python runs/s end to
# end on 2 cores.
#
#   bench/sandbox.sh               # RUNS = 200, JOBS = 400
#   bench/sandbox.sh --quick       # RUNS = 50,  JOBS = 100
#   bench/sandbox.sh --no-build    # use target/release as it is
#
# Needs root (the sandbox mounts tmpfs and creates cgroups), bubblewrap and hyperfine
# (scripts/services sandbox installs both). Exit 0 when every run worked (whatever the
# figures), 1 when one failed, 2 on bad arguments.
set -euo pipefail

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }

quick=0 build=1
while (($#)); do
    case $1 in
    --quick) quick=1 ;;
    --no-build) build=0 ;;
    -h | --help) usage; exit 0 ;;
    *) printf 'sandbox.sh: unknown argument %s\n\n' "$1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
if ((quick)); then RUNS=50 JOBS=100; else RUNS=200 JOBS=400; fi
T_OVERHEAD_MS=10 T_RPS=40

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
say() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { printf 'sandbox.sh: %s\n' "$*" >&2; exit 1; }
calc() { awk "BEGIN { printf \"%.${2:-1}f\", $1 }"; }
mark() { if awk "BEGIN { exit !($1) }"; then echo PASS; else echo FAIL; fi; }
now() { date +%s.%N; }

[[ $(id -u) -eq 0 ]] || die "run as root (the sandbox mounts a tmpfs and creates cgroups per box)"
command -v bwrap >/dev/null || die "bubblewrap is missing: scripts/services sandbox"
command -v hyperfine >/dev/null || die "hyperfine is missing: scripts/services sandbox"
PY=/usr/bin/python3
[[ -x $PY ]] || die "$PY is missing: scripts/services sandbox"

if ((build)); then
    say "building code-submit and job-worker (release)"
    cargo build --release -q -p code-submit -p job-worker
fi
BIN=$REPO/target/release
W=$(mktemp -d /tmp/labrelay-bench-sandbox.XXXXXX)
trap 'umount "$W/floor/dev" 2>/dev/null; rm -rf "$W"' EXIT
cd "$W"

printf "print('hi')\n" >hi.py
printf '#include <stdio.h>\nint main(void){puts("hi");return 0;}\n' >hello.c
gcc -O2 -o hello hello.c
cp hello main.bin
LOADER=$(readlink -f /lib64/ld-linux-x86-64.so.2 2>/dev/null || true)
[[ -x $LOADER ]] || LOADER=$(ls /lib/ld-linux-*.so.* 2>/dev/null | head -n1)
cat >config.toml <<TOML
[paths]
data_dir = "$W/data"

[mail]
from = "bench@example.org"

[jobs]
poll_ms = 50

# A prebuilt binary, run through the dynamic loader (the box's files are not executable
# by mode): measures the box around a compiled program without the compiler.
[languages.elf]
source = "main.bin"
run = ["$LOADER", "./main.bin"]
TOML
{ cat config.toml; printf '\n[sandbox]\nlauncher = "bwrap"\n'; } >bwrap.toml
export LABRELAY_CONFIG=$W/config.toml LABRELAY_SYSTEM_CONFIG=/nonexistent
BW=(bwrap --unshare-all --die-with-parent --ro-bind /usr /usr --symlink usr/lib /lib
    --symlink usr/lib64 /lib64 --symlink usr/bin /bin --proc /proc --dev /dev
    --bind "$W" /box --chdir /box)

# The kernel's floor (bench/sandbox-floor.c): the same mechanisms in plain C, with a
# read-only /dev of its own prepared once, as the sandbox does. cgroup v1 hosts only.
FLOOR=()
if [[ -e /sys/fs/cgroup/memory/cgroup.procs && -e /sys/fs/cgroup/pids/cgroup.procs ]]; then
    gcc -O2 -o floor-bin "$REPO/bench/sandbox-floor.c"
    mkdir -p floor/dev
    mount -t tmpfs -o size=16k,nr_inodes=32,mode=0755 labrelay-floor-dev floor/dev
    for d in null:3 zero:5 full:7 random:8 urandom:9; do mknod -m 666 "floor/dev/${d%:*}" c 1 "${d#*:}"; done
    ln -s /proc/self/fd floor/dev/fd
    ln -s /box/tmp floor/dev/shm
    mount -o remount,ro floor/dev
    FLOOR=("$W/floor-bin" /sys/fs/cgroup "$W/floor")
fi

say "checking every command once"
"$BIN/code-submit" exec hi.py --language python >/dev/null || die "code-submit exec hi.py failed"
"$BIN/code-submit" exec main.bin --language elf >/dev/null || die "code-submit exec main.bin failed"
"$BIN/code-submit" --config "$W/bwrap.toml" exec hi.py --language python >/dev/null ||
    die "code-submit exec with launcher = bwrap failed"
"${BW[@]}" "$PY" -S -B hi.py >/dev/null || die "plain bwrap failed"
if ((${#FLOOR[@]})); then
    "${FLOOR[@]}" hi.py "$PY" -S -B hi.py >/dev/null || die "the kernel floor (sandbox-floor.c) failed"
fi

bench() { # NAME CMD... -> results in $W/NAME.json
    local name=$1
    shift
    hyperfine -N --warmup 5 --runs "$RUNS" --export-json "$W/$name.json" "$@" >"$W/$name.log" 2>&1 ||
        { cat "$W/$name.log" >&2; die "hyperfine $name failed"; }
}
say "python: $RUNS runs each of bare, bwrap, code-submit exec (direct, bwrap), the kernel floor"
floor_py=() floor_c=()
if ((${#FLOOR[@]})); then
    floor_py=("${FLOOR[*]} hi.py $PY -S -B hi.py")
    floor_c=("${FLOOR[*]} main.bin $LOADER ./main.bin")
fi
bench python "$PY -S -B hi.py" "${BW[*]} $PY -S -B hi.py" "$BIN/code-submit exec hi.py --language python" \
    "$BIN/code-submit --config $W/bwrap.toml exec hi.py --language python" "${floor_py[@]}"
say "C: $RUNS runs each of bare, bwrap, code-submit exec (direct, bwrap), the kernel floor"
bench c "./hello" "${BW[*]} ./hello" "$BIN/code-submit exec main.bin --language elf" \
    "$BIN/code-submit --config $W/bwrap.toml exec main.bin --language elf" "${floor_c[@]}"

report() { # NAME -> one line per command: p50 mean, overhead over the first (bare)
    python3 - "$W/$1.json" "$1" "$T_OVERHEAD_MS" <<'PY'
import json, statistics, sys
res = json.load(open(sys.argv[1]))["results"]
name, target = sys.argv[2], float(sys.argv[3])
p50 = [statistics.median(r["times"]) * 1000 for r in res]
labels = ["bare", "bwrap --unshare-all", "code-submit exec", "exec, launcher bwrap",
          "kernel floor (C)"]
for label, r, p in zip(labels, res, p50):
    extra = ""
    if label != "bare":
        over = p - p50[0]
        extra = f"  overhead {over:+6.1f} ms"
        if label == "code-submit exec":
            extra += f"  (target <= {target:g} ms: {'PASS' if over <= target else 'FAIL'})"
    print(f"{name:<7} {label:<20} p50 {p:7.1f} ms  mean {r['mean'] * 1000:7.1f} ms{extra}")
PY
}

say "end to end: $JOBS Python submissions, job-worker --concurrency 2"
for i in $(seq 1 "$JOBS"); do
    "$BIN/code-submit" add hi.py --language python --email bench@example.org --id "b$i" >/dev/null
done
for i in $(seq 1 "$JOBS"); do
    "$BIN/code-submit" run "b$i" >/dev/null
done
t0=$(now)
"$BIN/job-worker" run --once --concurrency 2 --queues code >"$W/worker.log" 2>&1 ||
    { tail -5 "$W/worker.log" >&2; die "job-worker failed"; }
t1=$(now)
done_n=$("$BIN/code-submit" --json status --email bench@example.org | grep -c '"status":"Accepted"' || true)
((done_n == JOBS)) || die "only $done_n of $JOBS submissions were Accepted"
secs=$(calc "$t1 - $t0" 3)
rps=$(calc "$JOBS / ($t1 - $t0)" 1)

echo
dyn=off
awk '$9 == "cgroup2"' /proc/self/mountinfo | grep -q favordynmods && dyn=on
echo "== sandbox benchmark ($RUNS runs per command, $(nproc) cores, limits by $("$BIN/code-submit" --json exec hi.py --language python | python3 -c 'import json,sys; print(json.load(sys.stdin)["limits"])'), cgroup favordynmods $dyn)"
report python
report c
echo "end-to-end $JOBS Python hello jobs, concurrency 2: $secs s, $rps runs/s (target >= $T_RPS: $(mark "$rps >= $T_RPS"))"
