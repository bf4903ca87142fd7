#!/usr/bin/env bash
# Start the megatron_t2i container on this node; run it on every node of the cluster. It gets the
# host's network and IPC (NCCL uses the real NICs and shared memory), all GPUs, the InfiniBand
# devices when there are any, the repository mounted at the same path (so the code path is the same
# on every node), and the cluster's ssh keys made by env/setup_ssh.sh for its sshd on port 2222.
#   env/start_docker.sh [--dry-run] [--build]
#   docker exec -it megatron_t2i bash        # then work inside, e.g. scripts/pretrain_multiple_nodes.sh
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source-path=SCRIPTDIR source=../scripts/lib/cluster.sh
source "$ROOT/scripts/lib/cluster.sh"
ME=start_docker.sh

DRY_RUN=0 BUILD=0
for arg in "$@"; do
  case "$arg" in
    -h|--help)
      script_header "$0"
      cat <<'EOF'

Options:
  --dry-run   print the docker commands instead of running them
  --build     build the image first from docker/Dockerfile

Environment variables (defaults in brackets):
  DOCKER_IMAGE      image to run [megatron_t2i:latest]
  DOCKER_CONTAINER  name of the container [megatron_t2i]
  SSH_DIR           the cluster's keys from env/setup_ssh.sh, mounted read-only [env/ssh]
  MOUNTS            more folders to mount at the same path, space-separated (data, checkpoints) []
  DOCKER            the docker command [docker]
EOF
      exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --build) BUILD=1 ;;
    *) echo "$ME: unknown option '$arg' (see --help)" >&2; exit 2 ;;
  esac
done

DOCKER_IMAGE=${DOCKER_IMAGE:-megatron_t2i:latest}
DOCKER_CONTAINER=${DOCKER_CONTAINER:-megatron_t2i}
SSH_DIR=${SSH_DIR:-$ROOT/env/ssh}
MOUNTS=${MOUNTS:-}
DOCKER=${DOCKER:-docker}

die() { echo "$ME: $*" >&2; exit 1; }
for f in authorized_keys ssh_host_ed25519_key ssh_host_ed25519_key.pub; do
  [[ -f "$SSH_DIR/$f" ]] || die "$SSH_DIR/$f is missing: run env/setup_ssh.sh first (once, on shared storage)"
done
SSH_DIR=$(cd "$SSH_DIR" && pwd)

RUN=("$DOCKER" run -d --name "$DOCKER_CONTAINER" --network host --ipc host --gpus all
     --ulimit memlock=-1 --ulimit stack=67108864
     -v "$ROOT:$ROOT" -w "$ROOT" -e "PYTHONPATH=$ROOT"
     -v "$SSH_DIR:$SSH_DIR:ro" -e "MT2I_SSH_DIR=$SSH_DIR")
if [[ -d /dev/infiniband ]]; then  # RDMA needs the devices and locked memory
  RUN+=(--device /dev/infiniband --cap-add IPC_LOCK)
fi
read -ra extra <<< "$MOUNTS"
for dir in "${extra[@]}"; do
  [[ -d "$dir" ]] || die "MOUNTS: $dir is not a folder"
  dir=$(cd "$dir" && pwd)
  RUN+=(-v "$dir:$dir")
done
RUN+=("$DOCKER_IMAGE")
# The build context is only what the image needs: never data, checkpoints or env/ssh's keys.
BUILD_CONTEXT=(tar -C "$ROOT" -c requirements.txt docker)
BUILD_CMD=("$DOCKER" build -f docker/Dockerfile -t "$DOCKER_IMAGE" -)

if (( DRY_RUN )); then
  if (( BUILD )); then echo "$(shell_words "${BUILD_CONTEXT[@]}") | $(shell_words "${BUILD_CMD[@]}")"; fi
  shell_words "${RUN[@]}"
  exit 0
fi

command -v "$DOCKER" >/dev/null || die "$DOCKER not found; install Docker and the NVIDIA container toolkit"
if (( BUILD )); then "${BUILD_CONTEXT[@]}" | "${BUILD_CMD[@]}"; fi
if [[ -n "$("$DOCKER" ps -aq --filter "name=^${DOCKER_CONTAINER}\$")" ]]; then
  die "a container named $DOCKER_CONTAINER exists already; remove it with '$DOCKER rm -f $DOCKER_CONTAINER'" \
      "(this stops what runs in it) or set DOCKER_CONTAINER"
fi
"${RUN[@]}"
echo "started $DOCKER_CONTAINER (sshd on port 2222); enter it with: $DOCKER exec -it $DOCKER_CONTAINER bash"
