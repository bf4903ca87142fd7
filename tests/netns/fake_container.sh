#!/usr/bin/env bash
# Run docker/entrypoint.sh as the container runs it, without docker, for tests/test_multinode.py:
# in private mount, network and PID namespaces, with empty /root, /run, /var/log and
# /etc/environment, and /etc/ssh holding this machine's sshd_config plus the Dockerfile's snippet.
# Nothing outside changes; when COMMAND ends, the PID namespace ends and sshd with it.
#   fake_container.sh SSHD_SNIPPET SSH_DIR COMMAND...     (root; SSH_DIR outside /root and /run)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
snippet=${1:?usage: fake_container.sh SSHD_SNIPPET SSH_DIR COMMAND...}
ssh_dir=${2:?usage: fake_container.sh SSHD_SNIPPET SSH_DIR COMMAND...}
shift 2

if [[ -z "${FAKE_CONTAINER_INSIDE:-}" ]]; then
  exec unshare --mount --net --pid --fork --mount-proc \
    env FAKE_CONTAINER_INSIDE=1 "$0" "$snippet" "$ssh_dir" "$@"
fi

ip link set lo up
keep=$(mktemp -d)
cp /etc/ssh/sshd_config /etc/ssh/moduli "$keep/"
: > "$keep/environment"
mount -t tmpfs none /etc/ssh
mkdir /etc/ssh/sshd_config.d
cp "$keep/sshd_config" "$keep/moduli" /etc/ssh/
cp "$snippet" /etc/ssh/sshd_config.d/megatron_t2i.conf
mount --bind "$keep/environment" /etc/environment
mount -t tmpfs -o mode=700 none /root   # sshd's StrictModes wants a private home
mount -t tmpfs -o mode=755 none /run
mount -t tmpfs -o mode=755 none /var/log
rm -f "$keep/sshd_config" "$keep/moduli"   # the bound environment file goes with the namespace

status=0
MT2I_SSH_DIR=$ssh_dir "$ROOT/docker/entrypoint.sh" "$@" || status=$?
rm -rf "$keep"
exit "$status"
