#!/usr/bin/env bash
# A one-node SLURM on localhost for the submission tests: `.ci/slurm.sh start` / `.ci/slurm.sh stop`.
# Debian's slurmctld/slurmd/slurm-client (22.05) and munge, no systemd, run as root. State lives in
# $SLURM_RUN (default /tmp/pd-slurm); the config is /etc/slurm/slurm.conf (sbatch's default).
set -euo pipefail
RUN=${SLURM_RUN:-/tmp/pd-slurm}
CONF=/etc/slurm/slurm.conf

start() {
  if ! command -v slurmctld >/dev/null || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
  fi
  mkdir -p "$RUN"/state "$RUN"/spool "$RUN"/log /etc/slurm /etc/munge /run/munge /var/lib/munge /var/log/munge
  [ -s /etc/munge/munge.key ] || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
  chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
  chmod 700 /etc/munge; chmod 400 /etc/munge/munge.key
  if ! munge -n >/dev/null 2>&1; then runuser -u munge -- /usr/sbin/munged; touch "$RUN/.munged"; fi
  for _ in $(seq 50); do munge -n | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  host=$(hostname -s)
  read -r cpus memory < <(slurmd -C | sed -n 's/.*CPUs=\([0-9]*\).*RealMemory=\([0-9]*\).*/\1 \2/p')
  cat > "$CONF" <<CONF
ClusterName=pd
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$RUN/state
SlurmdSpoolDir=$RUN/spool
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$RUN/log/slurmctld.log
SlurmdLogFile=$RUN/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=5
MinJobAge=600
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
  /usr/sbin/slurmctld -c -f "$CONF"
  /usr/sbin/slurmd -c -f "$CONF"
  for _ in $(seq 60); do
    case "$(sinfo -h -N -o %t 2>/dev/null || true)" in idle*|mix*|alloc*) echo "SLURM up: $(sinfo -h -N -o '%N %c CPUs %t')"; return 0;; esac
    sleep 0.5
  done
  echo "SLURM did not come up; see $RUN/log" >&2
  return 1
}

stop_pid() {
  [ -s "$1" ] || return 0
  local pid; pid=$(cat "$1")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$1"
}

stop() {
  stop_pid "$RUN/slurmd.pid"
  stop_pid "$RUN/slurmctld.pid"
  if [ -e "$RUN/.munged" ]; then pkill -x munged || true; rm -f "$RUN/.munged"; fi
  echo "SLURM stopped"
}

"${1:?usage: .ci/slurm.sh start|stop}"
