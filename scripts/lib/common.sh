# shellcheck shell=bash
# Sourced first by every script in scripts/: the repository root (the working directory from
# then on), the Python to run, help text from the script's header, and how many processes share
# the machine.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY=${PYTHON:-python3}
cd "$ROOT" || exit 2

# script_help LAST: lines 2..LAST of the calling script's header comment, without the '# '.
script_help() {
  sed -n "2,${1}p" "$0" | sed 's/^# \{0,1\}//'
}

# gpu_count: the CUDA devices torch sees (0 without a GPU, or without torch).
gpu_count() {
  "$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0
}

# share_cpu_cores N: N processes on a CPU split its cores instead of oversubscribing them
# (OMP_NUM_THREADS, unless set already).
share_cpu_cores() {
  local cores
  cores=$(nproc)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / $1 > 0 ? cores / $1 : 1 ))}
}
