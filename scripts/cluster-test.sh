#!/usr/bin/env bash
# Prove the SLURM path on this machine: start a real one-node SLURM (munged, MariaDB + slurmdbd so
# that sacct works, slurmctld, slurmd), run a small generated cohort through
# `snakemake --profile workflow/profiles/slurm`, run the same cohort and seed locally with
# `--cores 2`, and compare every NIfTI map and the evaluation tables.
#
# Usage, as root on a Debian machine:  bash scripts/cluster-test.sh
# Exit 0 only if every job ran through SLURM (sacct: COMPLETED) and the maps are equal.
# Everything lives in a fresh work directory under /tmp (CLUSTER_TEST_KEEP=1 keeps it after a pass;
# after a failure it is always kept). The daemons get their own sockets and free ports; the only
# system files written are /etc/slurm/slurm.conf and slurmdbd.conf (inside each job the slurm-jobstep
# plugin drops SLURM_CONF before calling srun, which then reads the default place), removed at exit.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
ETC=/etc/slurm
MARK="# written by anomri scripts/cluster-test.sh; work dir:"
DAEMONS="slurmd slurmctld slurmdbd mariadbd munged"   # stop order
TIMEOUT=${CLUSTER_TEST_TIMEOUT:-900}                   # seconds per snakemake run
say() { echo "cluster-test: $*"; }
die() { echo "cluster-test: error: $*" >&2; exit 2; }

[ "$(id -u)" = 0 ] || die "run as root: it installs packages and starts the SLURM daemons"
command -v apt-get > /dev/null || die "needs a Debian-like machine (apt-get)"

pidfile() {  # pidfile WORK DAEMON
  case $2 in
    munged) echo "$1/munge/munged.pid" ;;
    mariadbd) echo "$1/mysql/mysqld.pid" ;;
    *) echo "$1/slurm/$2.pid" ;;
  esac
}

stop_daemons() {  # stop_daemons WORK: the daemons started with that work dir, by their PIDs
  local name pid
  for name in $DAEMONS; do
    pid=$(cat "$(pidfile "$1" "$name")" 2> /dev/null) || continue
    # Only the daemon this script started: the PID must still belong to that program.
    [ "$(cat "/proc/$pid/comm" 2> /dev/null)" = "$name" ] || continue
    kill "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2> /dev/null || break; sleep 0.2; done
    if kill -0 "$pid" 2> /dev/null; then kill -9 "$pid"; fi
    say "stopped $name (pid $pid)"
  done
}

# A run killed before its cleanup left its config behind: stop its daemons first.
if [ -f "$ETC/slurm.conf" ]; then
  previous=$(sed -n "s|^$MARK ||p" "$ETC/slurm.conf")
  [ -n "$previous" ] || die "$ETC/slurm.conf exists and was not written by this script; not touching a real SLURM"
  stop_daemons "$previous"
  rm -f "$ETC/slurm.conf" "$ETC/slurmdbd.conf"
  case $previous in /tmp/anomri-cluster-test.*) rm -rf "$previous" ;; esac
fi

# ---------------------------------------------------------------- 1. packages
missing=$(for tool in slurmctld slurmd slurmdbd sinfo sacct munged mariadbd mariadb-install-db; do
  command -v "$tool" > /dev/null || echo "$tool"; done)
