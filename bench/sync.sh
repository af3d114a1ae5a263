#!/usr/bin/env bash
# sync-publish benchmark (issue 10): one PostgreSQL site where users change, two
# consuming sites (PostgreSQL and MariaDB), RabbitMQ between them, release build.
#
#   1. capture + relay: N user inserts committed at the source (trigger capture, in
#      one statement), then `relay --site src` until the outbox is empty: events/s.
#   2. apply: `consume --site pg --once` and `consume --site maria --once`, each timed
#      alone: applied events/s per site.
#   3. latency: `relay --follow` and both consumers running; 1,000 changes/s committed
#      one per transaction for 10 s; commit-to-applied per change (the source
#      outbox's capture time vs the consumer inbox's apply time, same clock): p50, p99.
#   4. bootstrap: a fresh MariaDB site takes the N users from `bootstrap` (publish
#      plus apply, until the site holds all of them).
#
# Targets (issue 10): >= 5,000 applied events/s per site, p99 < 50 ms at 1,000/s,
# bootstrap of 100,000 users < 60 s. There is no peer run: SymmetricDS is a Java
# server with no Debian package; the figures are absolute (see bench/README.md).
#
#   bench/sync.sh               # N = 100,000
#   bench/sync.sh --quick       # N = 20,000, latency for 5 s
#   bench/sync.sh --no-build    # use target/release as it is
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
    *) printf 'sync.sh: unknown argument %s\n\n' "$1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
if ((quick)); then N=20000 LAT_SECS=5; else N=100000 LAT_SECS=10; fi
T_APPLY=5000 T_P99_MS=50 T_BOOT_S=60

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
say() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { printf 'sync.sh: %s\n' "$*" >&2; exit 1; }
calc() { awk "BEGIN { printf \"%.${2:-1}f\", $1 }"; }
# CPU accounting: tree_cpu, pg_cpu, my_cpu, mq_cpu, kids_cpu (they use WORK, set below).
# shellcheck source=bench/cpu.sh
source "$REPO/bench/cpu.sh"
mark() { if awk "BEGIN { exit !($1) }"; then echo PASS; else echo FAIL; fi; }
now() { date +%s.%N; }
command -v psql >/dev/null || die "psql is missing (apt-get install postgresql-client)"
command -v mariadb >/dev/null || die "the mariadb client is missing (apt-get install mariadb-client)"

say "services"
scripts/services >/dev/null
set -a
# shellcheck disable=SC1091
source target/services.env
set +a
if ((build)); then
    say "cargo build --release -p sync-publish"
    cargo build -q --release -p sync-publish
fi
BIN=$REPO/target/release/sync-publish
[[ -x $BIN ]] || die "$BIN is missing (run without --no-build)"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/lr-sync-bench.XXXXXX")
PG_ADMIN=$LABRELAY_TEST_PG_URL MY_ADMIN=$LABRELAY_TEST_MYSQL_URL
SRC=lr_sync_src_$$ PGDST=lr_sync_pg_$$ MYDST=lr_sync_my_$$ MYBOOT=lr_sync_boot_$$
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    for d in $SRC $PGDST; do psql -q "$PG_ADMIN" -c "DROP DATABASE IF EXISTS $d WITH (FORCE)" >/dev/null 2>&1 || true; done
    for d in $MYDST $MYBOOT; do mariadb -h 127.0.0.1 -u root -e "DROP DATABASE IF EXISTS $d" >/dev/null 2>&1 || true; done
    # The queues hold up to 4 x N messages when a run stops early: never leave them
    # on the shared broker (a node recovering millions of them starts slowly).
    if [[ -n ${EXCHANGE:-} ]] && command -v rabbitmqctl >/dev/null; then
        for q in src pg maria boot; do
            for name in "$EXCHANGE.$q" "$EXCHANGE.$q.dead"; do
                timeout 30 rabbitmqctl -q delete_queue "$name" >/dev/null 2>&1 || true
            done
        done
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

pg() { psql -qAt "${PG_ADMIN%/*}/$1" -c "$2"; }
my() { mariadb -h 127.0.0.1 -u root -N -B "$1" -e "$2"; }
for d in $SRC $PGDST; do
    psql -q "$PG_ADMIN" -c "CREATE DATABASE $d" >/dev/null
    pg "$d" "CREATE TABLE users (id SERIAL PRIMARY KEY, name TEXT NOT NULL, email TEXT, phone TEXT,
             active BOOLEAN NOT NULL DEFAULT TRUE)" >/dev/null
done
for d in $MYDST $MYBOOT; do
    mariadb -h 127.0.0.1 -u root -e "CREATE DATABASE $d"
    my "$d" "CREATE TABLE users (id INT AUTO_INCREMENT PRIMARY KEY, name VARCHAR(100) NOT NULL,
             email VARCHAR(100), phone VARCHAR(40), active TINYINT(1) NOT NULL DEFAULT 1)"
done

