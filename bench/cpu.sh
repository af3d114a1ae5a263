# shellcheck shell=bash
# CPU accounting for the benchmarks (bench/README.md), sourced by jobs.sh and sync.sh:
# seconds of CPU a server has used so far, its processes alive now plus what its exited
# children used (a backend per connection), and the CPU of the calling shell's
# waited-for children. Needs WORK (a scratch directory) set by the caller.
CLK=$(getconf CLK_TCK)
tree_cpu() { # PID -> utime+stime of PID, its live children, and its reaped children
    local pid=$1 t=0 p
    [[ -n $pid ]] || { echo 0; return; }
    t=$(awk '{ print $14 + $15 + $16 + $17 }' "/proc/$pid/stat")
    for p in $(pgrep -P "$pid"); do
        t=$((t + $(awk '{ print $14 + $15 }' "/proc/$p/stat" 2>/dev/null || echo 0)))
    done
    echo "$t"
}
pg_cpu() { tree_cpu "$(pgrep -o -x postgres)"; }
my_cpu() { tree_cpu "$(pgrep -o -x mariadbd)"; }
mq_cpu() { tree_cpu "$(pgrep -o -x beam.smp)"; }
# CPU of this shell's waited-for children so far, in ticks, into KIDS.
# `times` must run in the calling shell itself, not in a $(...) subshell.
kids_cpu() {
    times > "$WORK/times.txt"
    KIDS=$(awk -v clk="$CLK" 'NR == 2 { gsub(/[ms]/, " "); split($0, a, " "); print int((a[1] * 60 + a[2] + a[3] * 60 + a[4]) * clk) }' "$WORK/times.txt")
}
