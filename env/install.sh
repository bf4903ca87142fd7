#!/usr/bin/env bash
# Install everything megatron_t2i needs on a fresh machine (CPU or GPU): the Debian tools of the
# multi-node launcher (pdsh, sshd, ip, shellcheck) and chromium + chromedriver for the web demo's
# browser test, the pinned Python packages and the project itself in editable mode. Safe to
# re-run: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages, only when a tool is missing and we may install (root with apt-get); otherwise
# a one-line note, since only multi-node launching and its tests need them.
declare -A DEB_FOR=([pdsh]=pdsh [sshd]=openssh-server [ssh]=openssh-client [ip]=iproute2
                    [shellcheck]=shellcheck [chromium]=chromium [chromedriver]=chromium-driver)
missing=()
for tool in "${!DEB_FOR[@]}"; do
  command -v "$tool" >/dev/null || [[ -x /usr/sbin/$tool ]] || missing+=("${DEB_FOR[$tool]}")
done
if (( ${#missing[@]} )); then
  if [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    # Quiet unless it fails; then the whole apt output explains why.
    log=$( { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } 2>&1 ) \
      || { printf '%s\n' "$log" >&2; echo "install.sh: apt-get install ${missing[*]} failed" >&2; exit 1; }
  else
    echo "install.sh: skipping Debian packages ${missing[*]} (needs root and apt-get);" \
         "multi-node launching and the browser test need them" >&2
  fi
fi

python3 -m pip install -q -r requirements.txt -e .
