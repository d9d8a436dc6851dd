#!/usr/bin/env bash
# Starts a second etcd on loopback for the etcd TLS tests: TLS only
# (https://127.0.0.1:2389), client certificates required (--client-cert-auth),
# and authentication on, with a user `granary` (password `granary-pass`)
# allowed to read and write under /granary/. The CA and the certificate for
# 127.0.0.1 (etcd's and the clients') come from `granary cert` in
# target/etcd-tls/certs. Prints the two variables the tests are built with.
# Run again, it keeps an etcd that already answers as it should, and
# otherwise stops whatever it started before and starts afresh.
#
# Usage: scripts/etcd-tls.sh   (from the repository root; CI runs it)
set -euo pipefail
dir=$(pwd)/target/etcd-tls
certs=$dir/certs
endpoint=https://127.0.0.1:2389
mkdir -p "$dir"
[ -f "$certs/ca.pem" ] || cargo run -q -p granary -- cert --dir "$certs" 127.0.0.1 >/dev/null
ctl() {
    ETCDCTL_API=3 etcdctl --endpoints "$endpoint" --cacert "$certs/ca.pem" \
        --cert "$certs/127.0.0.1.pem" --key "$certs/127.0.0.1-key.pem" "$@"
}
if ! ctl --user granary:granary-pass put /granary/ping ok >/dev/null 2>&1; then
    # One this script started (half set up, or with other certificates).
    pkill -f "etcd --name granary-tls-test" || true
    for _ in $(seq 1 20); do
        pgrep -f "etcd --name granary-tls-test" >/dev/null || break
        sleep 0.5
    done
    rm -rf "$dir/data"
    setsid etcd --name granary-tls-test --data-dir "$dir/data" \
        --listen-client-urls "$endpoint" --advertise-client-urls "$endpoint" \
        --listen-peer-urls http://127.0.0.1:2390 \
        --initial-advertise-peer-urls http://127.0.0.1:2390 \
        --initial-cluster granary-tls-test=http://127.0.0.1:2390 \
        --cert-file "$certs/127.0.0.1.pem" --key-file "$certs/127.0.0.1-key.pem" \
        --trusted-ca-file "$certs/ca.pem" --client-cert-auth \
        >"$dir/log" 2>&1 </dev/null &
    for _ in $(seq 1 30); do
        ctl endpoint health >/dev/null 2>&1 && break
        sleep 1
    done
    ctl endpoint health >/dev/null
    ctl user add root --new-user-password=root-pass >/dev/null
    ctl user grant-role root root >/dev/null
    ctl role add granary >/dev/null
    ctl role grant-permission granary --prefix=true readwrite /granary/ >/dev/null
    ctl user add granary --new-user-password=granary-pass >/dev/null
    ctl user grant-role granary granary >/dev/null
    ctl auth enable >/dev/null
    ctl --user granary:granary-pass put /granary/ping ok >/dev/null
fi
echo "GRANARY_ETCD_TLS_ENDPOINTS=$endpoint"
echo "GRANARY_ETCD_TLS_DIR=$certs"