EXCHANGE=lr.sync.bench.$$
cat > "$WORK/config.toml" <<TOML
[paths]
data_dir = "$WORK/data"
[queue]
url = "$LABRELAY_TEST_AMQP_URL"
[databases.src]
url = "${PG_ADMIN%/*}/$SRC"
[databases.pg]
url = "${PG_ADMIN%/*}/$PGDST"
[databases.maria]
url = "${MY_ADMIN%/*}/$MYDST"
[databases.boot]
url = "${MY_ADMIN%/*}/$MYBOOT"
[sync]
exchange = "$EXCHANGE"
batch = 500
[sync.sites.src]
database = "src"
key = "bench-key-of-the-source"
consume = false
[sync.sites.pg]
database = "pg"
key = "bench-key-of-postgres"
[sync.sites.maria]
database = "maria"
key = "bench-key-of-mariadb"
[sync.sites.boot]
database = "boot"
key = "bench-key-of-bootstrap"
[sync.objects.user]
table = "users"
active = "active"
fields = { name = "name", email = "email", phone = "phone", active = { column = "active", type = "bool" } }
TOML
chmod 600 "$WORK/config.toml"
sp() { "$BIN" --config "$WORK/config.toml" "$@"; }
for s in src pg maria boot; do sp install --site "$s" >/dev/null; done
# Declare the queues, then keep the bootstrap site's queue out of steps 1-3.
sp relay --site src >/dev/null

say "1. $N inserts at the source, then relay"
pg "$SRC" "INSERT INTO users (name, email, phone) SELECT 'User ' || g, 'user' || g || '@x.org', g::text
           FROM generate_series(1, $N) g" >/dev/null
t0=$(now); sp relay --site src >/dev/null; t1=$(now)
RELAY_S=$(calc "$t1 - $t0" 2)
say "   relay: $RELAY_S s"

say "2. apply at each site"
# Runs in this shell (kids_cpu must): sets APPLY_S and APPLY_CPU ("consumer postgres
# mariadb rabbitmq" CPU seconds) for `consume --site SITE --once`.
timed_apply() {
    local t0 t1 k0 g0 m0 q0
    t0=$(now); kids_cpu; k0=$KIDS g0=$(pg_cpu) m0=$(my_cpu) q0=$(mq_cpu)
    sp consume --site "$1" --once >/dev/null
    t1=$(now); kids_cpu
    APPLY_S=$(calc "$t1 - $t0" 2)
    APPLY_CPU="$(calc "($KIDS - $k0) / $CLK" 1) $(calc "($(pg_cpu) - $g0) / $CLK" 1) $(calc "($(my_cpu) - $m0) / $CLK" 1) $(calc "($(mq_cpu) - $q0) / $CLK" 1)"
}
timed_apply pg; PG_S=$APPLY_S CPU_PG_SITE=$APPLY_CPU
timed_apply maria; MY_S=$APPLY_S CPU_MY_SITE=$APPLY_CPU
[[ $(pg "$PGDST" "SELECT COUNT(*) FROM users") == "$N" ]] || die "PostgreSQL site holds $(pg "$PGDST" "SELECT COUNT(*) FROM users") users, not $N"
[[ $(my "$MYDST" "SELECT COUNT(*) FROM users") == "$N" ]] || die "MariaDB site holds $(my "$MYDST" "SELECT COUNT(*) FROM users") users, not $N"
# The bootstrap site's queue got the same messages; empty it by applying (not timed).
sp consume --site boot --once >/dev/null
my "$MYBOOT" "SET FOREIGN_KEY_CHECKS = 0; TRUNCATE users; DELETE FROM labrelay_sync_ids; DELETE FROM labrelay_sync_fields; DELETE FROM labrelay_sync_inbox"

say "3. latency at 1,000 changes/s for $LAT_SECS s"
"$BIN" --config "$WORK/config.toml" relay --site src --follow 2>"$WORK/relay.log" & PIDS+=($!)
for s in pg maria boot; do
    "$BIN" --config "$WORK/config.toml" consume --site $s 2>"$WORK/$s.log" >/dev/null & PIDS+=($!)
done
sleep 1
pg "$SRC" "CREATE PROCEDURE pace(n int, per_sec int) LANGUAGE plpgsql AS \$\$
DECLARE t0 timestamptz := clock_timestamp();
BEGIN
  FOR i IN 1..n LOOP
    UPDATE users SET phone = 'p' || i WHERE id = 1 + (i % $N);
    COMMIT;
    PERFORM pg_sleep(greatest(0, i::float8 / per_sec - extract(epoch FROM clock_timestamp() - t0)));
  END LOOP;
END \$\$" >/dev/null
before=$(pg "$SRC" "SELECT COALESCE(MAX(id), 0) FROM labrelay_sync_outbox")
pg "$SRC" "CALL pace($((LAT_SECS * 1000)), 1000)" >/dev/null
sleep 2
for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
wait 2>/dev/null || true
PIDS=()
pg "$SRC" "COPY (SELECT event_id, captured_ms FROM labrelay_sync_outbox WHERE id > $before AND event_id IS NOT NULL) TO STDOUT" \
    | sort > "$WORK/captured.tsv"
