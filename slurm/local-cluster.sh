#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the tests (tests/slurm_cluster.py) and for trying `scan_dist.cluster`.
#
#   slurm/local-cluster.sh start    install slurm-wlm + munge if missing, start munged/slurmctld/slurmd, wait for idle,
#                                   print the `export` lines (eval "$(slurm/local-cluster.sh start)")
#   slurm/local-cluster.sh stop     cancel this cluster's jobs, stop the daemons whose pids start recorded
#   slurm/local-cluster.sh status   recorded daemons alive or not, and sinfo
#   slurm/local-cluster.sh env      just the export lines (SLURM_CONF, and PATH with the sacct stand-in first)
#
# Everything lives in ${SCAN_DIST_SLURM_DIR:-/tmp/scan_dist_slurm}: the munge key and socket, slurm.conf, state,
# spool, logs, the daemons' pids (pids/*.pid) and bin/sacct.  Nothing under /etc is written; the port pair is private
# (recorded in ports), so a system cluster or another state dir on the same machine does not interfere.
# Needs root (the daemons run as root, SlurmUser=root); as another user it re-runs itself with `sudo -n`.
# No systemd, no cgroups, no accounting daemon: proctrack/linuxproc, task/none, and job states for finished jobs come
# from the job-completion log (jobcomp/filetxt), which bin/sacct reads once slurmctld has forgotten a job.
# Facts and pitfalls behind these choices: ../../shared/SLURM_NOTES.md (munge socket dir 0755, config_overrides,
# cred_expire=10, ...).
#
# Exit status: 0 ok; 1 the daemons did not come up (log tails on stderr); 2 usage; 3 cannot install/run here
# (not root and no passwordless sudo, no apt-get, install failed).
set -euo pipefail

STATE_DIR="${SCAN_DIST_SLURM_DIR:-/tmp/scan_dist_slurm}"
STATE_DIR="${STATE_DIR%/}"
CONF="$STATE_DIR/slurm.conf"
BIN_DIR="$STATE_DIR/bin"
PID_DIR="$STATE_DIR/pids"
LOG_DIR="$STATE_DIR/log"
MUNGE_KEY_DIR="$STATE_DIR/munge/key"   # 0700, key + seed + log (munged insists on a private dir for its key)
MUNGE_RUN_DIR="$STATE_DIR/munge/run"   # 0755, the socket (munged refuses a socket in a dir others cannot search)
MUNGE_SOCKET="$MUNGE_RUN_DIR/munge.socket"
PARTITION=debug
NODE="$(hostname -s)"
START_TIMEOUT_S="${SCAN_DIST_SLURM_TIMEOUT:-60}"
DAEMONS=(munged slurmctld slurmd)   # start order; stop goes the other way

export SLURM_CONF="$CONF"
export PATH="$PATH:/usr/sbin:/sbin:/usr/bin:/bin"   # the daemons and mungekey live in /usr/sbin

say() { printf '[local-cluster] %s\n' "$*" >&2; }
die() { local code="$1"; shift; say "ERROR: $*"; exit "$code"; }

