#!/usr/bin/env bash
# Runs a command inside a private network namespace with only loopback (up), with localhost-only
# ROS discovery and a fresh ROS domain, so no DDS traffic leaves this machine:
#   scripts/netns_run.sh CMD ARGS...
# As root: `unshare -n`; otherwise `unshare -rn` (a user namespace). Fails, naming both, when
# neither works; it never falls back to the host network.
set -euo pipefail
if [ "${VLA_IN_NETNS:-}" = 1 ]; then
  ip link set lo up
  export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
  export ROS_DOMAIN_ID=${ROS_DOMAIN_ID:-$((RANDOM % 100 + 1))}
  exec "$@"
fi
if [ "$(id -u)" = 0 ]; then how=(unshare -n); else how=(unshare -rn); fi
if ! "${how[@]}" true 2>/dev/null; then
  echo "netns_run.sh: cannot create a private network namespace with \`${how[*]}\` (as root: unshare -n; otherwise unshare -rn, which needs unprivileged user namespaces)" >&2
  exit 1
fi
VLA_IN_NETNS=1 exec "${how[@]}" "$0" "$@"