latency() { # $1: "event_id<TAB>applied_ms" lines on stdin
    sort | join -t $'\t' "$WORK/captured.tsv" - |
        awk -F'\t' '{ print $3 - $2 }' | sort -n |
        awk '{ v[NR] = $1 } END { if (NR == 0) { print "- - 0"; exit }
             p50 = v[int((NR - 1) * 0.50) + 1]; p99 = v[int((NR - 1) * 0.99) + 1]; print p50, p99, NR }'
}
read -r PG_P50 PG_P99 PG_N < <(pg "$PGDST" "COPY (SELECT event_id, applied_ms FROM labrelay_sync_inbox) TO STDOUT" | latency)
read -r MY_P50 MY_P99 MY_N < <(my "$MYDST" "SELECT event_id, applied_ms FROM labrelay_sync_inbox" | latency)
SENT=$(wc -l < "$WORK/captured.tsv")

say "4. bootstrap of $N users into a fresh MariaDB site"
t0=$(now)
sp bootstrap --site src >/dev/null
tb=$(now)
sp consume --site boot --once >/dev/null
t1=$(now)
BOOT_S=$(calc "$t1 - $t0" 1)
BOOT_PUB_S=$(calc "$tb - $t0" 1) BOOT_APPLY_S=$(calc "$t1 - $tb" 1)
[[ $(my "$MYBOOT" "SELECT COUNT(*) FROM users") == "$N" ]] || die "bootstrap site holds $(my "$MYBOOT" "SELECT COUNT(*) FROM users") users, not $N"
# The bootstrap also went to the other consumers: drain them (not timed).
sp consume --site pg --once >/dev/null
sp consume --site maria --once >/dev/null

RELAY_RATE=$(calc "$N / $RELAY_S" 0)
PG_RATE=$(calc "$N / $PG_S" 0)
MY_RATE=$(calc "$N / $MY_S" 0)
echo
echo "sync-publish, $N user changes, release build, $(nproc) cores"
printf '%-34s %10s %12s  %s\n' "step" "seconds" "events/s" "target"
printf '%-34s %10s %12s  %s\n' "capture + relay (source PostgreSQL)" "$RELAY_S" "$RELAY_RATE" "-"
printf '%-34s %10s %12s  %s\n' "apply at PostgreSQL site" "$PG_S" "$PG_RATE" ">= $T_APPLY $(mark "$PG_RATE >= $T_APPLY")"
printf '%-34s %10s %12s  %s\n' "apply at MariaDB site" "$MY_S" "$MY_RATE" ">= $T_APPLY $(mark "$MY_RATE >= $T_APPLY")"
printf '%-34s %10s %12s  %s\n' "bootstrap into fresh MariaDB site" "$BOOT_S" "$(calc "$N / $BOOT_S" 0)" "< $T_BOOT_S s $(mark "$BOOT_S < $T_BOOT_S")"
printf '%-34s %10s %12s  %s\n' "  of which: publish at the source" "$BOOT_PUB_S" "$(calc "$N / $BOOT_PUB_S" 0)" "-"
printf '%-34s %10s %12s  %s\n' "  of which: apply at the new site" "$BOOT_APPLY_S" "$(calc "$N / $BOOT_APPLY_S" 0)" "-"
echo
echo "CPU seconds during each apply (2 cores: an apply takes at least the sum / 2)"
printf '%-34s %8s %8s %8s %8s %8s %10s\n' "site" "consumer" "Postgres" "MariaDB" "RabbitMQ" "sum" "max ev/s"
for row in "PostgreSQL site:$CPU_PG_SITE" "MariaDB site:$CPU_MY_SITE"; do
    read -r c p m q <<<"${row#*:}"
    sum=$(calc "$c + $p + $m + $q" 1)
    printf '%-34s %8s %8s %8s %8s %8s %10s\n' "${row%%:*}" "$c" "$p" "$m" "$q" "$sum" "$(calc "$N / ($sum / 2)" 0)"
done
echo
echo "latency commit -> applied at 1,000 changes/s for $LAT_SECS s ($SENT changes relayed)"
printf '%-34s %8s %8s %8s  %s\n' "site" "p50 ms" "p99 ms" "changes" "target"
printf '%-34s %8s %8s %8s  %s\n' "PostgreSQL" "$PG_P50" "$PG_P99" "$PG_N" "p99 < $T_P99_MS $(mark "$PG_P99 < $T_P99_MS")"
printf '%-34s %8s %8s %8s  %s\n' "MariaDB" "$MY_P50" "$MY_P99" "$MY_N" "p99 < $T_P99_MS $(mark "$MY_P99 < $T_P99_MS")"