usage() {
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

env_lines() {
    printf 'export SLURM_CONF=%s\n' "$CONF"
    printf 'export PATH=%s:$PATH\n' "$BIN_DIR"
}

# ---- root ----------------------------------------------------------------------------------------------------------
ensure_root() {  # start/stop need root: re-run under passwordless sudo, keeping the state dir
    [ "$(id -u)" -eq 0 ] && return 0
    command -v sudo >/dev/null 2>&1 || die 3 "not root and sudo is not installed; run as root"
    sudo -n true 2>/dev/null || die 3 "not root and sudo needs a password; run as root or allow passwordless sudo"
    exec sudo -n -- env "SCAN_DIST_SLURM_DIR=$STATE_DIR" "SCAN_DIST_SLURM_TIMEOUT=$START_TIMEOUT_S" \
        "PATH=$PATH" bash "$0" "$@"
}

# ---- packages ------------------------------------------------------------------------------------------------------
have_packages() {
    local cmd
    for cmd in munged mungekey slurmctld slurmd sinfo scontrol sbatch srun squeue scancel; do
        command -v "$cmd" >/dev/null 2>&1 || return 1
    done
}

install_packages() {
    have_packages && return 0
    command -v apt-get >/dev/null 2>&1 || die 3 "slurm/munge are not installed and apt-get is not available"
    local t0=$SECONDS apt=(apt-get -o DPkg::Lock::Timeout=300 -o Acquire::Retries=3)
    say "installing slurm-wlm and munge with apt-get (once per machine, ~10-15 s)"
    # On a fresh machine the package lists are empty: update first.  Otherwise try without, and update on failure.
    if ! apt-cache show slurm-wlm >/dev/null 2>&1; then
        "${apt[@]}" update -qq >&2 || die 3 "apt-get update failed"
    fi
    if ! DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y -qq slurm-wlm munge >"$STATE_DIR/apt.log" 2>&1; then
        "${apt[@]}" update -qq >&2 || true
        DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y -qq slurm-wlm munge >"$STATE_DIR/apt.log" 2>&1 \
            || { tail -n 20 "$STATE_DIR/apt.log" >&2; die 3 "apt-get install slurm-wlm munge failed"; }
    fi
    have_packages || die 3 "slurm-wlm/munge installed but their commands are missing"
    say "apt-get install took $((SECONDS - t0)) s"
}

# ---- pids ----------------------------------------------------------------------------------------------------------
# A recorded pid counts only while /proc/PID/comm is still that daemon (pids are recycled) and it is no zombie (where
# the reaper of orphans, e.g. a container's PID 1, is slow to reap).
running() {  # running PID: alive and not a zombie
    local stat
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
    stat="${stat##*) }"
    [ "${stat%% *}" != Z ]
}

pid_of() {  # prints the recorded pid of $1 if that process is alive and is $1
    local f="$PID_DIR/$1.pid" pid comm
    [ -s "$f" ] || return 1
    pid="$(tr -dc '0-9' <"$f")"
    [ -n "$pid" ] || return 1
    comm="$(cat "/proc/$pid/comm" 2>/dev/null)" || return 1
    [ "$comm" = "$1" ] && running "$pid" || return 1
    printf '%s\n' "$pid"
}

all_alive() { local d; for d in "${DAEMONS[@]}"; do pid_of "$d" >/dev/null || return 1; done; }
any_recorded() { compgen -G "$PID_DIR/*.pid" >/dev/null; }

record_pid() {  # record_pid NAME DAEMON_PIDFILE: wait (10 s) for the daemon's own pid file, copy it to pids/NAME.pid
    local name="$1" src="$2" i pid
    for i in $(seq 1 100); do
        if [ -s "$src" ]; then
            pid="$(tr -dc '0-9' <"$src")"
            if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ]; then
                printf '%s\n' "$pid" >"$PID_DIR/$name.pid"
                return 0
            fi
        fi
        sleep 0.1
    done
    return 1
}

