#!/usr/bin/env bash
# Delivery benchmark: upload-pure against rclone and the AWS CLI on the same data to the
# same Garage bucket, and against OpenSSH sftp on the test sshd, side by side in one run.
# Prints files/s, MB/s, peak RSS, CPU seconds of the tool and of Garage, and the ratio
# of ours to each peer, with the targets of issue 3 marked PASS/FAIL (marks, not exit
# codes). What is measured and why: bench/README.md.
#
#   bench/delivery.sh                 # full size: 10,000 x 10 KiB, 2 x 1 GiB, SFTP 1 GiB
#   bench/delivery.sh --quick         # 1,000 x 10 KiB, 2 x 128 MiB, SFTP 256 MiB
#   bench/delivery.sh --only small    # or large, sftp, many, memory; repeat or comma-separate
#                                     # (many and memory run only when named:
#                                     #  many: 100,000 x 1 KiB to a local folder vs rsync and
#                                     #  rclone --transfers 16, then 300,000 for RSS growth;
#                                     #  memory: 8 x 300 MiB + 200 small files to Garage)
#   bench/delivery.sh --keep          # keep the temp dir (data, configs, logs, outbox)
#   bench/delivery.sh --no-build      # use target/release as it is
#
# Exit 0 when every tool ran and its upload checked out (whatever the ratios), 1 when a
# tool failed or a setup step did, 2 on bad arguments.
#
# Talks only to 127.0.0.1 (Garage and sshd from scripts/services); every step is bounded
# by `timeout`; uploaded objects and SFTP files are deleted on exit, even on Ctrl-C.
set -euo pipefail

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }

quick=0 keep=0 build=1 only=""
while (($#)); do
    case $1 in
    --quick) quick=1 ;;
    --keep) keep=1 ;;
    --no-build) build=0 ;;
    --only) [[ $# -ge 2 ]] || { usage >&2; exit 2; }; only+=",$2"; shift ;;
    --only=*) only+=",${1#--only=}" ;;
    -h | --help) usage; exit 0 ;;
    *) printf 'delivery.sh: unknown argument %s\n\n' "$1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
cases=()
for c in ${only//,/ }; do
    case $c in small | large | sftp | many | memory) cases+=("$c") ;;
    *) printf 'delivery.sh: --only takes small, large, sftp, many or memory, not %s\n' "$c" >&2; exit 2 ;;
    esac
