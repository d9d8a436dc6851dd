#!/bin/sh
# granary-probe live|startup|ready: asks the node's admin endpoint for one
# of its health probes; exits 0 when it answers 200, non-zero otherwise,
# printing the probe's JSON body (which check failed, and why).
#
# Used by the image's HEALTHCHECK and by the Kubernetes exec probes. The
# endpoint wants `Authorization: Bearer <token>` when it listens beyond
# loopback; the token comes from GRANARY_ADMIN_TOKEN and reaches curl on
# its standard input (`-H @-`), never on a command line that `ps` shows.
#
# GRANARY_ADMIN_URL: the endpoint (default http://127.0.0.1:9100).
# GRANARY_PROBE_MAX_TIME: seconds curl waits in all (default 4: the ready
# probe waits up to 2 s for storage and kernels).
set -eu

probe="${1:-}"
case "$probe" in
live | startup | ready) ;;
*)
    echo "usage: granary-probe live|startup|ready" >&2
    exit 2
    ;;
esac
url="${GRANARY_ADMIN_URL:-http://127.0.0.1:9100}/health/$probe"
max_time="${GRANARY_PROBE_MAX_TIME:-4}"

if [ -n "${GRANARY_ADMIN_TOKEN:-}" ]; then
    printf 'Authorization: Bearer %s\n' "$GRANARY_ADMIN_TOKEN" |
        curl --silent --show-error --fail-with-body --max-time "$max_time" -H @- "$url"
else
    curl --silent --show-error --fail-with-body --max-time "$max_time" "$url"
fi
