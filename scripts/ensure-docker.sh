#!/usr/bin/env bash
# Make sure this host can build and run the AgentLink images:
#   * Debian packages docker.io and debootstrap are installed;
#   * a Docker engine answers `docker info` (started detached when it does not).
# Idempotent and non-interactive; safe to run before every build.
#
# Environment:
#   AGENTLINK_DOCKERD_LOG        dockerd log file (default /var/log/agentlink-dockerd.log)
#   AGENTLINK_DOCKERD_TIMEOUT    seconds to wait for a started engine (default 60)
set -euo pipefail

log_file="${AGENTLINK_DOCKERD_LOG:-/var/log/agentlink-dockerd.log}"
timeout="${AGENTLINK_DOCKERD_TIMEOUT:-60}"
packages=(docker.io debootstrap)

die() {
    printf 'ensure-docker: %s\n' "$*" >&2
    exit 1
}

is_root() {
    [ "$(id -u)" -eq 0 ]
}

"$(dirname "$0")/ensure-packages.sh" "${packages[@]}"

if docker info >/dev/null 2>&1; then
    exit 0
fi

if ! is_root; then
    die "the Docker engine is not reachable for user $(id -un). Either start it as root
  (sudo $0), or add this user to the docker group (sudo usermod -aG docker $(id -un)) and log in again."
fi

command -v dockerd >/dev/null 2>&1 || die "dockerd not found although docker.io is installed; reinstall docker.io"

message="Docker engine was starting: dockerd now answers"
if pgrep -x dockerd >/dev/null 2>&1; then
    echo "dockerd is running but not answering yet; waiting up to ${timeout}s"
else
    message="Docker engine was not running: started dockerd (log: ${log_file})"
    mkdir -p "$(dirname "$log_file")"
    # The API on the local socket only: never on TCP, where anyone on the LAN would be root.
    setsid dockerd -H unix:///var/run/docker.sock >"$log_file" 2>&1 </dev/null &
fi

deadline=$((SECONDS + timeout))
until docker info >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then
        echo "ensure-docker: dockerd did not answer within ${timeout}s; last lines of ${log_file}:" >&2
        tail -n 20 "$log_file" >&2 || true
        exit 1
    fi
    sleep 1
done

echo "$message"
