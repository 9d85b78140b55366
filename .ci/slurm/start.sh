#!/usr/bin/env bash
# Start a one-node SLURM cluster (munged, slurmctld, slurmd; two fake GPUs) for testing the
# SLURM profile. Needs root; installs slurm-wlm and munge with apt-get when they are missing.
# Every file it writes lives under STATE_DIR (config, spool, logs, PID files), plus a link
# /etc/slurm/slurm.conf -> STATE_DIR/slurm.conf so that job steps find the cluster too.
# Stop it with .ci/slurm/stop.sh STATE_DIR (kills exactly the daemons started here, by PID).
# Usage: .ci/slurm/start.sh STATE_DIR
# Exit status: 0 started, 2 not root, 3 SLURM missing and no apt-get, 4 a daemon failed to start,
# 5 /etc/slurm/slurm.conf belongs to another SLURM setup.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
state="${1:?usage: start.sh STATE_DIR}"
mkdir -p "$state"
state="$(cd "$state" && pwd)"

if [ "$(id -u)" != 0 ]; then
    echo "start.sh: needs root to run the SLURM daemons" >&2
    exit 2
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    if ! command -v apt-get >/dev/null; then
        echo "start.sh: SLURM is not installed and apt-get is not available" >&2
        exit 3
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq slurm-wlm munge >/dev/null 2>&1 \
        || { apt-get update -qq && apt-get install -y -qq slurm-wlm munge >/dev/null; }
fi

host="$(hostname -s)"
ctld_port="${MASKDISTILL_SLURMCTLD_PORT:-16817}"
slurmd_port="${MASKDISTILL_SLURMD_PORT:-16818}"
mkdir -p "$state/ctld" "$state/slurmd"
for name in slurm.conf gres.conf; do
    sed -e "s|@HOST@|$host|g" -e "s|@STATE@|$state|g" -e "s|@CTLD_PORT@|$ctld_port|g" \
        -e "s|@SLURMD_PORT@|$slurmd_port|g" "$here/$name.in" > "$state/$name"
done
cat > "$state/task_prolog.sh" <<'EOF'
#!/bin/sh
# SLURM TaskProlog: a "print" line goes to the job's standard output (its log file).
echo "print maskdistill-ci job=$SLURM_JOB_ID step=${SLURM_STEP_ID:-batch} partition=$SLURM_JOB_PARTITION CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-none}"
EOF
chmod +x "$state/task_prolog.sh"
export SLURM_CONF="$state/slurm.conf"

# Job steps do not inherit SLURM_CONF (the executor plugin strips SLURM_* variables before its
# nested srun), so the config must also be at the default path. Link it there unless another
# SLURM setup owns that path; a link left by an earlier run of this script is replaced.
link=/etc/slurm/slurm.conf
if [ -e "$link" ] || [ -L "$link" ]; then
    if [ -L "$link" ] && { [ ! -e "$link" ] || grep -q '^ClusterName=maskdistill-ci' "$link"; }; then
        rm -f "$link"
    else
        echo "start.sh: $link belongs to another SLURM setup; not replacing it" >&2
        exit 5
    fi
fi
mkdir -p /etc/slurm
ln -s "$SLURM_CONF" "$link"

# munge authenticates the SLURM daemons; start munged only when none answers.
if ! (munge -n </dev/null | unmunge >/dev/null) 2>/dev/null; then
    [ -s /etc/munge/munge.key ] || { mungekey --create --force 2>/dev/null || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; }
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do
        [ -s /run/munge/munged.pid ] && (munge -n </dev/null | unmunge >/dev/null) 2>/dev/null && break
        sleep 0.2
    done
    cp /run/munge/munged.pid "$state/munged.pid" 2>/dev/null || true
    if ! (munge -n </dev/null | unmunge >/dev/null) 2>/dev/null; then
        echo "start.sh: munged did not start" >&2
        exit 4
    fi
fi

slurmctld -f "$SLURM_CONF" || { echo "start.sh: slurmctld failed, see $state/slurmctld.log" >&2; exit 4; }
slurmd -f "$SLURM_CONF" || { echo "start.sh: slurmd failed, see $state/slurmd.log" >&2; exit 4; }
for _ in $(seq 120); do
    if [ "$(sinfo -h -N -o %T 2>/dev/null | sort -u | tr -d '\n')" = idle ]; then
        echo "SLURM_CONF=$SLURM_CONF"
        exit 0
    fi
    sleep 0.5
done
echo "start.sh: the node did not become idle: $(sinfo -N -o '%N %T %E' 2>&1 | tail -n +2)" >&2
tail -5 "$state/slurmctld.log" "$state/slurmd.log" >&2 || true
exit 4
