#!/usr/bin/env bash
# A throw-away SLURM cluster on this host for the tests: munged, slurmctld and two
# slurmd "nodes" (node1, node2 -> 127.0.0.1, own ports), all state under $SLURM_TEST_DIR.
# Installs Debian's slurmctld/slurmd/slurm-client/munge if missing (needs root).
# Idempotent. Prints `export SLURM_CONF=...` on success.
#
#   SLURM_TEST_DIR   state/config/logs   (default /tmp/mnist-ddp-slurm)
#   SLURM_TEST_GPUS  fake GPUs per node, so --gpus-per-node=N is accepted (default 1)
set -euo pipefail

BASE=${SLURM_TEST_DIR:-/tmp/mnist-ddp-slurm}
GPUS=${SLURM_TEST_GPUS:-1}
NODES=(node1 node2)
ETC=$BASE/etc RUN=$BASE/run LOG=$BASE/log MUNGE=$BASE/munge
export SLURM_CONF=$ETC/slurm.conf
say() { echo "[slurm-test] $*" >&2; }
alive() { [ -n "${1:-}" ] && [ -r "/proc/$1/stat" ] && [ "$(awk '{print $3}' "/proc/$1/stat")" != Z ]; }
pid_in() { [ -s "$1" ] && cat "$1" || true; }

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
   || ! command -v munged >/dev/null; then
  say "installing slurmctld slurmd slurm-client munge"
  # no init system here: stop the packages' scripts from starting services
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null; }
  rm -f /usr/sbin/policy-rc.d
fi

mkdir -p "$ETC" "$RUN" "$LOG" "$MUNGE"
chmod 0755 "$BASE" "$MUNGE"   # munged insists its socket folder is world-searchable

if ! alive "$(pid_in "$MUNGE/munged.pid")"; then
  [ -s "$MUNGE/munge.key" ] || mungekey -c -k "$MUNGE/munge.key"
  chmod 0600 "$MUNGE/munge.key"
  rm -f "$MUNGE"/munge.socket.2* "$MUNGE/munged.pid"
  munged --key-file="$MUNGE/munge.key" --socket="$MUNGE/munge.socket.2" --pid-file="$MUNGE/munged.pid" \
         --seed-file="$MUNGE/munged.seed" --log-file="$LOG/munged.log"
fi

# jobs look up the first node's name (MASTER_ADDR / rendezvous host): resolve to loopback
for n in "${NODES[@]}"; do
  getent hosts "$n" >/dev/null || echo "127.0.0.1 $n  # mnist-ddp slurm test" >> /etc/hosts
done

MEM_MB=$(( $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) * 4 / 10 ))
GRES="" ; : > "$ETC/gres.conf"
if [ "$GPUS" -gt 0 ]; then
  # slurmd counts a GPU only with a File= character device: /dev/null look-alikes
  mkdir -p "$RUN/fakegpu"
  for i in $(seq 0 $((GPUS - 1))); do [ -c "$RUN/fakegpu/gpu$i" ] || mknod "$RUN/fakegpu/gpu$i" c 1 3; done
  echo "Name=gpu File=$RUN/fakegpu/gpu[0-$((GPUS - 1))]" > "$ETC/gres.conf"
  GRES=" Gres=gpu:$GPUS"
fi
cat > "$ETC/slurm.conf" <<CONF
ClusterName=mnistddp
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job is held (Reason=BeginTime) for about cred_expire s before it may start again
# (measured: 11 s at 10, 7 s at 5; default 120; slurm 22.05 rejects values under 5 and falls
# back to the default)
AuthInfo=socket=$MUNGE/munge.socket.2,cred_expire=5
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$RUN/state
SlurmdSpoolDir=$RUN/spool/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
MinJobAge=600
# SIGTERM -> SIGKILL of a step's tasks (default 30): short, so that test_slurm.py's slowed stop
# checkpoint (15 s) outlasts it, as a slow shared filesystem outlasts a real cluster's
KillWait=10
InactiveLimit=0
# impossible requests fail at submit instead of pending forever
EnforcePartLimits=ALL
SlurmdParameters=config_overrides
$( [ "$GPUS" -gt 0 ] && echo GresTypes=gpu )
NodeName=node1 NodeHostname=localhost NodeAddr=127.0.0.1 Port=17101 CPUs=$(nproc) RealMemory=$MEM_MB$GRES State=UNKNOWN
NodeName=node2 NodeHostname=localhost NodeAddr=127.0.0.1 Port=17102 CPUs=$(nproc) RealMemory=$MEM_MB$GRES State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF

if ! alive "$(pid_in "$RUN/slurmctld.pid")"; then
  rm -rf "$RUN/state" "$RUN/spool"; mkdir -p "$RUN/state"
  slurmctld -c
fi
for n in "${NODES[@]}"; do
  mkdir -p "$RUN/spool/$n"
  alive "$(pid_in "$RUN/slurmd-$n.pid")" || slurmd -N "$n"
done

for _ in $(seq 1 120); do
  states=$(sinfo -h -N -o '%N %T' 2>/dev/null || true)
  if [ -n "$states" ] && ! echo "$states" | awk '$2 !~ /^(idle|mixed|allocated|completing)$/ {bad=1} END {exit !bad}'; then
    say "ready: $(echo "$states" | tr '\n' ' ')"
    echo "export SLURM_CONF=$SLURM_CONF"
    exit 0
  fi
  echo "$states" | awk '$2 ~ /down|drain/ {print $1}' | while read -r n; do scontrol update NodeName="$n" State=RESUME 2>/dev/null || true; done
  sleep 0.5
done
say "cluster not ready:"; sinfo -N >&2 || true; tail -n 20 "$LOG/slurmctld.log" >&2 || true
exit 1
