#!/usr/bin/env bash
# Two "nodes" on one machine for tests/test_multinode.py: network namespaces joined by a veth pair,
# with the interface called mt2i0 in both (so GLOO_SOCKET_IFNAME=mt2i0 holds on every node), the
# addresses 10.77.0.1/24 and 10.77.0.2/24, and in each an sshd on port 2222 with a test-only config
# (key-only root login, the host key and authorized_keys of env/setup_ssh.sh's SSH_DIR) whose
# sessions see the host names node0 and node1.
# Processes in the namespaces share this machine's file system and Python, like cluster nodes
# sharing storage and an image.
#
#   two_nodes.sh up STATE_DIR SSH_DIR   # prints the two namespace names
#   two_nodes.sh down STATE_DIR         # idempotent; also undoes a half-made 'up'
# Needs root, iproute2 and openssh-server.
set -euo pipefail

cmd=${1:?usage: two_nodes.sh up STATE_DIR SSH_DIR | down STATE_DIR}
state=${2:?usage: two_nodes.sh up STATE_DIR SSH_DIR | down STATE_DIR}

down() {
  [[ -f "$state/tag" ]] || return 0
  local tag pid i
  tag=$(cat "$state/tag")
  for i in 0 1; do
    # Whatever still runs inside (sshd, leftover ranks) would keep the namespace alive.
    for pid in $(ip netns pids "$tag-$i" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
    ip netns del "$tag-$i" 2>/dev/null || true   # deleting a namespace deletes its veth end too
  done
  ip link del "${tag}a" 2>/dev/null || true      # only there if 'up' stopped before moving it
  rm -f "$state/tag"
}

up() {
  local ssh_dir=${1:?usage: two_nodes.sh up STATE_DIR SSH_DIR}
  local tag="mt2i$$" i ns addr
  mkdir -p "$state" /run/sshd   # /run/sshd: sshd's privilege-separation folder
  echo "$tag" > "$state/tag"    # first, so that 'down' can undo a half-made set-up
  ip link add "${tag}a" type veth peer name "${tag}b"
  for i in 0 1; do
    ns="$tag-$i"
    addr="10.77.0.$((i + 1))"
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    if (( i == 0 )); then ip link set "${tag}a" netns "$ns" name mt2i0
    else ip link set "${tag}b" netns "$ns" name mt2i0; fi
    ip -n "$ns" addr add "$addr/24" dev mt2i0
    ip -n "$ns" link set mt2i0 up
    cat > "$state/sshd_config$i" <<EOF
Port 2222
ListenAddress $addr
HostKey $ssh_dir/ssh_host_ed25519_key
AuthorizedKeysFile $ssh_dir/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile $state/sshd$i.pid
MaxStartups 100
EOF
    # Each sshd in a UTS namespace of its own: the node's sessions see the host name node$i, so
    # tools that tell nodes apart by name (OpenMPI, MPI discovery) see two machines.
    ip netns exec "$ns" unshare --uts sh -c \
      "hostname node$i && exec /usr/sbin/sshd -f '$state/sshd_config$i' -E '$state/sshd$i.log'"
  done
  for i in 0 1; do  # wait until both sshds accept connections
    for _ in $(seq 50); do
      ip netns exec "$tag-$i" bash -c "exec 3<>/dev/tcp/10.77.0.$((i + 1))/2222" 2>/dev/null && break
      sleep 0.1
    done
  done
  echo "$tag-0 $tag-1"
}

case "$cmd" in
  up) up "${3:-}" ;;
  down) down ;;
  *) echo "two_nodes.sh: unknown command '$cmd' (expected up or down)" >&2; exit 2 ;;
esac
