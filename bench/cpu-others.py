#!/usr/bin/env python3
"""Who else used the CPU during a benchmark run?

    cpu-others.py snap FILE                      # utime+stime of every process now
    cpu-others.py top BEFORE AFTER [--exclude PID ...] [--n 3]

`top` prints the processes present in both snapshots that used the most CPU in
between, as `comm(pid) 1.23s, ...` (empty when none used 0.1 s or more). A process's
CPU includes that of the children it reaped meanwhile, so a test binary that ran and
ended within the run shows up under its parent (cargo, nextest, sshd); kernel threads
(kworker for writeback, ksoftirqd) show up too. The tool being measured started after
BEFORE and ended before AFTER, so it is never listed itself; exclude the benchmark's own
shell (which reaps the tool) and Garage by pid.
"""

import os
import sys

TICK = os.sysconf("SC_CLK_TCK")


def snap():
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % pid) as f:
                s = f.read()
        except OSError:
            continue
        comm = s[s.index("(") + 1 : s.rindex(")")]
        fields = s[s.rindex(")") + 2 :].split()
        # fields[0] is field 3 (state); utime, stime, cutime, cstime are fields 14-17;
        # starttime (field 22) tells a reused pid from the same process.
        out[pid] = (comm, sum(int(x) for x in fields[11:15]), fields[19])
    return out


def main():
    args = sys.argv[1:]
    if len(args) == 2 and args[0] == "snap":
        with open(args[1], "w") as f:
            for pid, (comm, ticks, start) in snap().items():
                f.write("%s\t%s\t%d\t%s\n" % (pid, comm.replace("\t", " "), ticks, start))
        return 0
    if len(args) >= 3 and args[0] == "top":
        before, after, rest = args[1], args[2], args[3:]
        exclude, n = set(), 3
        while rest:
            if rest[0] == "--exclude" and len(rest) > 1:
                exclude.add(rest[1])
            elif rest[0] == "--n" and len(rest) > 1:
                n = int(rest[1])
            else:
                print(__doc__, file=sys.stderr)
                return 2
            rest = rest[2:]

        def load(path):
            d = {}
            with open(path) as f:
                for line in f:
                    pid, comm, ticks, start = line.rstrip("\n").split("\t")
                    d[pid] = (comm, int(ticks), start)
            return d

        b, a = load(before), load(after)
        used = []
        for pid, (comm, ticks, start) in a.items():
            if pid in exclude or pid not in b or b[pid][2] != start:
                continue
            delta = (ticks - b[pid][1]) / TICK
            if delta >= 0.1:
                used.append((delta, comm, pid))
        used.sort(reverse=True)
        print(", ".join("%s(%s) %.2fs" % (c, p, d) for d, c, p in used[:n]))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
