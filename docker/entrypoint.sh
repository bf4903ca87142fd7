#!/usr/bin/env bash
# Container start (docker/Dockerfile): install the cluster's ssh keys that env/start_docker.sh
# mounted at $MT2I_SSH_DIR, give ssh sessions the container's environment, start sshd on port 2222,
# then run the command (by default sleep forever, so that `docker exec -it NAME bash` works).
set -euo pipefail

ssh_dir=${MT2I_SSH_DIR:-}
if [[ -z "$ssh_dir" ]]; then
  echo "entrypoint: MT2I_SSH_DIR is not set: no sshd, single-node use only" >&2
else
  for f in authorized_keys ssh_host_ed25519_key ssh_host_ed25519_key.pub; do
    [[ -f "$ssh_dir/$f" ]] || { echo "entrypoint: $ssh_dir/$f is missing: run env/setup_ssh.sh" >&2; exit 1; }
  done
  # Copies owned by root: sshd refuses keys that other users own or could change.
  install -d -m 700 /root/.ssh
  install -m 600 "$ssh_dir/authorized_keys" /root/.ssh/authorized_keys
  install -m 600 "$ssh_dir/ssh_host_ed25519_key" /etc/ssh/ssh_host_ed25519_key
  install -m 644 "$ssh_dir/ssh_host_ed25519_key.pub" /etc/ssh/ssh_host_ed25519_key.pub
  # Commands run over ssh (pdsh, mpirun) start from a bare environment; pam_env reads this file, so
  # they see the PATH, CUDA and PYTHONPATH of `docker exec`.
  env | grep -E '^(PATH|LD_LIBRARY_PATH|PYTHONPATH|LANG|CUDA_[A-Z_]*|NVIDIA_[A-Z_]*|NCCL_[A-Z_]*)=' \
    > /etc/environment || true
  mkdir -p /run/sshd
  /usr/sbin/sshd -E /var/log/sshd.log
fi
exec "$@"
