#!/usr/bin/env bash
# job-worker benchmark (issue 11), release build, on the embedded SQLite state database,
# on PostgreSQL, and with RabbitMQ as the broker (PostgreSQL holding the rows):
#
#   1. submit: N `noop` jobs with `code-submit task noop --each -` (one JSON line per
#      job, one multi-row INSERT per 1,000): jobs/s.
#   2. drain: 2 `job-worker run --once --concurrency 64` processes until the queue is
#      empty (RabbitMQ: 2 `job-worker run --concurrency 64`, which publish and consume,
#      until `stats` shows nothing queued or running): jobs/s.
#   3. latency: an idle `job-worker run` (PostgreSQL wakes it with NOTIFY, SQLite polls
#      every poll_ms = 50) while 200 jobs are submitted one at a time; submit -> start
#      from the job rows (created_ms, started_ms): p50, p99.
#
#   4. Celery 5 (pip install celery, bench/celery_noop.py) on the same RabbitMQ: 20,000
#      (--quick: 5,000) no-op tasks with ignore_result enqueued, then drained by
#      `celery worker` with its default prefork pool (concurrency 2) and with -P solo,
#      timed from the worker's start until the queue is empty.
#
# Targets (issue 11): drain >= 10,000 jobs/s on SQLite and >= 20,000 on PostgreSQL;
# latency p50 <= 5 ms on PostgreSQL; on RabbitMQ >= 10x Celery's prefork and >= 5x its
# solo drain.
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
if ((quick)); then N=20000 CN=5000; else N=100000 CN=20000; fi
LAT_N=200
T_SQLITE=10000 T_PG=20000 T_P50_MS=5

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
say() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { printf 'jobs.sh: %s\n' "$*" >&2; exit 1; }
calc() { awk "BEGIN { printf \"%.${2:-1}f\", $1 }"; }
mark() { if awk "BEGIN { exit !($1) }"; then echo PASS; else echo FAIL; fi; }
now() { date +%s.%N; }
# CPU accounting: tree_cpu, pg_cpu, mq_cpu, kids_cpu.
# shellcheck source=bench/cpu.sh
source "$REPO/bench/cpu.sh"
command -v psql >/dev/null || die "psql is missing (apt-get install postgresql-client)"
command -v rabbitmqctl >/dev/null || die "rabbitmqctl is missing (run scripts/services)"
python3 -c 'import celery' 2>/dev/null || python3 -m pip install -q 'celery>=5,<6' || die "cannot install celery"

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
JOBQ=bench_$$
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    psql -q "$PG_ADMIN" -c "DROP DATABASE IF EXISTS $PGDB WITH (FORCE)" >/dev/null 2>&1 || true
    psql -q "$PG_ADMIN" -c "DROP DATABASE IF EXISTS ${PGDB}_r WITH (FORCE)" >/dev/null 2>&1 || true
    timeout 30 rabbitmqctl -q delete_queue "labrelay.jobs.$JOBQ" >/dev/null 2>&1 || true
    timeout 30 rabbitmqctl -q delete_queue "labrelay.jobs.$JOBQ.dead" >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT
psql -q "$PG_ADMIN" -c "CREATE DATABASE $PGDB" >/dev/null
psql -q "$PG_ADMIN" -c "CREATE DATABASE ${PGDB}_r" >/dev/null

declare -A SUBMIT DRAIN P50 P99 CPU_W CPU_PG CPU_MQ
for engine in sqlite postgres rabbitmq; do
    broker=
    case $engine in
    sqlite)
        state="sqlite://$WORK/sqlite/state.db?mode=rwc"
        mkdir -p "$WORK/sqlite" ;;
    postgres) state="${PG_ADMIN%/*}/$PGDB" ;;
    rabbitmq)
        state="${PG_ADMIN%/*}/${PGDB}_r"
        broker=$(printf 'broker = "rabbitmq"\nqueue = "%s"\n[queue]\nurl = "%s"' "$JOBQ" "$LABRELAY_TEST_AMQP_URL") ;;
    esac
    cfg=$WORK/$engine.toml
    touch "$cfg" && chmod 600 "$cfg"
    cat > "$cfg" <<TOML
[paths]
data_dir = "$WORK/$engine"
[state]
url = "$state"
[jobs]
poll_ms = 50
$broker
TOML
    jw() { "$BIN/job-worker" --config "$cfg" "$@"; }
    cs() { "$BIN/code-submit" --config "$cfg" "$@"; }

    say "$engine: 1. submit $N noop jobs"
    t0=$(now)
    awk -v n="$N" 'BEGIN { for (i = 0; i < n; i++) print "{}" }' | cs task noop --each - > /dev/null
    t1=$(now)
    SUBMIT[$engine]=$(calc "$N / ($t1 - $t0)" 0)

    say "$engine: 2. drain with 2 workers"
    left() { jw --json stats | python3 -c 'import json, sys; print(sum(json.loads(l)["queued"] + json.loads(l)["running"] for l in sys.stdin))'; }
    # While the RabbitMQ workers drain: a light look at the table (a job-worker start
    # ten times a second would take CPU from the run it measures).
    left_pg() { psql -qAt "$state" -c "SELECT count(*) FROM labrelay_jobs WHERE state IN ('queued', 'running')"; }
    kids_cpu; k0=$KIDS g0=$(pg_cpu) m0=$(mq_cpu)
    t0=$(now)
    if [[ $engine == rabbitmq ]]; then
        "$BIN/job-worker" --config "$cfg" -q run --concurrency 64 > /dev/null & PIDS+=($!)
        "$BIN/job-worker" --config "$cfg" -q run --concurrency 64 > /dev/null & PIDS+=($!)
        until [[ $(left_pg) == 0 ]]; do sleep 0.1; done
        t1=$(now)
        kill -TERM "${PIDS[@]}"; wait "${PIDS[@]}" 2>/dev/null || true; PIDS=()
    else
        "$BIN/job-worker" --config "$cfg" -q run --once --concurrency 64 > /dev/null & w1=$!
        "$BIN/job-worker" --config "$cfg" -q run --once --concurrency 64 > /dev/null & w2=$!
        wait "$w1" "$w2"
        t1=$(now)
    fi
    DRAIN[$engine]=$(calc "$N / ($t1 - $t0)" 0)
    kids_cpu
    CPU_W[$engine]=$(calc "($KIDS - $k0) / $CLK" 1)
    CPU_PG[$engine]=$(calc "($(pg_cpu) - $g0) / $CLK" 1)
    CPU_MQ[$engine]=$(calc "($(mq_cpu) - $m0) / $CLK" 1)
    [[ $(left) == 0 ]] || die "$engine: $(left) jobs left after the drain"

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

