#!/usr/bin/env bash
# mail-query benchmark: exporting a large result to CSV with `mail-query export` (the
# same check + read-only run + streaming export a mailed request goes through) against
# `psql \copy` on PostgreSQL and `mariadb --batch --quick` on MariaDB, side by side in
# one run, at 1,000,000 and 2,000,000 rows of 10 mixed columns; then the latency from a
# request accepted by Postfix to our reply arriving, with `mail-query --watch`, over
# 20 mails. Prints seconds, peak RSS and ratios with the targets of issue 9 marked
# PASS/FAIL (marks, not exit codes). What is measured and why: bench/README.md.
#
#   bench/mail-query.sh               # 1M and 2M rows, 20 latency mails
#   bench/mail-query.sh --quick       # 200k and 400k rows, 10 latency mails
#   bench/mail-query.sh --no-build    # use target/release as it is
#
# Exit 0 when every run worked (whatever the ratios), 1 when one failed, 2 on bad
# arguments. Talks only to 127.0.0.1 (the servers of scripts/services).
set -euo pipefail

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }

quick=0 build=1
while (($#)); do
    case $1 in
    --quick) quick=1 ;;
    --no-build) build=0 ;;
    -h | --help) usage; exit 0 ;;
    *) printf 'mail-query.sh: unknown argument %s\n\n' "$1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
if ((quick)); then SIZES=(200000 400000) MAILS=10; else SIZES=(1000000 2000000) MAILS=20; fi
# Targets (issue 9, "Benchmarks").
T_PSQL=1.2 T_MARIADB=1.0 T_RSS_MIB=64 T_P50_S=2.0

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
say() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { printf 'mail-query.sh: %s\n' "$*" >&2; exit 1; }
calc() { awk "BEGIN { printf \"%.${2:-2}f\", $1 }"; }
mark() { if awk "BEGIN { exit !($1) }"; then echo PASS; else echo FAIL; fi; }

as_root() { if ((EUID == 0)); then "$@"; else sudo -n "$@"; fi; }
[[ -x /usr/bin/time ]] || as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq time >/dev/null
command -v psql >/dev/null || die "psql is missing (apt-get install postgresql-client)"
command -v mariadb >/dev/null || die "the mariadb client is missing (apt-get install mariadb-client)"

say "services"
scripts/services >/dev/null
set -a
# shellcheck disable=SC1091
source target/services.env
set +a
for v in LABRELAY_TEST_PG_URL LABRELAY_TEST_MYSQL_URL LABRELAY_TEST_SMTP_PORT LABRELAY_TEST_IMAP_PORT; do
    [[ -n ${!v:-} ]] || die "$v is not set by scripts/services"
done
if ((build)); then
    say "cargo build --release -p mail-query"
    cargo build -q --release -p mail-query
