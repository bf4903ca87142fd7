#!/usr/bin/env bash
# Stop what is left on this node of one launch of scripts/pretrain_multiple_nodes.sh: the processes
# whose environment carries MT2I_JOB_ID=JOB_ID (the launcher gives every rank a fresh id), so that
# nothing else is touched. SIGTERM first (pretrain.py checkpoints and exits at the end of the
# iteration), SIGKILL for whatever still runs after GRACE seconds (a rank stuck in a collective).
#   kill_job.sh JOB_ID [GRACE_SECONDS]
set -uo pipefail

tag="MT2I_JOB_ID=${1:?usage: kill_job.sh JOB_ID [GRACE_SECONDS]}"
grace=${2:-20}

job_pids() {
  local environ pid
  for environ in /proc/[0-9]*/environ; do
    pid=${environ#/proc/}
    pid=${pid%/environ}
    [[ "$pid" != "$$" ]] && grep -qsxzF -- "$tag" "$environ" && echo "$pid"
  done
}

pids=$(job_pids)
[[ -z "$pids" ]] && exit 0
# shellcheck disable=SC2086  # one pid per word
kill -TERM $pids 2>/dev/null
# shellcheck disable=SC2086  # a stopped process acts on its TERM once continued
kill -CONT $pids 2>/dev/null
for (( waited = 0; waited < grace; waited++ )); do
  sleep 1
  pids=$(job_pids)
  [[ -z "$pids" ]] && exit 0
done
# shellcheck disable=SC2086
kill -KILL $pids 2>/dev/null
exit 0