kill_recorded() {  # TERM the recorded daemons (slurmd, slurmctld, munged), KILL after 10 s; remove the pid files
    local i d pid pids=()
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
        d="${DAEMONS[$i]}"
        if pid="$(pid_of "$d")"; then
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
        fi
    done
    for i in $(seq 1 100); do
        local left=()
        for pid in ${pids[@]+"${pids[@]}"}; do running "$pid" && left+=("$pid"); done
        [ ${#left[@]} -eq 0 ] && break
        [ "$i" -eq 100 ] && { say "killing ${left[*]} (still alive after 10 s)"; kill -KILL "${left[@]}" 2>/dev/null || true; }
        sleep 0.1
    done
    rm -f "$PID_DIR"/*.pid
}

cancel_jobs() {  # cancel every job of this (private) cluster so no job step outlives its slurmd
    pid_of slurmctld >/dev/null || return 0
    local ids
    ids="$(timeout 10 squeue -h -o %A 2>/dev/null | tr '\n' ' ')" || return 0
    [ -n "${ids// /}" ] || return 0
    say "cancelling jobs: $ids"
    # shellcheck disable=SC2086
    timeout 10 scancel $ids 2>/dev/null || true
    local i
    for i in $(seq 1 40); do
        [ -z "$(timeout 5 squeue -h -o %A 2>/dev/null)" ] && return 0
        sleep 0.5
    done
    say "jobs still listed after 20 s; stopping anyway"
}

# ---- ports ---------------------------------------------------------------------------------------------------------
port_in_use() {  # a TCP socket (v4 or v6) listening on local port $1 (TIME_WAIT leftovers do not stop slurm binding)
    local hex
    hex="$(printf '%04X' "$1")"
    awk -v h=":$hex" 'NR > 1 && $4 == "0A" && substr($2, length($2) - 4) == h { found = 1 } END { exit !found }' \
        /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

choose_ports() {  # reuse the recorded pair while free; else the first free pair from a start derived from the state dir
    local p
    if [ -s "$STATE_DIR/ports" ]; then
        read -r p _ <"$STATE_DIR/ports" || true
        if [[ "$p" =~ ^[0-9]+$ ]] && ! port_in_use "$p" && ! port_in_use $((p + 1)); then
            CTLD_PORT=$p; SLURMD_PORT=$((p + 1)); return 0
        fi
    fi
    local base=$((16900 + ($(printf '%s' "$STATE_DIR" | cksum | cut -d' ' -f1) % 500) * 2)) i
    for ((i = 0; i < 500; i++)); do
        p=$((16900 + (base - 16900 + 2 * i) % 1000))
        if ! port_in_use "$p" && ! port_in_use $((p + 1)); then
            CTLD_PORT=$p; SLURMD_PORT=$((p + 1))
            printf '%s %s\n' "$CTLD_PORT" "$SLURMD_PORT" >"$STATE_DIR/ports"
            return 0
        fi
    done
    die 1 "no free port pair in 16900-17899"
}

# ---- files ---------------------------------------------------------------------------------------------------------
write_munge_files() {
    mkdir -p "$MUNGE_KEY_DIR" "$MUNGE_RUN_DIR"
    if [ ! -s "$MUNGE_KEY_DIR/munge.key" ]; then
        mungekey --create --keyfile="$MUNGE_KEY_DIR/munge.key" 2>/dev/null \
            || dd if=/dev/urandom of="$MUNGE_KEY_DIR/munge.key" bs=1024 count=1 status=none
    fi
    chmod 0700 "$MUNGE_KEY_DIR"
    chmod 0755 "$MUNGE_RUN_DIR"
    chmod 0600 "$MUNGE_KEY_DIR/munge.key"
}

write_slurm_conf() {
    local cpus mem_mb
    cpus="$(nproc)"
    mem_mb=$(($(awk '/^MemTotal:/ { print $2 }' /proc/meminfo) / 1024))
    mkdir -p "$STATE_DIR/ctld" "$STATE_DIR/spool" "$STATE_DIR/run" "$LOG_DIR"
    cat >"$CONF.tmp" <<EOF
# Generated by slurm/local-cluster.sh on $(date -Is); rewritten at every start.  One node: this machine.
ClusterName=scandist
SlurmctldHost=${NODE}(127.0.0.1)
SlurmctldPort=${CTLD_PORT}
SlurmdPort=${SLURMD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
# cred_expire=10: a requeued job restarts ~14 s after the signal instead of ~2 min (SLURM_NOTES.md)
AuthInfo=socket=${MUNGE_SOCKET},cred_expire=10
StateSaveLocation=${STATE_DIR}/ctld
SlurmdSpoolDir=${STATE_DIR}/spool
SlurmctldPidFile=${STATE_DIR}/run/slurmctld.pid
SlurmdPidFile=${STATE_DIR}/run/slurmd.pid
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${LOG_DIR}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no systemd, no cgroups
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
# no accounting daemon; finished jobs are logged here for bin/sacct
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=${STATE_DIR}/jobcomp.txt
MinJobAge=30
# SIGTERM to SIGKILL on requeue/cancel: 5 s (default 30) so a requeued test job stops promptly (submitit ignores SIGTERM)
KillWait=5
ReturnToService=2
# the node's real hardware may report less memory/CPUs than below: do not drain it for that
SlurmdParameters=config_overrides
MailProg=/bin/true
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem_mb} State=UNKNOWN
PartitionName=${PARTITION} Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP
EOF
    mv -f "$CONF.tmp" "$CONF"
    chmod 0644 "$CONF"
}

write_sacct() {  # bin/sacct: `sacct -o FIELDS --parsable2 -j ID[,ID] ...` answered from scontrol + the jobcomp log
    mkdir -p "$BIN_DIR"
    cat >"$BIN_DIR/sacct.tmp" <<'PYEOF'
#!/usr/bin/env python3
"""Stand-in for `sacct` on the local test cluster, which has no accounting database (slurm/local-cluster.sh).

Answers what submitit asks (`sacct -o JobID,State,NodeList --parsable2 -j ID -j ID ...`) from
`scontrol -o show job` for jobs slurmctld still knows, and from the job-completion log (JobCompLoc in slurm.conf)
for jobs it has already purged (MinJobAge).  Prints only job allocations (no .batch/.0 step lines).  Understands
-o/--format, -j/--jobs, -n/--noheader, -P/--parsable2, -p/--parsable, --delimiter; ignores other options.
"""
import os
import re
import subprocess
import sys

CANON = {  # lower-case sacct field -> (header, scontrol key)
    "jobid": ("JobID", None), "jobidraw": ("JobIDRaw", "JobId"), "state": ("State", "JobState"),
    "nodelist": ("NodeList", "NodeList"), "exitcode": ("ExitCode", "ExitCode"), "jobname": ("JobName", "JobName"),
    "partition": ("Partition", "Partition"), "start": ("Start", "StartTime"), "end": ("End", "EndTime"),
    "submit": ("Submit", "SubmitTime"), "elapsed": ("Elapsed", "RunTime"), "alloccpus": ("AllocCPUS", "NumCPUs"),
    "nnodes": ("NNodes", "NumNodes"), "user": ("User", "UserId"), "timelimit": ("Timelimit", "TimeLimit"),
    "restarts": ("Restarts", "Restarts"), "reason": ("Reason", "Reason"), "workdir": ("WorkDir", "WorkDir"),
}
TAKES_VALUE = {"-A", "--accounts", "-C", "--constraints", "-E", "--endtime", "-S", "--starttime", "-g", "--gid",
               "--group", "-i", "--nnodes", "-I", "--ncpus", "-M", "--clusters", "-N", "--nodelist", "--name",
               "-q", "--qos", "-r", "--partition", "-s", "--state", "-T", "--truncate", "-u", "--uid", "--user",
               "-W", "--wckeys", "-x", "--associations", "--units", "--json", "--yaml", "-e", "--helpformat"}
KEY_RE = re.compile(r"(?:^|\s)([A-Za-z_:/]+)=")


def parse_record(line):
    """`Key=value Key=value ...` -> dict; a value runs to the next ` Key=` (values may contain spaces)."""
    keys = list(KEY_RE.finditer(line))
    rec = {}
    for i, m in enumerate(keys):
        end = keys[i + 1].start() if i + 1 < len(keys) else len(line)
        rec.setdefault(m.group(1), line[m.end():end].strip())
    return rec


def sacct_jobid(rec):
    array_job, task = rec.get("ArrayJobId"), rec.get("ArrayTaskId")
    if array_job and task and task not in ("N/A", "4294967294"):
        task = task.split("%")[0]
        return f"{array_job}_{task}" if task.isdigit() else f"{array_job}_[{task}]"
    return rec.get("JobId", "")


def wanted(rec, ids):
    if not ids:
        return True
    names = {rec.get("JobId", ""), rec.get("ArrayJobId", ""), sacct_jobid(rec)}
    return bool(names & ids)


def conf_value(key):
    try:
        with open(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")) as f:
            for line in f:
                k, _, v = line.partition("=")
                if k.strip().lower() == key.lower():
                    return v.split("#")[0].strip()
    except OSError:
        pass
    return None


def main(argv):
    fields, ids, header, delim, trailing = ["JobID", "JobName", "Partition", "State", "ExitCode"], set(), True, None, False
    i = 0
    while i < len(argv):
        arg = argv[i]
        opt, eq, val = arg.partition("=")
        if opt in ("-o", "--format", "-j", "--jobs", "--delimiter") and not eq:
            i += 1
            val = argv[i] if i < len(argv) else ""
        if opt in ("-o", "--format"):
            fields = [f.split("%")[0] for f in val.split(",") if f]
        elif opt in ("-j", "--jobs"):
            ids.update(x.strip() for x in val.split(",") if x.strip())
        elif opt in ("-n", "--noheader"):
            header = False
        elif opt in ("-P", "--parsable2"):
            delim = delim or "|"
        elif opt in ("-p", "--parsable"):
            delim, trailing = delim or "|", True
        elif opt == "--delimiter":
            delim = val
        elif opt in TAKES_VALUE and not eq:
            i += 1
        elif arg.startswith("-") and len(arg) > 2 and not arg.startswith("--") and arg[1] in "oj":
            # -oJobID,State / -j123
            argv[i:i + 1] = [arg[:2], arg[2:]]
            continue
        i += 1

    proc = subprocess.run(["scontrol", "-o", "show", "job"], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(f"sacct (local stand-in): scontrol failed: {proc.stderr.strip()}\n")
        return 1
    records, seen = [], set()
    for line in proc.stdout.splitlines():
        if "JobId=" not in line:
            continue
        rec = parse_record(line)
        if wanted(rec, ids):
            records.append(rec)
            seen.add(rec.get("JobId"))
    # jobs slurmctld has purged: the last completion record of each (a requeued job is logged once per run)
    comp = conf_value("JobCompLoc")
    if comp and os.path.isfile(comp):
        done = {}
        with open(comp, errors="replace") as f:
            for line in f:
                if "JobId=" not in line:
                    continue
                rec = parse_record(line)
                if rec.get("JobId") not in seen and wanted(rec, ids):
                    done[rec["JobId"]] = rec
        records.extend(done.values())

    heads = [CANON.get(f.lower(), (f, f))[0] for f in fields]
    rows = []
    for rec in records:
        row = []
        for f in fields:
            key = CANON.get(f.lower(), (f, f))[1]
            if f.lower() == "jobid":
                v = sacct_jobid(rec)
            else:  # the completion log calls JobName "Name"
                v = rec.get(key, rec.get("Name", "") if key == "JobName" else "")
            if f.lower() == "nodelist" and v in ("", "(null)"):
                v = "None assigned"
            if f.lower() == "state" and v.startswith("PREEMPTED"):
                v = "PREEMPTED"
            row.append(v)
        rows.append(row)
    out = []
    if delim is not None:
        if header:
            out.append(delim.join(heads) + (delim if trailing else ""))
        out += [delim.join(r) + (delim if trailing else "") for r in rows]
    else:
        widths = [max([10, len(h)] + [len(r[k]) for r in rows]) for k, h in enumerate(heads)]
        if header:
            out.append(" ".join(h.rjust(w) for h, w in zip(heads, widths)))
            out.append(" ".join("-" * w for w in widths))
        out += [" ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
    if out:
        print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
PYEOF
    chmod 0755 "$BIN_DIR/sacct.tmp"
    mv -f "$BIN_DIR/sacct.tmp" "$BIN_DIR/sacct"
}

# ---- daemons -------------------------------------------------------------------------------------------------------
detached() {  # detached OUTFILE CMD...: run CMD (a daemon that forks itself) with stdin /dev/null, stdout/stderr to
    # OUTFILE and no other inherited descriptor: munged keeps what it inherits, and a daemon holding our lock or a
    # caller's pipe (pytest's captured stdout) would block the next start or hang the caller.
    local out="$1"; shift
    (
        for fd in /proc/$BASHPID/fd/*; do
            fd="${fd##*/}"
            [ "$fd" -gt 2 ] 2>/dev/null && eval "exec $fd>&-"
        done
        exec "$@" </dev/null >>"$out" 2>&1
    )
}