fi
BIN=$REPO/target/release/mail-query
[[ -x $BIN ]] || die "$BIN is missing (run without --no-build)"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/lr-mq-bench.XXXXXX")
PGDB=lr_mq_bench_$$ MYDB=lr_mq_bench_$$
PG_ADMIN=$LABRELAY_TEST_PG_URL
PG_URL=${PG_ADMIN%/*}/$PGDB
MY_ADMIN=$LABRELAY_TEST_MYSQL_URL
MY_URL=${MY_ADMIN%/*}/$MYDB
cleanup() {
    [[ -n ${WATCH_PID:-} ]] && kill "$WATCH_PID" 2>/dev/null
    psql -q "$PG_ADMIN" -c "DROP DATABASE IF EXISTS $PGDB WITH (FORCE)" >/dev/null 2>&1 || true
    mariadb -h 127.0.0.1 -u root -e "DROP DATABASE IF EXISTS $MYDB" >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

COLS="id, name, created, amount, flag, code, score, note, qty, updated"
say "PostgreSQL: ${SIZES[-1]} rows x 10 columns"
psql -q "$PG_ADMIN" -c "CREATE DATABASE $PGDB" >/dev/null
psql -q "$PG_URL" >/dev/null <<SQL
CREATE TABLE bench_rows (id bigint, name varchar(24), created timestamp, amount numeric(12,2),
  flag boolean, code varchar(8), score double precision, note text, qty integer, updated timestamp);
INSERT INTO bench_rows SELECT g, 'sample-' || substr(md5(g::text), 1, 13),
  timestamp '2026-01-01' + g * interval '1 second', (g % 100000) / 100.0, g % 2 = 0,
  'C' || (g % 1000), g / 7.0, CASE WHEN g % 5 = 0 THEN NULL ELSE 'note ' || g END,
  g % 997, CASE WHEN g % 3 = 0 THEN NULL ELSE timestamp '2026-06-01' + g * interval '1 minute' END
  FROM generate_series(1, ${SIZES[-1]}) g;
SQL
say "MariaDB: ${SIZES[-1]} rows x 10 columns"
mariadb -h 127.0.0.1 -u root -e "CREATE DATABASE $MYDB"
mariadb -h 127.0.0.1 -u root "$MYDB" <<SQL
CREATE TABLE bench_rows (id bigint, name varchar(24), created datetime, amount decimal(12,2),
  flag boolean, code varchar(8), score double, note text, qty int, updated datetime);
INSERT INTO bench_rows SELECT seq, concat('sample-', substr(md5(seq), 1, 13)),
  '2026-01-01' + interval seq second, (seq % 100000) / 100.0, seq % 2 = 0,
  concat('C', seq % 1000), seq / 7.0, IF(seq % 5 = 0, NULL, concat('note ', seq)),
  seq % 997, IF(seq % 3 = 0, NULL, '2026-06-01' + interval seq minute)
  FROM seq_1_to_${SIZES[-1]};
SQL

cat > "$WORK/config.toml" <<TOML
[paths]
data_dir = "$WORK/data"
[mail]
from = "SQL robot <sql@labrelay.test>"
[databases.pg]
url = "$PG_URL"
[databases.my]
url = "$MY_URL"
[mail_query]
max_rows = 100000000
max_query_seconds = 600
trust = "allowlist"
[mail_query.databases.pg]
database = "pg"
allow = ["@labrelay.test"]
[mail_query.databases.my]
database = "my"
allow = ["@labrelay.test"]
TOML

# timed LABEL OUTFILE CMD...: the best wall seconds of $RUNS runs of CMD, with that
# run's CPU seconds (user + system), and the largest peak RSS (MiB) of all runs.
RUNS=3
timed() {
    local label=$1 out=$2 i w rss u s
    shift 2
    WALL="" RSS_KIB=0
    for ((i = 0; i < RUNS; i++)); do
        /usr/bin/time -f '%e %M %U %S' -o "$WORK/time" "$@" >"$out" 2>"$WORK/$label.err" ||
            { cat "$WORK/$label.err" >&2; die "$label failed"; }
        read -r w rss u s <"$WORK/time"
        if [[ -z $WALL ]] || awk "BEGIN { exit !($w < $WALL) }"; then
            WALL=$w CPU=$(calc "$u + $s")
        fi
        ((rss > RSS_KIB)) && RSS_KIB=$rss
    done
    RSS=$(calc "$RSS_KIB / 1024" 1)
}

printf '\n(best of %s runs each; cpu_s: user + system CPU of the tool itself, the server\n' "$RUNS"
printf ' producing the rows shares the 2 cores)\n'
printf '%-10s %-9s %-28s %8s %7s %9s %8s\n' rows engine tool wall_s cpu_s RSS_MiB lines
declare -A OURS_RSS
for n in "${SIZES[@]}"; do
    q="SELECT $COLS FROM bench_rows WHERE id <= $n ORDER BY id"
    printf '%s\n' "$q" >"$WORK/q.sql"
    for engine in pg my; do
        timed "ours-$engine-$n" /dev/null "$BIN" --config "$WORK/config.toml" -q export \
            --database "$engine" --output "$WORK/ours.csv" "$WORK/q.sql"
        ours_wall=$WALL ours_rss=$RSS
        OURS_RSS[$engine-$n]=$RSS
        lines=$(wc -l <"$WORK/ours.csv")
        printf '%-10s %-9s %-28s %8s %7s %9s %8s\n' "$n" "$engine" "mail-query export (csv)" "$WALL" "$CPU" "$RSS" "$lines"
        ((lines == n + 1)) || die "ours wrote $lines lines for $n rows"
        if [[ $engine == pg ]]; then
            timed "psql-$n" /dev/null psql -q "$PG_URL" -c "\\copy ($q) to '$WORK/peer.csv' csv header"
            peer="psql \\copy csv"
            target=$T_PSQL
        else
            timed "mariadb-$n" "$WORK/peer.tsv" mariadb -h 127.0.0.1 -u root --batch --quick -e "$q" "$MYDB"
            peer="mariadb --batch --quick"
            target=$T_MARIADB
        fi
        printf '%-10s %-9s %-28s %8s %7s %9s\n' "$n" "$engine" "$peer" "$WALL" "$CPU" "$RSS"
        ratio=$(calc "$ours_wall / $WALL")
        printf '%-10s %-9s time ratio ours/peer %s (target <= %s): %s; ours RSS %s MiB (target <= %s): %s\n' \
            "$n" "$engine" "$ratio" "$target" "$(mark "$ratio <= $target")" "$ours_rss" "$T_RSS_MIB" \
            "$(mark "$ours_rss <= $T_RSS_MIB")"
        rm -f "$WORK/ours.csv" "$WORK/peer.csv" "$WORK/peer.tsv"
    done
done
for engine in pg my; do
    a=${OURS_RSS[$engine-${SIZES[0]}]} b=${OURS_RSS[$engine-${SIZES[1]}]}
    printf 'RSS flat (%s): %s MiB at %s rows, %s MiB at %s rows (target: within 10%%): %s\n' \
        "$engine" "$a" "${SIZES[0]}" "$b" "${SIZES[1]}" "$(mark "$b <= $a * 1.1")"
done

# ---------------------------------------------------------------------------------------
# Latency: a 10-row request sent over SMTP to carol+FOLDER, `mail-query --watch` reading
# FOLDER and replying to alice+REPLIES; from the SMTP acceptance of the request to the
# reply being in alice's folder (so Postfix + Dovecot delivery of the reply is counted).
say "latency: $MAILS requests through Postfix and Dovecot with --watch"
FOLDER=mqbench$$
cat >>"$WORK/config.toml" <<TOML
[smtp]
host = "127.0.0.1"
port = $LABRELAY_TEST_SMTP_PORT
security = "none"
[imap]
host = "127.0.0.1"
port = $LABRELAY_TEST_IMAP_PORT
security = "none"
username = "carol"
password = "env:MQ_BENCH_IMAP_PASSWORD"
TOML
sed -i "s/^trust = \"allowlist\"/trust = \"allowlist\"\nfolder = \"$FOLDER\"\nprocessed_folder = \"${FOLDER}_done\"\nrejected_folder = \"${FOLDER}_refused\"/" "$WORK/config.toml"
python3 - "$FOLDER" <<'PY'
import imaplib, os, sys
f = sys.argv[1]
for user, pw, box in [("carol", os.environ["LABRELAY_TEST_MAIL_PASS_CAROL"], f),
                      ("alice", os.environ["LABRELAY_TEST_MAIL_PASS_ALICE"], f + "_re")]:
    c = imaplib.IMAP4("127.0.0.1", int(os.environ["LABRELAY_TEST_IMAP_PORT"]))
    c.login(user, pw); c.create(box); c.logout()
PY
MQ_BENCH_IMAP_PASSWORD=$LABRELAY_TEST_MAIL_PASS_CAROL "$BIN" --config "$WORK/config.toml" -q --watch \
    >"$WORK/watch.out" 2>"$WORK/watch.err" &
WATCH_PID=$!
sleep 2
export P50_FILE=$WORK/p50
python3 - "$FOLDER" "$MAILS" <<'PY'
import imaplib, os, smtplib, statistics, sys, time
from email.message import EmailMessage
folder, n = sys.argv[1], int(sys.argv[2])
dom = os.environ["LABRELAY_TEST_MAIL_DOMAIN"]
imap = imaplib.IMAP4("127.0.0.1", int(os.environ["LABRELAY_TEST_IMAP_PORT"]))
imap.login("alice", os.environ["LABRELAY_TEST_MAIL_PASS_ALICE"])
lat = []
for i in range(n):
    m = EmailMessage()
    m["From"] = f"alice+{folder}_re@{dom}"; m["To"] = f"carol+{folder}@{dom}"
    m["Subject"] = f"bench {i}"; m["Message-ID"] = f"<mqbench-{os.getpid()}-{i}@{dom}>"
    m.set_content("database: pg\n")
    m.add_attachment("SELECT id, name FROM bench_rows ORDER BY id LIMIT 10\n",
                     filename="q.sql")
    s = smtplib.SMTP("127.0.0.1", int(os.environ["LABRELAY_TEST_SMTP_PORT"]))
    s.send_message(m); s.quit()
    t0 = time.monotonic()
    while True:
        imap.select(folder + "_re")
        typ, data = imap.search(None, "ALL")
        if len(data[0].split()) > i:
            break
        if time.monotonic() - t0 > 120:
            sys.exit(f"no reply to request {i} within 120 s")
        time.sleep(0.02)
    lat.append(time.monotonic() - t0)
lat.sort()
print(f"latency over {n} mails: p50 {statistics.median(lat):.2f} s, "
      f"min {lat[0]:.2f} s, max {lat[-1]:.2f} s")
with open(os.environ.get("P50_FILE", "/dev/null"), "w") as f:
    f.write(f"{statistics.median(lat):.3f}\n")
for box in [folder + "_re"]:
    imap.select("INBOX"); imap.delete(box)
imap.logout()
PY
kill "$WATCH_PID" 2>/dev/null && wait "$WATCH_PID" 2>/dev/null || true
WATCH_PID=
p50=$(cat "$WORK/p50")
printf 'latency p50 %s s (target <= %s s): %s\n' "$p50" "$T_P50_S" "$(mark "$p50 <= $T_P50_S")"
python3 - "$FOLDER" <<'PY'
import imaplib, os, sys
f = sys.argv[1]
c = imaplib.IMAP4("127.0.0.1", int(os.environ["LABRELAY_TEST_IMAP_PORT"]))
c.login("carol", os.environ["LABRELAY_TEST_MAIL_PASS_CAROL"])
for box in (f, f + "_done", f + "_refused"):
    c.delete(box)
c.logout()
PY
