#!/usr/bin/env bash
# Stop the test cluster started by start_cluster.sh (by PID file); --purge also deletes its state.
set -uo pipefail
BASE=${SLURM_TEST_DIR:-/tmp/mnist-ddp-slurm}
RUN=$BASE/run MUNGE=$BASE/munge
export SLURM_CONF=$BASE/etc/slurm.conf
alive() { [ -n "${1:-}" ] && [ -r "/proc/$1/stat" ] && [ "$(awk '{print $3}' "/proc/$1/stat")" != Z ]; }
stop() {  # SIGTERM, up to 15 s, then SIGKILL
  local pid; pid=$( [ -s "$1" ] && cat "$1" ); alive "$pid" || return 0
  kill -TERM "$pid" 2>/dev/null
  for _ in $(seq 1 30); do alive "$pid" || return 0; sleep 0.5; done
  kill -KILL "$pid" 2>/dev/null
}
if [ -s "$RUN/slurmctld.pid" ] && alive "$(cat "$RUN/slurmctld.pid")"; then
  jobs=$(squeue -h -o %A 2>/dev/null || true)
  if [ -n "$jobs" ]; then
    scancel $jobs 2>/dev/null || true
    for _ in $(seq 1 40); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.5; done
  fi
fi
for f in "$RUN"/slurmd-*.pid; do [ -e "$f" ] && stop "$f"; done
stop "$RUN/slurmctld.pid"
stop "$MUNGE/munged.pid"
rm -f "$RUN"/*.pid "$MUNGE/munged.pid"
if [ "${1:-}" = --purge ]; then
  rm -rf "$BASE"
  if grep -q '# mnist-ddp slurm test$' /etc/hosts; then
    grep -v '# mnist-ddp slurm test$' /etc/hosts > /tmp/hosts.$$ && cat /tmp/hosts.$$ > /etc/hosts && rm -f /tmp/hosts.$$
  fi
fi
exit 0