# Celery: enqueue, then drain with each pool.
export LRBENCH_AMQP_URL=$LABRELAY_TEST_AMQP_URL LRBENCH_QUEUE=lrbench.celery.$$
cp bench/celery_noop.py "$WORK/"
queued() { rabbitmqctl -q list_queues name messages | awk -v q="$LRBENCH_QUEUE" '$1 == q { print $2 }'; }
declare -A C_ENQ C_DRAIN
for pool in prefork solo; do
    say "celery $pool: enqueue $CN no-op tasks"
    C_ENQ[$pool]=$(cd "$WORK" && python3 celery_noop.py enqueue "$CN")
    say "celery $pool: drain"
    args=(-P "$pool")
    [[ $pool == prefork ]] && args+=(--concurrency 2)
    t0=$(now)
    (cd "$WORK" && exec python3 -m celery -A celery_noop worker -Q "$LRBENCH_QUEUE" "${args[@]}" \
        --without-gossip --without-mingle --without-heartbeat -l warning) > "$WORK/celery-$pool.log" 2>&1 & PIDS+=($!)
    until [[ $(queued) == 0 ]]; do sleep 0.2; done
    t1=$(now)
    kill -TERM "${PIDS[@]}"; wait "${PIDS[@]}" 2>/dev/null || true; PIDS=()
    C_DRAIN[$pool]=$(calc "$CN / ($t1 - $t0)" 0)
done
timeout 30 rabbitmqctl -q delete_queue "$LRBENCH_QUEUE" >/dev/null 2>&1 || true

echo
echo "job-worker, $N noop jobs, 2 workers x concurrency 64, release build, $(nproc) cores"
printf '%-12s %12s %12s %10s %10s  %s\n' "state db" "submit/s" "drain/s" "p50 ms" "p99 ms" "targets"
printf '%-12s %12s %12s %10s %10s  %s\n' "SQLite" "${SUBMIT[sqlite]}" "${DRAIN[sqlite]}" "${P50[sqlite]}" "${P99[sqlite]}" \
    "drain >= $T_SQLITE $(mark "${DRAIN[sqlite]} >= $T_SQLITE")"
printf '%-12s %12s %12s %10s %10s  %s\n' "PostgreSQL" "${SUBMIT[postgres]}" "${DRAIN[postgres]}" "${P50[postgres]}" "${P99[postgres]}" \
    "drain >= $T_PG $(mark "${DRAIN[postgres]} >= $T_PG"), p50 <= $T_P50_MS ms $(mark "${P50[postgres]} <= $T_P50_MS")"
printf '%-12s %12s %12s %10s %10s  %s\n' "RabbitMQ+PG" "${SUBMIT[rabbitmq]}" "${DRAIN[rabbitmq]}" "${P50[rabbitmq]}" "${P99[rabbitmq]}" \
    "p50 <= $T_P50_MS ms $(mark "${P50[rabbitmq]} <= $T_P50_MS")"
echo
echo "CPU seconds during the drain (2 cores: a drain takes at least the sum / 2)"
printf '%-12s %10s %12s %10s %10s %14s\n' "state db" "workers" "PostgreSQL" "RabbitMQ" "sum" "max jobs/s"
for e in sqlite postgres rabbitmq; do
    sum=$(calc "${CPU_W[$e]} + ${CPU_PG[$e]} + ${CPU_MQ[$e]}" 1)
    printf '%-12s %10s %12s %10s %10s %14s\n' "$e" "${CPU_W[$e]}" "${CPU_PG[$e]}" "${CPU_MQ[$e]}" "$sum" "$(calc "$N / (($sum + 0.001) / 2)" 0)"
done
echo
echo "Celery $(python3 -c 'import celery; print(celery.__version__)'), $CN no-op tasks on RabbitMQ, timed from the worker's start"
printf '%-22s %12s %12s  %s\n' "pool" "enqueue/s" "drain/s" "job-worker drain / Celery drain (RabbitMQ; SQLite, PostgreSQL)"
for pool in prefork solo; do
    target=10 && [[ $pool == solo ]] && target=5
    ratio=$(calc "${DRAIN[rabbitmq]} / ${C_DRAIN[$pool]}" 1)
    printf '%-22s %12s %12s  %s\n' "$pool$([[ $pool == prefork ]] && echo ' (concurrency 2)')" "${C_ENQ[$pool]}" "${C_DRAIN[$pool]}" \
        "${ratio}x (target >= ${target}x $(mark "$ratio >= $target")); $(calc "${DRAIN[sqlite]} / ${C_DRAIN[$pool]}" 1)x, $(calc "${DRAIN[postgres]} / ${C_DRAIN[$pool]}" 1)x"
done
