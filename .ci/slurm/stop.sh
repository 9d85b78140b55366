#!/usr/bin/env bash
# Stop what .ci/slurm/start.sh STATE_DIR started: cancel its jobs, then end slurmd, slurmctld and
# (if start.sh launched it) munged by the PIDs they wrote under STATE_DIR, and remove the link
# /etc/slurm/slurm.conf that start.sh made. Never kills by name.
# Usage: .ci/slurm/stop.sh STATE_DIR
set -uo pipefail
state="${1:?usage: stop.sh STATE_DIR}"
[ -d "$state" ] || exit 0
export SLURM_CONF="$state/slurm.conf"

if [ -s "$state/slurmctld.pid" ] && kill -0 "$(cat "$state/slurmctld.pid")" 2>/dev/null; then
    jobs="$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')"
    if [ -n "${jobs// /}" ]; then
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null
        for _ in $(seq 60); do  # until the jobs have left the queue (completing ones too)
            [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
            sleep 0.5
        done
    fi
fi

stop_pid() {  # stop_pid PIDFILE: SIGTERM, wait up to 10 s, then SIGKILL
    local file="$1" pid
    [ -s "$file" ] || return 0
    pid="$(cat "$file")"
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
    fi
    rm -f "$file"
}

stop_pid "$state/slurmd.pid"
stop_pid "$state/slurmctld.pid"
stop_pid "$state/munged.pid"
# A job step daemon (slurmstepd) whose job was still completing keeps retrying to report to the
# stopped slurmd. Those of this cluster hold its log file open: end them by their PIDs.
# Job processes that outlived a cancelled job carry this cluster's name in their environment.
{
    find /proc/[0-9]*/fd -maxdepth 1 -lname "$state/slurmd.log" 2>/dev/null | cut -d/ -f3
    grep -l -z -x "SLURM_CLUSTER_NAME=maskdistill-ci" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3
} | sort -u | while read -r pid; do
    [ "$pid" != "$$" ] && kill -9 "$pid" 2>/dev/null
done
if [ "$(readlink /etc/slurm/slurm.conf 2>/dev/null)" = "$SLURM_CONF" ]; then
    rm -f /etc/slurm/slurm.conf
fi
exit 0
