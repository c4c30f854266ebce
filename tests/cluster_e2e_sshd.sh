#!/usr/bin/env bash
# A throwaway SSH server on 127.0.0.1:22 for `make test-cluster`, on a shared machine (run as root):
#
#   sudo tests/cluster_e2e_sshd.sh start     # prints the environment for the test
#   sudo tests/cluster_e2e_sshd.sh stop
#
# Isolation, because the launcher runs `ray stop` (which stops EVERY Ray process it can see):
# sshd runs in its own PID namespace, so what runs over SSH sees (and stops) only its own
# processes; sessions get HOME=/home/medscale-e2e and RAY_TMPDIR=/tmp/medscale-e2e-ray, so the
# launcher's ~/.bashrc edits and Ray's session files stay out of everyone else's way.
# Needs: openssh-server, rsync, util-linux (unshare); port 22 free on 127.0.0.1.
set -euo pipefail
dir=/tmp/medscale-e2e-sshd
case "${1:-}" in
  start)
    mkdir -p "$dir" /home/medscale-e2e /tmp/medscale-e2e-ray /run/sshd
    test -f "$dir/hostkey" || ssh-keygen -q -t ed25519 -N "" -f "$dir/hostkey"
    test -f "$dir/id_ed25519" || ssh-keygen -q -t ed25519 -N "" -f "$dir/id_ed25519"
    cp "$dir/id_ed25519.pub" "$dir/authorized_keys"
    cat >"$dir/sshd_config" <<EOF
Port 22
ListenAddress 127.0.0.1
HostKey $dir/hostkey
PidFile $dir/sshd.pid
AuthorizedKeysFile $dir/authorized_keys
StrictModes no
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
AllowUsers root
SetEnv HOME=/home/medscale-e2e RAY_TMPDIR=/tmp/medscale-e2e-ray
EOF
    /usr/sbin/sshd -t -f "$dir/sshd_config"
    setsid unshare --pid --fork --kill-child --mount-proc /usr/sbin/sshd -D -e -f "$dir/sshd_config" \
      >"$dir/sshd.log" 2>&1 </dev/null &
    sleep 1
    pgrep -f "^unshare .*$dir/sshd_config" >"$dir/unshare.pid"  # setsid may have forked: find unshare itself
    echo "export MEDSCALE_E2E_SSH_USER=root MEDSCALE_E2E_SSH_KEY=$dir/id_ed25519 MEDSCALE_E2E_VENV=$(pwd)/.venv"
    ;;
  stop)
    # sshd is the namespace's init: killing it ends everything that ran inside (unshare itself
    # ignores SIGTERM while it waits, and exits with its child).
    if [ -f "$dir/unshare.pid" ]; then pkill -P "$(cat "$dir/unshare.pid")" || true; sleep 1; fi
    rm -rf "$dir" /home/medscale-e2e /tmp/medscale-e2e-ray
    ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