if [ -n "$missing" ]; then
  say "installing slurm-wlm, slurmdbd, munge, mariadb-server (missing: ${missing//$'\n'/ })"
  # Install only: the daemons are started below, with this test's settings.
  own_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && own_policy=1
  fi
  apt_install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    slurm-wlm slurmdbd munge mariadb-server > /tmp/anomri-cluster-test-apt.log 2>&1; }
  apt_install || { apt-get update -q > /dev/null && apt_install; } || die "apt-get install failed: /tmp/anomri-cluster-test-apt.log"
  if [ "$own_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
fi

# ---------------------------------------------------------------- 4. executor plugin
[ -x .venv/bin/python ] || bash scripts/setup.sh demo
PY=$REPO/.venv/bin/python
"$PY" -c "import snakemake_executor_plugin_slurm" 2> /dev/null ||
  "$PY" -m pip install --quiet snakemake-executor-plugin-slurm
say "snakemake $("$PY" -m snakemake --version), plugin $("$PY" -m pip show snakemake-executor-plugin-slurm | sed -n 's/^Version: //p')"

WORK=$(mktemp -d /tmp/anomri-cluster-test.XXXXXX)
chmod 755 "$WORK"   # munged wants every directory above its socket searchable
passed=0
running=""   # the snakemake run in progress (its timeout process)
cleanup() {
  set +e
  # SIGINT: snakemake cancels its SLURM jobs and stops (SIGTERM would wait for them to finish).
  if [ -n "$running" ]; then kill -INT "$running" 2> /dev/null; wait "$running"; fi
  if [ -f "$ETC/slurm.conf" ] && grep -q "^$MARK $WORK\$" "$ETC/slurm.conf"; then
    if [ -s "$WORK/run_uuid" ]; then scancel --quiet "--name=$(cat "$WORK/run_uuid")"; fi
    stop_daemons "$WORK"
    rm -f "$ETC/slurm.conf" "$ETC/slurmdbd.conf"
  else
    stop_daemons "$WORK"
  fi
  if [ "$passed" = 1 ] && [ "${CLUSTER_TEST_KEEP:-0}" != 1 ]; then rm -rf "$WORK"; else say "kept $WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_for() {  # wait_for SECONDS WHAT COMMAND...
  local seconds=$1 what=$2; shift 2
  for _ in $(seq "$seconds"); do "$@" > /dev/null 2>&1 && return 0; sleep 1; done
  die "$what did not come up within ${seconds}s (logs under $WORK)"
}

# ---------------------------------------------------------------- 2. configuration
mkdir -p "$WORK"/{munge,munge-key,mysql,slurm/state,slurm/spool,slurm/log}
chmod 755 "$WORK/munge"; chmod 700 "$WORK/munge-key"
NODE_LINE=$(slurmd -C | head -n 1)   # NodeName=<host> CPUs=... RealMemory=..., read from this machine
NODE=${NODE_LINE%% *}; NODE=${NODE#NodeName=}
PORT_DB=$(free_port); PORT_CTLD=$(free_port); PORT_D=$(free_port); PORT_DBD=$(free_port)
MUNGE_SOCKET=$WORK/munge/munge.socket
mkdir -p "$ETC"
cat > "$ETC/slurm.conf" << EOF
$MARK $WORK
ClusterName=anomritest
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$PORT_CTLD
SlurmdPort=$PORT_D
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$WORK/slurm/state
SlurmdSpoolDir=$WORK/slurm/spool
SlurmctldPidFile=$(pidfile "$WORK" slurmctld)
SlurmdPidFile=$(pidfile "$WORK" slurmd)
SlurmctldLogFile=$WORK/slurm/log/slurmctld.log
SlurmdLogFile=$WORK/slurm/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
ReturnToService=2
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$PORT_DBD
# the munge socket for slurmdbd connections (AuthInfo does not reach them)
AccountingStoragePass=$MUNGE_SOCKET
AccountingStoreFlags=job_comment
JobAcctGatherType=jobacct_gather/linux
$NODE_LINE NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=test Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
cat > "$ETC/slurmdbd.conf" << EOF
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$PORT_DBD
SlurmUser=root
PidFile=$(pidfile "$WORK" slurmdbd)
LogFile=$WORK/slurm/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$PORT_DB
StorageUser=slurm
StoragePass=anomri-cluster-test
StorageLoc=slurm_acct_db
EOF
chmod 600 "$ETC/slurmdbd.conf"
say "node: $NODE_LINE"

# ---------------------------------------------------------------- 3. daemons
dd if=/dev/urandom of="$WORK/munge-key/munge.key" bs=1024 count=1 status=none
chmod 400 "$WORK/munge-key/munge.key"
munged --socket="$MUNGE_SOCKET" --key-file="$WORK/munge-key/munge.key" --log-file="$WORK/munge/munged.log" \
  --pid-file="$(pidfile "$WORK" munged)" --seed-file="$WORK/munge/munged.seed"
wait_for 20 munged sh -c "munge -S '$MUNGE_SOCKET' -n | unmunge -S '$MUNGE_SOCKET'"

mariadb-install-db --no-defaults --datadir="$WORK/mysql/data" --user=root --auth-root-authentication-method=socket \
  --skip-test-db > "$WORK/mysql/install.log" 2>&1
setsid mariadbd --no-defaults --datadir="$WORK/mysql/data" --user=root --socket="$WORK/mysql/mysqld.sock" \
  --pid-file="$(pidfile "$WORK" mariadbd)" --port="$PORT_DB" --bind-address=127.0.0.1 --skip-name-resolve \
  --log-error="$WORK/mysql/error.log" --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900 \
  < /dev/null > /dev/null 2>&1 &
wait_for 60 mariadbd mariadb-admin --no-defaults --socket="$WORK/mysql/mysqld.sock" -uroot ping
mariadb --no-defaults --socket="$WORK/mysql/mysqld.sock" -uroot -e \
  "CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY 'anomri-cluster-test';
   GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"

slurmdbd
wait_for 60 slurmdbd sacctmgr -n show cluster
slurmctld
wait_for 60 slurmctld scontrol ping
nice -n 5 slurmd   # the jobs inherit its niceness: the cores are shared
wait_for 60 "node $NODE (idle)" sh -c "[ \"\$(sinfo -h -n '$NODE' -o %T)\" = idle ]"
for name in $DAEMONS; do say "started $name (pid $(cat "$(pidfile "$WORK" "$name")"))"; done
sinfo

# ---------------------------------------------------------------- 5. the cohort, through SLURM
# Both runs use one snapshot of the working tree (its anomri first on the path), so that edits made
# meanwhile cannot tell them apart, and the repository's .snakemake stays untouched.
SRC=$WORK/repo
mkdir "$SRC"
if git rev-parse --is-inside-work-tree > /dev/null 2>&1; then
  git ls-files -z -co --exclude-standard | tar --null --ignore-failed-read -T - -cf - | tar -xf - -C "$SRC"
else
  tar --exclude=./.venv --exclude=./results --exclude=./.snakemake -cf - . | tar -xf - -C "$SRC"
fi
export PYTHONPATH=$SRC${PYTHONPATH:+:$PYTHONPATH}
cat > "$WORK/cohort.yaml" << EOF
demo: {n_controls: 3, n_patients: 2, voxel_size: 6.0, scheme: 3shell, seed: 3}
training: {max_epochs: 4, patience: 2}
split: {folds: 2}
scoring: {scores: [vae-reg, neg-elbo, latent-nn-euclid], n_samples: 4, reference_size: 2000}
evaluation: {bootstrap: 200}
EOF
mkdir "$WORK/runs"
run_snakemake() {  # run_snakemake NAME ARGS...: a run into $WORK/runs/NAME, logged to $WORK/runs/NAME.log
  local name=$1 start=$SECONDS; shift
  # In the background, so that a signal reaches the traps at once (and they stop the run).
  (cd "$SRC" && exec timeout "$TIMEOUT" nice -n 5 "$PY" -m snakemake --configfile "$WORK/cohort.yaml" \
    --config "output_dir=$WORK/runs/$name" "$@") > "$WORK/runs/$name.log" 2>&1 &
  running=$!
  if ! wait "$running"; then
    running=""
    tail -n 40 "$WORK/runs/$name.log"
    die "the $name run failed or ran past ${TIMEOUT}s: $WORK/runs/$name.log"
  fi
  running=""
  say "$name run: $((SECONDS - start)) s"
}
# The repository's profile as it is; the first status check after 5 s instead of 40 s keeps the test short.
LOG=$WORK/runs/slurm.log
run_snakemake slurm --profile workflow/profiles/slurm --slurm-logdir "$WORK/slurm/jobs" \
  --slurm-keep-successful-logs --slurm-init-seconds-before-status-checks 5
sed -n 's/^SLURM run ID: //p' "$LOG" > "$WORK/run_uuid"

# ---------------------------------------------------------------- 6. the SLURM jobs it saw
# Every job of the run's job stats but `all`, which only collects the targets.
expected=$(awk '/^Job stats:/ {s = 1} s && $1 == "all" {n -= $2} s && $1 == "total" {print n + $2; exit}' "$LOG")
submitted=$(sed -n 's/.*submitted with SLURM jobid \([0-9]*\).*/\1/p' "$LOG" | sort -un)
say "SLURM job ids submitted: ${submitted//$'\n'/ }"
sacct -X -P -n "--name=$(cat "$WORK/run_uuid")" -o JobID,Comment,State,ExitCode,AllocCPUS,Elapsed > "$WORK/sacct.tsv"
echo "JobID|rule|State|ExitCode|AllocCPUS|Elapsed"; cat "$WORK/sacct.tsv"
n_submitted=$(wc -w <<< "$submitted")
n_accounted=$(wc -l < "$WORK/sacct.tsv")
n_completed=$(awk -F'|' '$3 == "COMPLETED" && $4 == "0:0"' "$WORK/sacct.tsv" | wc -l)
n_local=$(grep '^localrule ' "$LOG" | grep -vc '^localrule all:' || true)

# ---------------------------------------------------------------- 7. the same cohort, locally
run_snakemake local --cores 2
"$PY" - "$WORK/runs/slurm" "$WORK/runs/local" > "$WORK/compare.txt" << 'EOF' || true
"""Every NIfTI map (data bytes, dtype, affine) and evaluation table of two runs, compared exactly."""
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

a, b = Path(sys.argv[1]), Path(sys.argv[2])
maps = {p.relative_to(a) for p in a.rglob("*.nii.gz")}
other = {p.relative_to(b) for p in b.rglob("*.nii.gz")}
problems = [f"only in {a.name}: {p}" for p in sorted(maps - other)] + [f"only in {b.name}: {p}" for p in sorted(other - maps)]
for rel in sorted(maps & other):
    x, y = nib.load(a / rel), nib.load(b / rel)
    u, v = np.asarray(x.dataobj), np.asarray(y.dataobj)
    if u.dtype != v.dtype or u.shape != v.shape or u.tobytes() != v.tobytes() or not np.array_equal(x.affine, y.affine):
        diff = np.nanmax(np.abs(u.astype(float) - v.astype(float))) if u.shape == v.shape else "shape"
        problems.append(f"differs: {rel} (max |difference| {diff})")
tables = ["evaluation.tsv", "evaluation_summary.tsv"]
problems += [f"differs: {t}" for t in tables if (a / t).read_text() != (b / t).read_text()]
novelty = sum(1 for p in maps if p.name.endswith("_novelty.nii.gz"))
print("\n".join(problems) if problems else
      f"equal: {len(maps & other)} NIfTI files ({novelty} novelty maps) and {len(tables)} evaluation tables")
sys.exit(1 if problems or novelty == 0 else 0)
EOF
cat "$WORK/compare.txt"

# ---------------------------------------------------------------- 9. verdict (8: the trap stops the daemons)
fail=()
[ "$expected" -gt 0 ] || fail+=("no jobs in the SLURM run's job stats")
[ "$n_submitted" = "$expected" ] || fail+=("$n_submitted jobs submitted to SLURM, expected $expected")
[ "$n_accounted" = "$expected" ] || fail+=("sacct knows $n_accounted jobs of this run, expected $expected")
[ "$n_completed" = "$n_accounted" ] || fail+=("$((n_accounted - n_completed)) jobs not COMPLETED with exit 0:0")
[ "$n_local" = 0 ] || fail+=("$n_local jobs ran outside SLURM")
grep -q '^equal: ' "$WORK/compare.txt" || fail+=("the SLURM and local maps differ")
if [ ${#fail[@]} -gt 0 ]; then
  printf 'cluster-test: FAIL: %s\n' "${fail[@]}"
  exit 1
fi
passed=1
say "PASS in $SECONDS s: all $expected jobs ran through SLURM (sacct: COMPLETED); $(cat "$WORK/compare.txt")"