start_munged() {
    local args=(--key-file="$MUNGE_KEY_DIR/munge.key" --socket="$MUNGE_SOCKET"
                --pid-file="$MUNGE_RUN_DIR/munged.pid" --log-file="$MUNGE_KEY_DIR/munged.log"
                --seed-file="$MUNGE_KEY_DIR/munged.seed")
    rm -f "$MUNGE_RUN_DIR/munged.pid"
    # munged runs as user munge (what Debian's package does) when that user exists and the start works; otherwise as
    # root (munged accepts root when it owns the key), which is just as good for a private one-node cluster.
    if id munge >/dev/null 2>&1; then
        chown -R munge:munge "$STATE_DIR/munge"
        if detached "$LOG_DIR/munged.out" runuser -u munge -- munged "${args[@]}" \
                && record_pid munged "$MUNGE_RUN_DIR/munged.pid"; then
            say "munged running as user munge (pid $(cat "$PID_DIR/munged.pid"))"
            return 0
        fi
        say "munged did not start as user munge; trying as root"
        chown -R root:root "$STATE_DIR/munge"
    fi
    detached "$LOG_DIR/munged.out" munged "${args[@]}" && record_pid munged "$MUNGE_RUN_DIR/munged.pid" \
        || fail "munged did not start"
    say "munged running as root (pid $(cat "$PID_DIR/munged.pid"))"
}

