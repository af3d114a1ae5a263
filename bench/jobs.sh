#!/usr/bin/env bash
# job-worker benchmark (issue 11), release build, on the embedded SQLite state database
# and on PostgreSQL:
#
#   1. submit: N `noop` jobs with `code-submit task noop --each -` (one JSON line per
#      job, one multi-row INSERT per 1,000): jobs/s.
#   2. drain: 2 `job-worker run --once --concurrency 64` processes until the queue is
#      empty: jobs/s.
#   3. latency: an idle `job-worker run` (PostgreSQL wakes it with NOTIFY, SQLite polls
#      every poll_ms = 50) while 200 jobs are submitted one at a time; submit -> start
#      from the job rows (created_ms, started_ms): p50, p99.
#
# Targets (issue 11): drain >= 10,000 jobs/s on SQLite and >= 20,000 on PostgreSQL;
# latency p50 <= 5 ms on PostgreSQL. The Celery side-by-side run of the issue is not
# part of this script yet.
#
#   bench/jobs.sh               # N = 100,000
#   bench/jobs.sh --quick       # N = 20,000
#   bench/jobs.sh --no-build    # use target/release as it is
#
# Exit 0 when every run worked (whatever the figures), 1 when one failed, 2 on bad
# arguments. Talks only to 127.0.0.1 (the servers of scripts/services).
set -euo pipefail

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }

quick=0 build=1
while (($#)); do
    case $1 in
    --quick) quick=1 ;;
    --no-build) build=0 ;;
    -h | --help) usage; exit 0 ;;
    *) printf 'jobs.sh: unknown argument %s\n\n' "$1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
if ((quick)); then N=20000; else N=100000; fi
LAT_N=200
T_SQLITE=10000 T_PG=20000 T_P50_MS=5

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
say() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { printf 'jobs.sh: %s\n' "$*" >&2; exit 1; }
calc() { awk "BEGIN { printf \"%.${2:-1}f\", $1 }"; }
mark() { if awk "BEGIN { exit !($1) }"; then echo PASS; else echo FAIL; fi; }
now() { date +%s.%N; }
command -v psql >/dev/null || die "psql is missing (apt-get install postgresql-client)"

say "services"
scripts/services >/dev/null
set -a
# shellcheck disable=SC1091
source target/services.env
set +a
if ((build)); then
    say "cargo build --release -p job-worker -p code-submit"
    cargo build -q --release -p job-worker -p code-submit
fi
BIN=$REPO/target/release
[[ -x $BIN/job-worker && -x $BIN/code-submit ]] || die "release binaries are missing (run without --no-build)"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/lr-jobs-bench.XXXXXX")
PG_ADMIN=$LABRELAY_TEST_PG_URL
PGDB=lr_jobs_bench_$$
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    psql -q "$PG_ADMIN" -c "DROP DATABASE IF EXISTS $PGDB WITH (FORCE)" >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT
psql -q "$PG_ADMIN" -c "CREATE DATABASE $PGDB" >/dev/null

declare -A SUBMIT DRAIN P50 P99
for engine in sqlite postgres; do
    if [[ $engine == sqlite ]]; then
        state="sqlite://$WORK/sqlite/state.db?mode=rwc"
        mkdir -p "$WORK/sqlite"
    else
        state="${PG_ADMIN%/*}/$PGDB"
    fi
    cfg=$WORK/$engine.toml
    cat > "$cfg" <<TOML
[paths]
data_dir = "$WORK/$engine"
[state]
url = "$state"
[jobs]
poll_ms = 50
TOML
    jw() { "$BIN/job-worker" --config "$cfg" "$@"; }
    cs() { "$BIN/code-submit" --config "$cfg" "$@"; }

    say "$engine: 1. submit $N noop jobs"
    t0=$(now)
    awk -v n="$N" 'BEGIN { for (i = 0; i < n; i++) print "{}" }' | cs task noop --each - > /dev/null
    t1=$(now)
    SUBMIT[$engine]=$(calc "$N / ($t1 - $t0)" 0)

    say "$engine: 2. drain with 2 workers"
    t0=$(now)
    "$BIN/job-worker" --config "$cfg" -q run --once --concurrency 64 > /dev/null & w1=$!
    "$BIN/job-worker" --config "$cfg" -q run --once --concurrency 64 > /dev/null & w2=$!
    wait "$w1" "$w2"
    t1=$(now)
    DRAIN[$engine]=$(calc "$N / ($t1 - $t0)" 0)
    left=$(jw --json stats | python3 -c 'import json, sys; print(sum(json.loads(l)["queued"] + json.loads(l)["running"] for l in sys.stdin))')
    [[ $left == 0 ]] || die "$engine: $left jobs left after the drain"

    say "$engine: 3. submit -> start latency, $LAT_N jobs one at a time"
    "$BIN/job-worker" --config "$cfg" -q run --concurrency 4 > /dev/null & PIDS+=($!)
    sleep 1
    for _ in $(seq "$LAT_N"); do
        cs task noop > /dev/null
        sleep 0.02
    done
    sleep 1
    kill -TERM "${PIDS[@]}"; wait "${PIDS[@]}" 2>/dev/null || true; PIDS=()
    sql="SELECT started_ms - created_ms FROM labrelay_jobs WHERE id > $N ORDER BY 1"
    if [[ $engine == sqlite ]]; then
        lat=$(python3 -c 'import sqlite3, sys; [print(r[0]) for r in sqlite3.connect(sys.argv[1]).execute(sys.argv[2])]' "$WORK/sqlite/state.db" "$sql")
    else
        lat=$(psql -qAt "$state" -c "$sql")
    fi
    read -r P50[$engine] P99[$engine] < <(awk '{ v[NR] = $1 } END { print v[int((NR - 1) * 0.50) + 1], v[int((NR - 1) * 0.99) + 1] }' <<<"$lat")
done

echo
echo "job-worker, $N noop jobs, 2 workers x concurrency 64, release build, $(nproc) cores"
printf '%-12s %12s %12s %10s %10s  %s\n' "state db" "submit/s" "drain/s" "p50 ms" "p99 ms" "targets"
printf '%-12s %12s %12s %10s %10s  %s\n' "SQLite" "${SUBMIT[sqlite]}" "${DRAIN[sqlite]}" "${P50[sqlite]}" "${P99[sqlite]}" \
    "drain >= $T_SQLITE $(mark "${DRAIN[sqlite]} >= $T_SQLITE")"
printf '%-12s %12s %12s %10s %10s  %s\n' "PostgreSQL" "${SUBMIT[postgres]}" "${DRAIN[postgres]}" "${P50[postgres]}" "${P99[postgres]}" \
    "drain >= $T_PG $(mark "${DRAIN[postgres]} >= $T_PG"), p50 <= $T_P50_MS ms $(mark "${P50[postgres]} <= $T_P50_MS")"
