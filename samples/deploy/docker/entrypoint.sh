#!/bin/sh
# granary-entrypoint: the image's entry point.
#
#   granary-entrypoint node [FLAGS]  renders the node file template, then
#                                runs `granary node --config <rendered file>
#                                [FLAGS]` (say `--log-format json`)
#   granary-entrypoint ARGS...   runs `granary ARGS...` (status, devices, ...)
#
# Why a renderer: `granary node` reads its TOML file as it is, and the file
# must hold values that are known only when the container starts or that
# belong in a Secret, not in a ConfigMap or an image:
#   - `listen` and `gossip` must be this pod's own IP (a silo is known to
#     its peers by the address it bound; 0.0.0.0 would be advertised as is);
#   - `secret`, the admin `token` and a database password.
# The template ($GRANARY_CONFIG_TEMPLATE, default /etc/granary/node.toml)
# names them as ${NAME}; each is replaced by the environment variable NAME,
# escaped for a TOML basic string ("..."), so put every ${NAME} inside
# double quotes. Lines whose first non-blank character is # are copied
# unchanged. A name that is not set, or a value holding a control
# character, stops the start with a message. The result is written, mode
# 0600, to $GRANARY_CONFIG (default /run/granary/node.toml).
#
# POD_IP defaults to the address /etc/hosts gives this container, so
# that `docker run` works with the image's own template; Kubernetes sets it
# from the pod's status.
set -eu

template="${GRANARY_CONFIG_TEMPLATE:-/etc/granary/node.toml}"
rendered="${GRANARY_CONFIG:-/run/granary/node.toml}"

render() {
    if [ -z "${POD_IP:-}" ]; then
        # The address /etc/hosts gives this container's hostname (Docker
        # and Kubernetes both write it there).
        POD_IP=$(awk -v host="$(cat /proc/sys/kernel/hostname)" '
            $1 !~ /^#/ { for (i = 2; i <= NF; i++) if ($i == host) { print $1; exit } }
        ' /etc/hosts)
        if [ -z "$POD_IP" ]; then
            echo "granary-entrypoint: set POD_IP (this container's hostname is not in /etc/hosts)" >&2
            exit 1
        fi
        export POD_IP
    fi
    umask 077
    mkdir -p "$(dirname "$rendered")"
    awk '
        function escape(value, name,    out, i, c) {
            out = ""
            for (i = 1; i <= length(value); i++) {
                c = substr(value, i, 1)
                if (c < " " || c == "\177") {
                    printf "granary-entrypoint: %s holds a control character (line %d of %s)\n", \
                        name, FNR, FILENAME > "/dev/stderr"
                    failed = 1
                    return ""
                }
                if (c == "\\" || c == "\"") {
                    out = out "\\"
                }
                out = out c
            }
            return out
        }
        /^[ \t]*#/ { print; next }
        {
            rest = $0
            out = ""
            while (match(rest, /\$\{[A-Za-z_][A-Za-z0-9_]*\}/)) {
                name = substr(rest, RSTART + 2, RLENGTH - 3)
                out = out substr(rest, 1, RSTART - 1)
                if (name in ENVIRON) {
                    out = out escape(ENVIRON[name], name)
                } else {
                    printf "granary-entrypoint: %s is not set (line %d of %s)\n", \
                        name, FNR, FILENAME > "/dev/stderr"
                    failed = 1
                }
                rest = substr(rest, RSTART + RLENGTH)
            }
            print out rest
        }
        END { exit failed }
    ' "$template" >"$rendered.tmp" || {
        rm -f "$rendered.tmp"
        echo "granary-entrypoint: could not render $template" >&2
        exit 1
    }
    mv "$rendered.tmp" "$rendered"
}

# `node` given its own file, or asked for help: nothing to render.
for arg in "$@"; do
    case "$arg" in
    --config | --config=* | -h | --help) exec granary "$@" ;;
    esac
done
if [ "${1:-node}" = node ]; then
    # `node` and its own flags (say `--log-format json`): the rendered file
    # is passed as its --config.
    [ "$#" -gt 0 ] && shift
    render
    # The secrets are in the rendered file now; the node does not need them
    # in its environment. (The probes run with the container's own
    # environment, which keeps GRANARY_ADMIN_TOKEN.)
    unset GRANARY_CLUSTER_SECRET GRANARY_POSTGRES_PASSWORD
    exec granary node --config "$rendered" "$@"
fi
exec granary "$@"