start_slurm_daemon() {  # start_slurm_daemon NAME: daemonizes itself (stdio detached), writes run/NAME.pid
    local name="$1"
    rm -f "$STATE_DIR/run/$name.pid"
    detached "$LOG_DIR/$name.out" "$name" -f "$CONF" || fail "$name exited with status $?"
    record_pid "$name" "$STATE_DIR/run/$name.pid" || fail "$name did not write its pid file"
}

log_tails() {
    local f
    for f in "$MUNGE_KEY_DIR/munged.log" "$LOG_DIR"/munged.out "$LOG_DIR"/slurmctld.log "$LOG_DIR"/slurmctld.out \
             "$LOG_DIR"/slurmd.log "$LOG_DIR"/slurmd.out; do
        [ -s "$f" ] || continue
        printf -- '---- tail of %s (known-harmless PMIx lines left out)\n' "$f" >&2
        grep -v -E 'pmix|PMIx|MPI: Cannot create context' "$f" | tail -n 15 >&2 || true
    done
}

fail() {  # a start failed: show why, take down what did start, exit 1
    say "ERROR: $*"
    log_tails
    kill_recorded
    exit 1
}

node_state() { timeout 10 sinfo -h -N -n "$NODE" -p "$PARTITION" -o %T 2>/dev/null | head -n 1; }

