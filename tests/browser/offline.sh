#!/usr/bin/env bash
# Run a command with no network but loopback: in a new network namespace where only `lo` is up, so
# a page that still needs a CDN fails loudly. Where namespaces are not allowed (no root and no user
# namespaces, or no `ip` from iproute2), run it with the network and say so; the browser test then
# still fails on any request that leaves 127.0.0.1.
set -euo pipefail
for flags in "--net" "--net --map-root-user"; do
  # shellcheck disable=SC2086  # $flags is two words on purpose
  if command -v ip >/dev/null && unshare $flags true 2>/dev/null; then
    echo "offline.sh: running offline (network namespace with loopback only)" >&2
    exec unshare $flags -- bash -c 'ip link set lo up && exec "$@"' offline.sh "$@"
  fi
done
echo "offline.sh: cannot create a network namespace here; running WITH network access" >&2
exec "$@"
