#!/usr/bin/env bash
# Make the ssh set-up of one cluster: a client key pair that every node accepts, a host key shared
# by every node's container (so one known_hosts line covers them all and survives restarts), and a
# hostfile plus an ssh config naming the nodes of env/ip_list.txt node0, node1, ...
#
# Run once, on storage that every node sees (the default, env/ssh, is inside the repository, which
# env/start_docker.sh mounts in every container). Keys are made only if missing, so re-running after
# editing the ip list keeps them; nothing is ever baked into the docker image.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source-path=SCRIPTDIR source=../scripts/lib/cluster.sh
source "$ROOT/scripts/lib/cluster.sh"

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  script_header "$0"
  cat <<'EOF'

Environment variables (defaults in brackets):
  IP_LIST              node addresses, space-separated [env/ip_list.txt]
  SSH_DIR              where the keys and files are written [env/ssh]
  SSH_PORT             port of the containers' sshd [2222]
  SSH_USER             login user on the nodes [root]
  NUM_GPUS_PER_WORKER  slots per node in the hostfile [8]

Written to SSH_DIR (kept out of git by a .gitignore there):
  id_ed25519, id_ed25519.pub   client key of the launching node
  authorized_keys              that key; each container installs it for root
  ssh_host_ed25519_key(.pub)   host key of every node's sshd
  known_hosts                  the host key under the alias megatron-t2i-cluster
  config                       'Host node{i}' entries: ssh -F SSH_DIR/config node1
  hostfile                     'node{i} slots=N' lines for deepspeed --hostfile
EOF
  exit 0
fi

IP_LIST=${IP_LIST:-$ROOT/env/ip_list.txt}
SSH_DIR=${SSH_DIR:-$ROOT/env/ssh}
SSH_PORT=${SSH_PORT:-2222}
SSH_USER=${SSH_USER:-root}
NUM_GPUS_PER_WORKER=${NUM_GPUS_PER_WORKER:-8}

die() { echo "setup_ssh.sh: $*" >&2; exit 1; }
command -v ssh-keygen >/dev/null || die "ssh-keygen not found; install openssh-client (env/install.sh as root)"
read_ip_list "$IP_LIST" || exit 1

mkdir -p "$SSH_DIR"
chmod 700 "$SSH_DIR"
SSH_DIR=$(cd "$SSH_DIR" && pwd)
# Private keys must never be committed.
[[ -f "$SSH_DIR/.gitignore" ]] || echo '*' > "$SSH_DIR/.gitignore"

make_key() {  # FILE COMMENT: an ed25519 key without passphrase, unless one is there already
  [[ -f "$1" ]] && return 0
  ssh-keygen -q -t ed25519 -N '' -C "$2" -f "$1"
  echo "made $1"
}
make_key "$SSH_DIR/id_ed25519" "megatron_t2i cluster client"
make_key "$SSH_DIR/ssh_host_ed25519_key" "megatron_t2i cluster host"
cp "$SSH_DIR/id_ed25519.pub" "$SSH_DIR/authorized_keys"
echo "$CLUSTER_HOST_KEY_ALIAS $(cut -d' ' -f1,2 "$SSH_DIR/ssh_host_ed25519_key.pub")" > "$SSH_DIR/known_hosts"
chmod 600 "$SSH_DIR/authorized_keys" "$SSH_DIR/known_hosts"

write_cluster_files "$SSH_DIR" "$NUM_GPUS_PER_WORKER" "$SSH_DIR" "$SSH_PORT" "$SSH_USER" "${IPS[@]}"
echo "wrote $SSH_DIR/{config,hostfile,known_hosts,authorized_keys} for ${#IPS[@]} nodes: ${IPS[*]}"