wait_idle() {
    local t0=$SECONDS state="" resumed=0
    while ((SECONDS - t0 < START_TIMEOUT_S)); do
        local d
        for d in "${DAEMONS[@]}"; do pid_of "$d" >/dev/null || fail "$d died while the cluster was coming up"; done
        state="$(node_state)" || true
        case "$state" in
            idle | mixed | allocated | completing) return 0 ;;
            drained* | down | draining*)  # a state saved by an earlier run: slurmd is up, so put the node back
                if [ "$resumed" -eq 0 ] && ((SECONDS - t0 >= 3)); then
                    scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
                    resumed=1
                fi ;;
        esac
        sleep 0.25
    done
    fail "node $NODE not idle after ${START_TIMEOUT_S} s (sinfo state: '${state:-no answer}')"
}

# ---- commands ------------------------------------------------------------------------------------------------------
cmd_start() {
    local t0=$SECONDS
    mkdir -p "$STATE_DIR" "$PID_DIR" "$LOG_DIR"
    chmod 0755 "$STATE_DIR"
    exec 9>"$STATE_DIR/lock"
    flock -w 120 9 || die 1 "another start/stop holds $STATE_DIR/lock"
    if all_alive && [ -s "$CONF" ] && [ "$(node_state)" != "" ]; then
        say "already running ($STATE_DIR, node $NODE: $(node_state))"
        env_lines
        return 0
    fi
    if any_recorded; then
        say "stopping the rest of a partly running cluster"
        cancel_jobs
        kill_recorded
    fi
    install_packages
    local t1
    t1="$(date +%s.%N)"
    choose_ports
    write_munge_files
    write_slurm_conf
    write_sacct
    start_munged
    start_slurm_daemon slurmctld
    start_slurm_daemon slurmd
    wait_idle
    say "cluster up in $(awk -v a="$t1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }') s" \
        "(total with install $((SECONDS - t0)) s): node $NODE, partition $PARTITION," \
        "ports $CTLD_PORT/$SLURMD_PORT, state $STATE_DIR"
    env_lines
}

cmd_stop() {
    [ -d "$STATE_DIR" ] || { say "nothing to stop ($STATE_DIR does not exist)"; return 0; }
    exec 9>"$STATE_DIR/lock"
    flock -w 120 9 || die 1 "another start/stop holds $STATE_DIR/lock"
    if ! any_recorded; then
        say "not running (no pid files in $PID_DIR)"
        return 0
    fi
    cancel_jobs
    kill_recorded
    say "stopped"
}

cmd_status() {
    local d pid rc=0
    for d in "${DAEMONS[@]}"; do
        if pid="$(pid_of "$d")"; then
            printf '%-10s running (pid %s)\n' "$d" "$pid"
        else
            printf '%-10s not running\n' "$d"
            rc=1
        fi
    done
    printf 'state dir  %s\n' "$STATE_DIR"
    if [ "$rc" -eq 0 ]; then
        timeout 10 sinfo || rc=1
        timeout 10 squeue || true
    fi
    return "$rc"
}

case "${1:-}" in
    start) ensure_root "$@"; cmd_start ;;
    stop) ensure_root "$@"; cmd_stop ;;
    status) cmd_status ;;
    env) env_lines ;;
    *) usage ;;
esac
