#!/usr/bin/env bash
# A single-node SLURM for the cluster-recipe tests (tests/test_slurm.py): munge, slurmctld and slurmd
# as root, no cgroups (ProctrackType=proctrack/linuxproc, TaskPlugin=task/none), one partition with
# this machine's CPUs and memory as `slurmd -C` reports them. Needs root and Debian's slurm-wlm and
# munge (--install installs them with apt-get). Prints "slurm ready: ..." and exits 0 once the node
# takes jobs; else prints why and exits 1 (the tests then skip with that reason).
# Idempotent: a SLURM that already answers is left as it is; a slurm.conf this script did not write is
# never replaced.
set -euo pipefail

MARK="# written by mcp-medsam tests/slurm/start.sh"
CONF=/etc/slurm/slurm.conf

fail() { echo "slurm not started: $*"; exit 1; }

if [ "${1:-}" = "--install" ] && ! command -v slurmctld >/dev/null 2>&1; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurm-wlm munge; } >/dev/null 2>&1 || fail "apt-get could not install slurm-wlm and munge"
fi
for tool in munged slurmctld slurmd sbatch sinfo scontrol; do
    command -v "$tool" >/dev/null 2>&1 || fail "$tool is not installed (apt-get install slurm-wlm munge)"
done
[ "$(id -u)" = 0 ] || fail "needs root (slurmd runs jobs as their user)"

ready() { sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; }
if ready; then
    echo "slurm ready (already running): $(sinfo -V)"
    exit 0
fi

# munge: a key, its run folder, the daemon as the munge user.
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
fi
if ! munge -n </dev/null >/dev/null 2>&1; then
    runuser -u munge -- munged --force || fail "munged did not start"
fi
for _ in $(seq 50); do munge -n </dev/null >/dev/null 2>&1 && break; sleep 0.2; done
munge -n </dev/null | unmunge >/dev/null 2>&1 || fail "munge does not answer"

# slurm.conf for this one node.
if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    fail "$CONF exists and was not written by this script (not replaced)"
fi
node=$(slurmd -C | head -1)  # NodeName=HOST CPUs=... RealMemory=...
host=$(echo "$node" | sed -E 's/^NodeName=([^ ]+).*/\1/')
install -d /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
cat >"$CONF" <<CONF
$MARK
ClusterName=mcpmedsam
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
$node State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF

pgrep -x slurmctld >/dev/null || slurmctld -c || fail "slurmctld did not start: $(tail -3 /var/log/slurm/slurmctld.log)"
pgrep -x slurmd >/dev/null || slurmd || fail "slurmd did not start: $(tail -3 /var/log/slurm/slurmd.log)"
for _ in $(seq 150); do
    ready && { echo "slurm ready: $(sinfo -V), node $host ($(sinfo -h -o '%c CPUs, %m MB'))"; exit 0; }
    sleep 0.2
done
fail "the node never became idle: $(sinfo -h 2>&1 | head -2); $(tail -2 /var/log/slurm/slurmd.log)"