done
((${#cases[@]})) || cases=(small large sftp)
want() { [[ " ${cases[*]} " == *" $1 "* ]]; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
BENCH=$REPO/bench
PY=/usr/bin/python3
[[ -x $PY ]] || PY=python3

# Sizes. MB in the output is 10^6 bytes (as rclone and aws-cli print it); MiB/GiB are 2^20/2^30.
if ((quick)); then
    SMALL_FILES=1000 SMALL_FOLDERS=10 LARGE_MIB=128 SFTP_MIB=256 RUN_LIMIT=300 MODE=quick
else
    SMALL_FILES=10000 SMALL_FOLDERS=100 LARGE_MIB=1024 SFTP_MIB=1024 RUN_LIMIT=900 MODE=full
fi
SMALL_SIZE=10240 LARGE_COUNT=2
if ((quick)); then
    MANY_FILES=20000 MANY_GROWTH_FILES=60000 MEMORY_MIB=64
else
    MANY_FILES=100000 MANY_GROWTH_FILES=300000 MEMORY_MIB=300
fi
# many: <= 1.5x rsync's time and >= 1.0x rclone --transfers 16 on a local folder; RSS
# <= 200 MiB at MANY_FILES and growing <= 1 KiB per file up to MANY_GROWTH_FILES.
T_MANY_RSYNC=0.667 T_MANY_RCLONE16=1.0 T_MANY_GROWTH_KIB=1.0
# Targets (issue 3, "Benchmarks").
T_SMALL_RCLONE=2.0 T_SMALL_RCLONE16=1.5 T_LARGE=1.2 T_SFTP=0.9 T_RSS_MIB=200

say() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
warn() { printf '[%(%H:%M:%S)T] WARNING: %s\n' -1 "$*" >&2; }
die() { printf 'delivery.sh: %s\n' "$*" >&2; exit 1; }
calc() { awk "BEGIN { printf \"%.${2:-2}f\", $1 }"; }

# ---------------------------------------------------------------------------------------
# Environment. AWS_CA_BUNDLE (set by some environments) makes rclone fail against a
# plain-HTTP endpoint, and any AWS_*/RCLONE_*/LABRELAY_* variable could change what a
# tool does; each tool gets exactly the variables it needs from a wrapper below. Proxies
# are dropped so that every request goes straight to 127.0.0.1.
for v in $(compgen -e); do
    case $v in
    AWS_* | RCLONE_* | LABRELAY_* | http_proxy | https_proxy | HTTP_PROXY | HTTPS_PROXY | \
        all_proxy | ALL_PROXY | no_proxy | NO_PROXY) unset "$v" ;;
    esac
done
export NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost
export LC_ALL=C

# Installing peers and starting the servers needs root: sudo when not root already.
ROOT=()
if ((EUID != 0)); then
    command -v sudo >/dev/null || die "run as root (or install sudo): scripts/services and installs need it"
    ROOT=(sudo -n)
fi

# bounded LIMIT CMD...: run CMD under timeout in the background and wait for it, so that
# Ctrl-C (which the shell sees, not timeout's own process group) can stop it: the
# cleanup kills the group of whatever is in flight.
INFLIGHT=""
bounded() {
    local limit=$1 rc=0
    shift
    timeout -k 10 "$limit" "$@" &
    INFLIGHT=$!
    wait "$INFLIGHT" || rc=$?
    INFLIGHT=""
    return "$rc"
}

WORK="" RUN="" UPLOADED=0 SFTP_MADE=0
# shellcheck disable=SC2317  # run by the EXIT trap
cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    if [[ -n $INFLIGHT ]] && kill -0 "$INFLIGHT" 2>/dev/null; then
        kill -TERM -- "-$INFLIGHT" 2>/dev/null || kill -TERM "$INFLIGHT" 2>/dev/null
        sleep 2
        kill -KILL -- "-$INFLIGHT" 2>/dev/null
        INFLIGHT=""
    fi
    if ((UPLOADED)); then
        say "deleting s3://$BUCKET/$RUN/ (and unfinished multipart uploads)"
        bounded 120 "$WORK/with-aws" aws s3api list-multipart-uploads --endpoint-url "$S3_EP" \
            --bucket "$BUCKET" --prefix "$RUN/" --query 'Uploads[].[Key,UploadId]' --output text \
            2>/dev/null | while IFS=$'\t' read -r key id; do
            [[ -n $id && $key != None ]] || continue
            bounded 60 "$WORK/with-aws" aws s3api abort-multipart-upload --endpoint-url "$S3_EP" \
                --bucket "$BUCKET" --key "$key" --upload-id "$id" >/dev/null 2>&1
        done
        bounded 900 "$WORK/with-aws" aws s3 rm --recursive --only-show-errors --endpoint-url "$S3_EP" \
            "s3://$BUCKET/$RUN/" >&2 ||
            bounded 900 "$WORK/with-rclone" rclone purge --checkers 16 "garage:$BUCKET/$RUN" >&2 ||
            warn "could not delete s3://$BUCKET/$RUN/"
    fi
    if ((SFTP_MADE)); then
        say "deleting ~$SFTP_USER/$RUN on the test sshd"
        bounded 120 ssh "${SSH_OPTS[@]}" -p "$SFTP_PORT" "$SFTP_USER@127.0.0.1" rm -rf -- "$RUN" >&2 ||
            warn "could not delete ~$SFTP_USER/$RUN"
    fi
    if [[ -n $WORK && -d $WORK ]]; then
        if ((keep)); then say "kept $WORK"; else rm -rf -- "$WORK"; fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------------------
say "test servers: scripts/services (idempotent)"
bounded 3600 "${ROOT[@]}" "$REPO/scripts/services" >&2 || die "scripts/services failed"
ENV_FILE=$REPO/target/services.env
[[ -r $ENV_FILE ]] || die "no $ENV_FILE"
# shellcheck source=/dev/null
source "$ENV_FILE" # plain assignments: nothing is exported to the tools
S3_EP=$LABRELAY_TEST_S3_ENDPOINT BUCKET=$LABRELAY_TEST_S3_BUCKET S3_REGION=$LABRELAY_TEST_S3_REGION
SFTP_HOST=$LABRELAY_TEST_SFTP_HOST SFTP_PORT=$LABRELAY_TEST_SFTP_PORT SFTP_USER=$LABRELAY_TEST_SFTP_USER
SFTP_KEY=$LABRELAY_TEST_SFTP_KEY SFTP_KH=$LABRELAY_TEST_SFTP_KNOWN_HOSTS
[[ $S3_EP == http://127.0.0.1:* ]] || die "S3 endpoint $S3_EP is not on 127.0.0.1"
[[ $SFTP_HOST == 127.0.0.1 ]] || die "SFTP host $SFTP_HOST is not 127.0.0.1"
SSH_OPTS=(-F /dev/null -o BatchMode=yes -o IdentitiesOnly=yes -i "$SFTP_KEY"
    -o StrictHostKeyChecking=yes -o "UserKnownHostsFile=$SFTP_KH" -o ConnectTimeout=20)

say "peers"
if ! command -v rclone >/dev/null; then
    bounded 600 "${ROOT[@]}" apt-get update -qq >&2 || true
    bounded 900 "${ROOT[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rclone >&2 ||
        die "could not install rclone"
fi
if ! command -v aws >/dev/null; then
    bounded 900 "${ROOT[@]}" pip install -q awscli >&2 ||
        bounded 900 "${ROOT[@]}" "$PY" -m pip install -q awscli >&2 ||
        die "could not install awscli (pip install awscli)"
    hash -r
    command -v aws >/dev/null || die "pip installed awscli but aws is not on PATH"
fi
if [[ ! -x /usr/bin/time ]]; then
    bounded 600 "${ROOT[@]}" apt-get update -qq >&2 || true
    bounded 900 "${ROOT[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq time >&2 ||
        die "could not install time"
fi
for c in openssl ssh sftp curl; do command -v "$c" >/dev/null || die "$c is missing"; done

if ((build)); then
    say "building upload-pure and delivery-upload (release)"
    bounded 3600 cargo build --release -q -p upload-pure -p delivery-upload >&2 ||
        die "cargo build --release failed"
fi
OURS=$REPO/target/release/upload-pure
[[ -x $OURS ]] || die "no $OURS (run without --no-build)"

# Garage: its process (CPU seconds) and its metrics endpoint (S3 requests per run).
GARAGE_PID=""
for p in $(pgrep -f 'garage.*server' || true); do
    [[ $(cat "/proc/$p/comm" 2>/dev/null) == garage ]] && { GARAGE_PID=$p; break; }
done
[[ -n $GARAGE_PID ]] || die "no running 'garage ... server' process"
GARAGE_CONF=$(tr '\0' '\n' <"/proc/$GARAGE_PID/cmdline" | sed -n '/^-c$/{n;p;q}')
GARAGE_METRICS=""
if [[ -r $GARAGE_CONF ]]; then
    admin=$(sed -n '/^\[admin\]/,/^\[/{s/^api_bind_addr *= *"\(127\.0\.0\.1:[0-9]*\)".*/\1/p}' "$GARAGE_CONF")
    [[ -n $admin ]] && GARAGE_METRICS=http://$admin/metrics
fi
CLK_TCK=$(getconf CLK_TCK)

WORK=$(mktemp -d "${TMPDIR:-/tmp}/lrbench.XXXXXX")
RUN=lrbench-$(date -u +%Y%m%dT%H%M%SZ)-$$
mkdir -p "$WORK/logs" "$WORK/data" "$WORK/xdg" "$WORK/home"
say "work dir $WORK, objects under s3://$BUCKET/$RUN/"

# Per-tool wrappers: each tool sees only its own settings. Secrets stay in these files
# (mode 700 in a private temp dir), never in a command line.
wrapper() {
    local name=$1
    shift
    {
        echo '#!/usr/bin/env bash'
        printf 'export %q\n' "$@"
        echo 'exec "$@"'
    } >"$WORK/$name"
    chmod 700 "$WORK/$name"
}
wrapper with-ours \
    "LRBENCH_S3_KEY_ID=$LABRELAY_TEST_S3_ACCESS_KEY_ID" \
    "LRBENCH_S3_SECRET=$LABRELAY_TEST_S3_SECRET_ACCESS_KEY" \
    "LABRELAY_SYSTEM_CONFIG=/nonexistent" "XDG_CONFIG_HOME=$WORK/xdg" "LABRELAY_NO_PROGRESS=1"
wrapper with-rclone \
    "RCLONE_CONFIG=$WORK/rclone.conf" \
    RCLONE_CONFIG_GARAGE_TYPE=s3 RCLONE_CONFIG_GARAGE_PROVIDER=Other \
    "RCLONE_CONFIG_GARAGE_ENDPOINT=$S3_EP" \
    "RCLONE_CONFIG_GARAGE_ACCESS_KEY_ID=$LABRELAY_TEST_S3_ACCESS_KEY_ID" \
    "RCLONE_CONFIG_GARAGE_SECRET_ACCESS_KEY=$LABRELAY_TEST_S3_SECRET_ACCESS_KEY" \
    "RCLONE_CONFIG_GARAGE_REGION=$S3_REGION" RCLONE_CONFIG_GARAGE_FORCE_PATH_STYLE=true
: >"$WORK/rclone.conf"
wrapper with-aws \
    "AWS_ACCESS_KEY_ID=$LABRELAY_TEST_S3_ACCESS_KEY_ID" \
    "AWS_SECRET_ACCESS_KEY=$LABRELAY_TEST_S3_SECRET_ACCESS_KEY" \
    "AWS_DEFAULT_REGION=$S3_REGION" \
    "AWS_CONFIG_FILE=$WORK/aws-config" "AWS_SHARED_CREDENTIALS_FILE=$WORK/aws-credentials"
: >"$WORK/aws-config"
: >"$WORK/aws-credentials"

# The LIMS upload-pure asks for the project's contacts: one project in SQLite.
"$PY" - "$WORK/lims.db" <<'PY'
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
db.execute("""CREATE TABLE t_project (project_id TEXT PRIMARY KEY, customer_name TEXT,
  customer_email TEXT, action_man TEXT, sale_man TEXT, info_email TEXT)""")
db.execute("""INSERT INTO t_project VALUES ('BENCH1', 'Bench Customer',
  'customer@bench.invalid', 'analyst@bench.invalid', 'sales@bench.invalid',
  'info@bench.invalid')""")
db.commit()
PY

# upload-pure's configuration: embedded state and outbox in the work dir; the delivery
# settings are the defaults (16 small files / 4 large files at once, 8 MiB parts, 4 parts
# in flight per file, MD5 manifest, presigned links, customer mail).
our_config() { # our_config FILE SFTP_PORT
    cat >"$1" <<TOML
[paths]
data_dir = "$WORK/state"

[databases.lims]
url = "sqlite://$WORK/lims.db"

[storage.garage]
url = "s3://$BUCKET/$RUN"
endpoint = "$S3_EP"
region = "$S3_REGION"
path_style = true
allow_http = true
access_key_id = "env:LRBENCH_S3_KEY_ID"
secret_access_key = "env:LRBENCH_S3_SECRET"

[storage.local]
url = "$WORK/dest-ours"
create_root = true

[storage.sftp]
url = "sftp://$SFTP_USER@127.0.0.1:$2/~/$RUN"
key_file = "$SFTP_KEY"
known_hosts = "$SFTP_KH"

[mail]
from = "labrelay bench <bench@localhost>"

[delivery]
target = "garage"

[delivery.project_lookup]
database = "lims"
sql = """
SELECT customer_name, customer_email, action_man AS action_email,
       sale_man AS sales_email, info_email
FROM t_project WHERE project_id = :project_id"""
TOML
}
CFG=$WORK/config.toml
our_config "$CFG" "$SFTP_PORT"

# ---------------------------------------------------------------------------------------
# Measurement.
garage_ticks() { # utime + stime of the Garage process, all threads
    local s
    s=$(<"/proc/$GARAGE_PID/stat") || die "Garage (pid $GARAGE_PID) is gone"
    s=${s##*) }
    # shellcheck disable=SC2086
    set -- $s
    echo $((${12} + ${13}))
}
busy_ticks() { # CPU time spent by the whole machine (all CPUs), not idle
    local _ u n s q sq st
    read -r _ u n s _ _ q sq st _ </proc/stat
    echo $((u + n + s + q + sq + st))
}
s3_requests() { # total S3 API calls Garage has served, or "" if its metrics are closed
    [[ -n $GARAGE_METRICS ]] || return 0
    timeout 5 curl -fsS "$GARAGE_METRICS" 2>/dev/null |
        awk '/^api_s3_request_counter\{/ { n += $NF } END { if (NR) printf "%d", n }' || true
}
# Wait until Garage is below 5% of a CPU for a second (the previous run's work is
# done), at most 60 s; the engineers' tests share this Garage.
wait_quiet() {
    local end=$((SECONDS + 60)) a b
    while ((SECONDS < end)); do
        a=$(garage_ticks)
        sleep 1
        b=$(garage_ticks)
        ((b - a <= CLK_TCK / 20)) && return 0
    done
    warn "Garage still busy after 60 s (other tests?); measuring anyway"
}

declare -A R_WALL R_RSS R_CPU R_GCPU R_OTHER R_REQ R_OK R_FILES R_BYTES R_TOP
ORDER=()
FAILED=0

# measure CASE TOOL FILES BYTES CMD...: one timed run of CMD under /usr/bin/time -v.
measure() {
    local cname=$1 tool=$2 files=$3 bytes=$4 rc=0
    shift 4
    local key=$cname/$tool log=$WORK/logs/$cname-$tool
    ORDER+=("$key")
    R_FILES[$key]=$files R_BYTES[$key]=$bytes
    wait_quiet
    local g0 g1 b0 b1 q0 q1 t0 t1
    q0=$(s3_requests)
    "$PY" "$BENCH/cpu-others.py" snap "$log.procs0" || true
    g0=$(garage_ticks) b0=$(busy_ticks) t0=$EPOCHREALTIME
    bounded "$RUN_LIMIT" /usr/bin/time -v -o "$log.time" "$@" >"$log.out" 2>"$log.err" || rc=$?
    t1=$EPOCHREALTIME g1=$(garage_ticks) b1=$(busy_ticks)
    "$PY" "$BENCH/cpu-others.py" snap "$log.procs1" || true
    q1=$(s3_requests)
    R_TOP[$key]=$("$PY" "$BENCH/cpu-others.py" top "$log.procs0" "$log.procs1" \
        --exclude "$$" --exclude "$GARAGE_PID" 2>/dev/null || true)
    R_WALL[$key]=$(calc "$t1 - $t0" 3)
    R_RSS[$key]=$(awk -F': ' '/Maximum resident set size/ { printf "%.1f", $2 / 1024 }' "$log.time" 2>/dev/null || true)
    R_CPU[$key]=$(awk -F': ' '/User time|System time/ { s += $2 } END { printf "%.2f", s }' "$log.time" 2>/dev/null || true)
    R_GCPU[$key]=$(calc "($g1 - $g0) / $CLK_TCK")
    R_OTHER[$key]=$(calc "($b1 - $b0) / $CLK_TCK - ${R_CPU[$key]:-0} - ($g1 - $g0) / $CLK_TCK")
    R_REQ[$key]=-
    [[ -n $q0 && -n $q1 ]] && R_REQ[$key]=$((q1 - q0))
    if ((rc)); then
        R_OK[$key]="FAILED (exit $rc)"
        FAILED=1
        warn "$key exited $rc; last lines of $log.err:"
        tail -n 5 "$log.err" >&2
    else
        R_OK[$key]=ok
    fi
    say "$key: ${R_WALL[$key]} s, peak RSS ${R_RSS[$key]:-?} MiB, CPU ${R_CPU[$key]:-?} s, Garage CPU ${R_GCPU[$key]} s"
}

# check KEY MESSAGE: mark a run whose result is wrong although the tool said 0.
check_failed() {
    warn "$1: $2"
    [[ ${R_OK[$1]} == ok ]] && R_OK[$1]="WRONG ($2)"
    FAILED=1
}

# S3 objects under a prefix: "COUNT BYTES".
s3_size() {
    bounded 300 "$WORK/with-rclone" rclone size --json "garage:$BUCKET/$RUN/$1" 2>/dev/null |
        "$PY" -c 'import json,sys; d=json.load(sys.stdin); print(d["count"], d["bytes"])'
}

# verify_s3 KEY DEST FILES BYTES OURS: the objects are all there (ours: plus md5sum.txt,
# which must match the local files).
verify_s3() {
    local key=$1 dest=$2 files=$3 bytes=$4 ours=$5 src=$6 got count size
    [[ ${R_OK[$key]} == ok ]] || return 0
    got=$(s3_size "$dest") || { check_failed "$key" "cannot list the upload"; return 0; }
    read -r count size <<<"$got"
    if ((ours)); then
        ((count == files + 1 && size > bytes)) ||
            check_failed "$key" "$count objects / $size bytes, expected $files files + md5sum.txt"
        grep -q '"type":"summary".*"status":"delivered"' "$WORK/logs/${key/\//-}.out" ||
            check_failed "$key" "no 'delivered' summary on stdout"
        bounded 300 "$WORK/with-rclone" rclone cat "garage:$BUCKET/$RUN/$dest/md5sum.txt" \
            >"$WORK/md5sum-$dest.txt" 2>/dev/null || { check_failed "$key" "no md5sum.txt"; return 0; }
        (cd "$src" && bounded 600 md5sum -c --quiet --strict "$WORK/md5sum-$dest.txt" >&2) ||
            check_failed "$key" "md5sum.txt does not match the data"
        [[ $(wc -l <"$WORK/md5sum-$dest.txt") -eq $files ]] ||
            check_failed "$key" "md5sum.txt does not list $files files"
    else
        ((count == files && size == bytes)) ||
            check_failed "$key" "$count objects / $size bytes, expected $files / $bytes"
    fi
}

fresh_large() { # fresh_large DIR COUNT MIB: new random bytes, flushed to disk before timing
    local i
    mkdir -p "$1"
    for ((i = 1; i <= $2; i++)); do
        bounded 300 openssl rand -out "$1/big$i.bin" $(($3 * 1024 * 1024)) ||
            die "openssl rand failed"
    done
    bounded 300 sync
}
fresh_small() {
    bounded 300 "$PY" "$BENCH/mkdata.py" "$1" "$SMALL_FILES" "$SMALL_FOLDERS" "$SMALL_SIZE" ||
        die "mkdata.py failed"
    bounded 300 sync
}

# s3_case CASE FRESH DIR FILES BYTES: ours and the three peers on fresh data each.
s3_case() {
    local cname=$1 fresh=$2 dir=$3 files=$4 bytes=$5 tool
    for tool in ours rclone rclone-t16 aws-cli; do
        say "$cname: $tool (fresh data)"
        $fresh
        local dest=$tool-$cname
        UPLOADED=1
        case $tool in
        ours) measure "$cname" "$tool" "$files" "$bytes" "$WORK/with-ours" "$OURS" --config "$CFG" \
            --project-id BENCH1 --analysis-path "$dir" --name "$dest" --target garage --json ;;
        rclone) measure "$cname" "$tool" "$files" "$bytes" "$WORK/with-rclone" \
            rclone copy "$dir" "garage:$BUCKET/$RUN/$dest" ;;
        rclone-t16) measure "$cname" "$tool" "$files" "$bytes" "$WORK/with-rclone" \
            rclone copy --transfers 16 --checkers 16 "$dir" "garage:$BUCKET/$RUN/$dest" ;;
        aws-cli) measure "$cname" "$tool" "$files" "$bytes" "$WORK/with-aws" \
            aws s3 cp --recursive --only-show-errors --endpoint-url "$S3_EP" "$dir" \
            "s3://$BUCKET/$RUN/$dest/" ;;
        esac
        verify_s3 "$cname/$tool" "$dest" "$files" "$bytes" "$([[ $tool == ours ]] && echo 1 || echo 0)" "$dir"
    done
}

# ---------------------------------------------------------------------------------------
say "$MODE run: ${cases[*]}; $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"

if want small; then
    fresh_small "$WORK/data/small"
    s3_case small "fresh_small $WORK/data/small" "$WORK/data/small" "$SMALL_FILES" \
        $((SMALL_FILES * SMALL_SIZE))
fi
if want large; then
    s3_case large "fresh_large $WORK/data/large $LARGE_COUNT $LARGE_MIB" "$WORK/data/large" \
        "$LARGE_COUNT" $((LARGE_COUNT * LARGE_MIB * 1024 * 1024))
fi

if want many; then
    for n in "$MANY_FILES" "$MANY_GROWTH_FILES"; do
        cname=many
        ((n == MANY_FILES)) || cname=many3x
        dir=$WORK/data/many-$n
        say "$cname: $n x 1 KiB in 200 folders"
        bounded 900 "$PY" "$BENCH/mkdata.py" "$dir" "$n" 200 1024 || die "mkdata.py failed"
        bounded 300 sync
        measure "$cname" ours "$n" $((n * 1024)) "$WORK/with-ours" "$OURS" --config "$CFG" \
            --project-id BENCH1 --analysis-path "$dir" --name "many-$n" --target local -q
        got=$(find "$WORK/dest-ours/many-$n" -type f | wc -l)
        ((got == n + 1)) || check_failed "$cname/ours" "$got files in the target, expected $((n + 1))"
        if ((n == MANY_FILES)); then
            bounded 300 sync
            measure "$cname" rsync "$n" $((n * 1024)) rsync -a "$dir/" "$WORK/dest-rsync/"
            bounded 300 sync
            measure "$cname" rclone-t16 "$n" $((n * 1024)) "$WORK/with-rclone" \
                rclone copy --transfers 16 --checkers 16 "$dir" "$WORK/dest-rclone"
        fi
        rm -rf "$WORK/dest-rsync" "$WORK/dest-rclone" "$dir"
    done
fi

if want memory; then
    # Eight fresh large files and 200 small ones at once to Garage: memory must stay
    # bounded by the part buffer budget, not by files x parts.
    dir=$WORK/data/memory
    fresh_large "$dir" 8 "$MEMORY_MIB"
    bounded 300 "$PY" "$BENCH/mkdata.py" "$dir/small" 200 10 10240 || die "mkdata.py failed"
    bounded 300 sync
    UPLOADED=1
    measure memory ours 208 $((8 * MEMORY_MIB * 1024 * 1024 + 200 * 10240)) "$WORK/with-ours" \
        "$OURS" --config "$CFG" --project-id BENCH1 --analysis-path "$dir" --name memory \
        --target garage -q
fi

SFTP_CIPHER="" SFTP_NOTE=""
if want sftp; then
    # Which cipher does upload-pure (ssh2 = libssh2) get from this sshd? Point it at a
    # probe that records its KEXINIT, then force the same on OpenSSH's side.
    say "sftp: cipher upload-pure negotiates (KEXINIT probe)"
    mkdir -p "$WORK/probe/x" "$WORK/probe-state"
    echo probe >"$WORK/probe/x/a"
    rm -f "$WORK/probe/port"
    timeout 90 "$PY" "$BENCH/ssh-kexinit.py" --port-file "$WORK/probe/port" \
        --server "127.0.0.1:$SFTP_PORT" --timeout 60 >"$WORK/probe/result" 2>"$WORK/probe/err" &
    probe_pid=$!
    for _ in $(seq 100); do [[ -s $WORK/probe/port ]] && break; sleep 0.1; done
    if [[ -s $WORK/probe/port ]]; then
        our_config "$WORK/probe/config.toml" "$(cat "$WORK/probe/port")"
        sed -i "s|^data_dir = .*|data_dir = \"$WORK/probe-state\"|; s|^\[delivery\]\$|[retry]\nattempts = 1\n\n[delivery]|" \
            "$WORK/probe/config.toml"
        # Expected to fail (the probe hangs up after the KEXINIT).
        bounded 60 "$WORK/with-ours" "$OURS" --config "$WORK/probe/config.toml" -q \
            --project-id BENCH1 --analysis-path "$WORK/probe/x" --target sftp >/dev/null 2>&1 || true
    fi
    wait "$probe_pid" 2>/dev/null || true
    SFTP_CIPHER=$(sed -n 's/^cipher=//p' "$WORK/probe/result")
    if [[ -z $SFTP_CIPHER ]]; then
        SFTP_CIPHER=chacha20-poly1305@openssh.com
        SFTP_NOTE="probe failed ($(head -c 200 "$WORK/probe/err")); assumed $SFTP_CIPHER, libssh2's first choice"
        warn "$SFTP_NOTE"
    else
        SFTP_NOTE="$(sed -n 's/^client_banner=//p' "$WORK/probe/result") negotiates $SFTP_CIPHER, compression $(sed -n 's/^compression=//p' "$WORK/probe/result"); sftp forced to -c $SFTP_CIPHER -o Compression=no"
        say "$SFTP_NOTE"
    fi

    printf 'mkdir %s\nmkdir %s/sftp-sftp\n' "$RUN" "$RUN" >"$WORK/mkdir.batch"
    bounded 60 sftp "${SSH_OPTS[@]}" -P "$SFTP_PORT" -b "$WORK/mkdir.batch" "$SFTP_USER@127.0.0.1" >/dev/null || die "cannot create ~$SFTP_USER/$RUN on the test sshd"
    SFTP_MADE=1
    sftp_bytes=$((SFTP_MIB * 1024 * 1024))

    say "sftp: ours (fresh data)"
    fresh_large "$WORK/data/sftp" 1 "$SFTP_MIB"
    measure sftp ours 1 "$sftp_bytes" "$WORK/with-ours" "$OURS" --config "$CFG" \
        --project-id BENCH1 --analysis-path "$WORK/data/sftp" --name ours-sftp --target sftp --json
    if [[ ${R_OK[sftp/ours]} == ok ]]; then
        grep -q '"type":"summary".*"status":"delivered"' "$WORK/logs/sftp-ours.out" ||
            check_failed sftp/ours "no 'delivered' summary on stdout"
        got=$(bounded 60 ssh "${SSH_OPTS[@]}" -p "$SFTP_PORT" "$SFTP_USER@127.0.0.1" \
            stat -c %s "$RUN/ours-sftp/big1.bin" 2>/dev/null) || got=missing
        [[ $got == "$sftp_bytes" ]] || check_failed sftp/ours "remote size $got"
    fi

    say "sftp: OpenSSH sftp -b put (fresh data)"
    fresh_large "$WORK/data/sftp" 1 "$SFTP_MIB"
    printf 'put %s %s\n' "$WORK/data/sftp/big1.bin" "$RUN/sftp-sftp/big1.bin" >"$WORK/sftp.batch"
    measure sftp sftp 1 "$sftp_bytes" sftp "${SSH_OPTS[@]}" -c "$SFTP_CIPHER" -o Compression=no \
        -P "$SFTP_PORT" -b "$WORK/sftp.batch" "$SFTP_USER@127.0.0.1"
    if [[ ${R_OK[sftp/sftp]} == ok ]]; then
        got=$(bounded 60 ssh "${SSH_OPTS[@]}" -p "$SFTP_PORT" "$SFTP_USER@127.0.0.1" \
            stat -c %s "$RUN/sftp-sftp/big1.bin" 2>/dev/null) || got=missing
        [[ $got == "$sftp_bytes" ]] || check_failed sftp/sftp "remote size $got"
        # Ours verifies on the server after the upload (files of 128 MiB and more: 4
        # ranges, md5sum'ed in parallel); sftp does not verify. How much of ours' time is
        # that? Time one whole-file md5sum on the peer's copy, and the range command.
        t0=$EPOCHREALTIME
        if bounded 300 ssh "${SSH_OPTS[@]}" -p "$SFTP_PORT" "$SFTP_USER@127.0.0.1" \
            md5sum "$RUN/sftp-sftp/big1.bin" >/dev/null 2>&1; then
            SFTP_NOTE+="; on the server one md5sum of the file takes $(calc "$EPOCHREALTIME - $t0") s"
        fi
        q=$RUN/sftp-sftp/big1.bin r=$((SFTP_MIB / 4 * 1048576))
        t0=$EPOCHREALTIME
        if bounded 300 ssh "${SSH_OPTS[@]}" -p "$SFTP_PORT" "$SFTP_USER@127.0.0.1" \
            "(head -c $r -- $q | md5sum) & (tail -c +$((r + 1)) -- $q | head -c $r | md5sum) &
             (tail -c +$((2 * r + 1)) -- $q | head -c $r | md5sum) & (tail -c +$((3 * r + 1)) -- $q | md5sum) & wait" \
            >/dev/null 2>&1; then
            SFTP_NOTE+=", 4 ranges in parallel (ours' verification) $(calc "$EPOCHREALTIME - $t0") s"
        fi
    fi
fi

# ---------------------------------------------------------------------------------------
# Report (stdout).
files_s() { calc "${R_FILES[$1]} / ${R_WALL[$1]}" 1; }
mb_s() { calc "${R_BYTES[$1]} / 1000000 / ${R_WALL[$1]}" 1; }
ok_run() { [[ -n ${R_OK[$1]:-} && ${R_OK[$1]} == ok ]]; }
# ratio CASE PEER: ours' throughput over the peer's (same data, so the inverse of the times)
ratio() { calc "${R_WALL[$1/$2]} / ${R_WALL[$1/ours]}"; }
mark() { awk "BEGIN { exit !($1 >= $2) }" && echo PASS || echo FAIL; }

commit=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')
[[ -n $(git -C "$REPO" status --porcelain 2>/dev/null | head -1) ]] && commit+=" + uncommitted changes"
echo
echo "labrelay delivery benchmark ($MODE), $(date -u +%Y-%m-%dT%H:%MZ), commit $commit"
echo "$(nproc) CPUs; upload-pure $("$OURS" --version 2>/dev/null | awk '{print $NF}') (release);" \
    "$(rclone version 2>/dev/null | head -1); $(aws --version 2>&1 | cut -d' ' -f1,4);" \
    "$(ssh -V 2>&1)"
echo "small: $SMALL_FILES x $((SMALL_SIZE / 1024)) KiB in $SMALL_FOLDERS folders;" \
    "large: $LARGE_COUNT x $LARGE_MIB MiB; sftp: 1 x $SFTP_MIB MiB; fresh random data for every run"
[[ -n $SFTP_NOTE ]] && echo "sftp: $SFTP_NOTE"
echo
fmt='%-6s %-11s %7s %9s %8s %9s %8s %9s %8s %8s %8s %8s %6s  %s\n'
# shellcheck disable=SC2059
printf "$fmt" case tool files MB wall_s files/s MB/s RSS_MiB cpu_s garage_s other_s s3_req ratio result
for key in "${ORDER[@]}"; do
    c=${key%%/*} t=${key#*/}
    r=-
    [[ $t != ours ]] && ok_run "$c/ours" && ok_run "$key" && r=$(ratio "$c" "$t")
    g=${R_GCPU[$key]}
    [[ $c == sftp ]] && g=- && R_REQ[$key]=-
    # shellcheck disable=SC2059
    printf "$fmt" "$c" "$t" "${R_FILES[$key]}" "$(calc "${R_BYTES[$key]} / 1000000" 1)" \
        "${R_WALL[$key]}" "$(files_s "$key")" "$(mb_s "$key")" "${R_RSS[$key]:--}" \
        "${R_CPU[$key]:--}" "$g" "${R_OTHER[$key]}" "${R_REQ[$key]}" "$r" "${R_OK[$key]}"
done
echo
echo "targets (marks, not exit codes):"
target() { # target CASE PEER MIN WHAT
    local r
    if ok_run "$1/ours" && ok_run "$1/$2"; then
        r=$(ratio "$1" "$2")
        printf '  %-6s ours >= %sx %-34s %6sx  %s\n' "$1" "$3" "$4" "$r" "$(mark "$r" "$3")"
    elif [[ -n ${R_OK[$1/ours]:-} ]]; then
        printf '  %-6s ours >= %sx %-34s %6s   n/a (a run failed)\n' "$1" "$3" "$4" -
    fi
}
target small rclone "$T_SMALL_RCLONE" "rclone defaults (files/s)"
target small rclone-t16 "$T_SMALL_RCLONE16" "rclone --transfers 16 (files/s)"
target large aws-cli "$T_LARGE" "aws-cli (MB/s)"
if ok_run large/ours; then # the issue's wording: the faster peer, which was aws-cli there
    fastest="" best=""
    for t in rclone rclone-t16 aws-cli; do
        ok_run "large/$t" || continue
        if [[ -z $best ]] || awk "BEGIN { exit !(${R_WALL[large/$t]} < $best) }"; then
            best=${R_WALL[large/$t]} fastest=$t
        fi
    done
    [[ -n $fastest && $fastest != aws-cli ]] && target large "$fastest" "$T_LARGE" "$fastest (fastest peer, MB/s)"
fi
target sftp sftp "$T_SFTP" "OpenSSH sftp (MB/s)"
target many rsync "$T_MANY_RSYNC" "rsync -a (files/s; 0.667 = 1.5x its time)"
target many rclone-t16 "$T_MANY_RCLONE16" "rclone --transfers 16, local (files/s)"
if ok_run many/ours && ok_run many3x/ours; then
    growth=$(calc "(${R_RSS[many3x/ours]} - ${R_RSS[many/ours]}) * 1024 / ($MANY_GROWTH_FILES - $MANY_FILES)" 3)
    printf '  %-6s ours RSS growth <= %s KiB/file %22s %6s   %s\n' many "$T_MANY_GROWTH_KIB" "" "$growth" \
        "$(awk "BEGIN { exit !($growth <= $T_MANY_GROWTH_KIB) }" && echo PASS || echo FAIL)"
fi
for c in small large sftp many memory; do
    ok_run "$c/ours" || continue
    printf '  %-6s ours peak RSS <= %s MiB %25s %6s   %s\n' "$c" "$T_RSS_MIB" "" "${R_RSS[$c/ours]}" \
        "$(awk "BEGIN { exit !(${R_RSS[$c/ours]} <= $T_RSS_MIB) }" && echo PASS || echo FAIL)"
done
echo
echo "wall_s: whole command (start, lookup, manifest, upload, md5sum.txt, links, mail for ours)."
echo "RSS_MiB: peak resident set (/usr/bin/time -v). cpu_s: the tool's user+system CPU."
echo "garage_s: Garage's CPU during the run; other_s: CPU used by everything else on the machine"
echo "(other tests, sshd for sftp) - high values mean a noisy run. s3_req: S3 calls Garage served."
echo "ratio: ours' throughput divided by this tool's (above 1: ours is faster). MB = 10^6 bytes."
noisy=""
for key in "${ORDER[@]}"; do
    if awk "BEGIN { exit !(${R_OTHER[$key]} >= 0.25 * ${R_WALL[$key]}) }"; then
        noisy+="  $key: other_s ${R_OTHER[$key]}; busiest other processes: ${R_TOP[$key]:-none seen}"$'\n'
    fi
done
[[ -n $noisy ]] && printf '\nruns where others used a quarter of a CPU or more (other_s >= wall_s / 4):\n%s' "$noisy"
((keep)) && echo "logs: $WORK/logs"
exit "$FAILED"
