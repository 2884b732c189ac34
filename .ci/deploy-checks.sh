#!/usr/bin/env bash
# Offline checks of the deployment files in deploy/ (no cluster, no Docker engine, no network
# besides installing the checkers from their registries when they are missing):
#   1. every Kubernetes manifest validates against the Kubernetes JSON schemas
#      (kubernetes-validate, strict: unknown fields fail; oldest and newest supported versions);
#   2. `kubectl kustomize` renders the base and every overlay, and the rendered objects
#      validate too (and every kind in them has a schema);
#   3. `systemd-analyze verify` accepts the systemd units, with and without the drop-in, and
#      prints no warning;
#   4. no rendered workload mounts a Secret that could hold the cluster CA key (logmesh-ca),
#      no collector pod mounts aggregator keys, and every Secret volume is 0400.
# Exits non-zero on the first failing group, after printing every failure of that group.
# The test that runs the manifests' and units' command lines against the binary is
# tests/deploy.rs (cargo test --test deploy); it needs kubectl and etcd, which this script
# installs when missing, so run this script first.
set -uo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

# Kubernetes versions to validate against (schemas bundled by kubernetes-validate).
K8S_VERSIONS=${K8S_VERSIONS:-"1.29 1.33"}

fail=0
note() { printf '%s\n' "$*"; }
bad() { printf 'FAIL: %s\n' "$*"; fail=1; }

need_tools() {
    if ! command -v kubernetes-validate >/dev/null 2>&1; then
        note "installing kubernetes-validate (PyPI)"
        python3 -m pip install --quiet kubernetes-validate || { bad "cannot install kubernetes-validate"; return 1; }
    fi
    local missing=()
    command -v kubectl >/dev/null 2>&1 || missing+=(kubectl)
    command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
    # not used here, but by `cargo test --test deploy` (the etcd overlay runs against etcd)
    command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
    if [ ${#missing[@]} -gt 0 ]; then
        note "installing ${missing[*]} (Debian)"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } >/dev/null \
            || { bad "cannot install ${missing[*]}"; return 1; }
    fi
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# validate FILE LABEL: strict schema validation; a kind without a schema is a failure too.
validate() {
    local file=$1 label=$2 v out
    for v in $K8S_VERSIONS; do
        if ! out=$(kubernetes-validate --strict --kubernetes-version "$v" "$file" 2>&1); then
            bad "$label does not validate against Kubernetes $v:"
            printf '%s\n' "$out" | grep -v '^INFO' | sed 's/^/    /'
        elif printf '%s\n' "$out" | grep -q '^WARN'; then
            bad "$label: warnings from kubernetes-validate (Kubernetes $v):"
            printf '%s\n' "$out" | grep '^WARN' | sed 's/^/    /'
        fi
    done
}

k8s_checks() {
    local n=0 f
    # 1. every manifest file (kustomization files and strategic-merge patches are not objects)
    while IFS= read -r f; do
        case "$(basename "$f")" in
            kustomization.yaml|kustomization.yml) continue ;;
        esac
        case "$f" in
            */overlays/*) # patches are partial objects: checked through the rendered output
                grep -q '^\s*\$patch:' "$f" && continue ;;
        esac
        validate "$f" "$f"
        n=$((n + 1))
    done < <(find deploy/kubernetes -name '*.yaml' -o -name '*.yml' | sort)
    note "validated $n manifest files"

    # 2. render the base and each overlay, validate the result
    local dir name
    for dir in deploy/kubernetes/base deploy/kubernetes/overlays/*/; do
        dir=${dir%/}
        name=$(echo "$dir" | tr / _)
        if ! kubectl kustomize "$dir" >"$tmp/$name.yaml" 2>"$tmp/$name.err"; then
            bad "kubectl kustomize $dir failed:"
            sed 's/^/    /' "$tmp/$name.err"
            continue
        fi
        if [ ! -s "$tmp/$name.yaml" ]; then
            bad "kubectl kustomize $dir rendered nothing"
            continue
        fi
        local before=$fail
        fail=0
        validate "$tmp/$name.yaml" "rendered $dir"
        secret_checks "$tmp/$name.yaml" "rendered $dir"
        [ "$fail" -eq 0 ] && note "rendered and validated $dir ($(grep -c '^kind:' "$tmp/$name.yaml") objects)"
        [ "$before" -eq 0 ] || fail=1
    done
}

# secret_checks FILE LABEL: the PKI rules of deploy/README.md on a rendered manifest.
secret_checks() {
    local out
    if ! out=$(python3 - "$1" <<'PY' 2>&1
import sys, yaml
bad = []
for obj in yaml.safe_load_all(open(sys.argv[1])):
    if not obj or obj.get("kind") not in ("StatefulSet", "DaemonSet", "Deployment", "Job", "Pod"):
        continue
    spec = obj["spec"]["template"]["spec"] if "template" in obj.get("spec", {}) else obj["spec"]
    where = f'{obj["kind"]} {obj["metadata"]["name"]}'
    for v in spec.get("volumes", []):
        sec = v.get("secret")
        if not sec:
            continue
        name = sec.get("secretName", "")
        if name == "logmesh-ca":
            bad.append(f"{where} mounts Secret logmesh-ca (the cluster CA key stays off the cluster)")
        if obj["kind"] == "DaemonSet" and "aggregator" in name:
            bad.append(f"{where} (collectors) mounts Secret {name}")
        if sec.get("defaultMode", 0o644) & 0o077:
            bad.append(f"{where}: Secret volume {v['name']} has defaultMode {sec.get('defaultMode', 0o644):o}; use 0400")
print("\n".join(bad))
sys.exit(1 if bad else 0)
PY
    ); then
        bad "$2: secret rules:"
        printf '%s\n' "$out" | sed 's/^/    /'
    else
        note "secret rules hold for $2"
    fi
}

systemd_checks() {
    # systemd-analyze verify resolves ExecStart= binaries: verify copies of the units whose
    # binary path points at an executable that exists here (the built binary if there is one).
    local bin unit base out sd="$tmp/systemd"
    bin=$(ls "$root"/target/{release,debug}/logmesh 2>/dev/null | head -n 1)
    [ -n "$bin" ] || bin=/bin/true
    mkdir -p "$sd"
    local units=(deploy/systemd/*.service)
    [ -e "${units[0]}" ] || { bad "no systemd units in deploy/systemd"; return; }
    for unit in "${units[@]}"; do
        base=$(basename "$unit")
        sed "s#/usr/local/bin/logmesh#$bin#g" "$unit" >"$sd/$base"
        out=$(cd "$sd" && systemd-analyze verify --man=no "./$base" 2>&1)
        if [ $? -ne 0 ] || [ -n "$out" ]; then
            bad "systemd-analyze verify $unit:"
            printf '%s\n' "$out" | sed 's/^/    /'
        else
            note "systemd-analyze verify $unit: ok"
        fi
        # with its drop-ins, if any
        if [ -d "$unit.d" ]; then
            mkdir -p "$sd/with-dropin/$base.d"
            cp "$sd/$base" "$sd/with-dropin/"
            for d in "$unit.d"/*.conf; do
                sed "s#/usr/local/bin/logmesh#$bin#g" "$d" >"$sd/with-dropin/$base.d/$(basename "$d")"
            done
            out=$(cd "$sd/with-dropin" && SYSTEMD_UNIT_PATH="$sd/with-dropin:" systemd-analyze verify --man=no "./$base" 2>&1)
            if [ $? -ne 0 ] || [ -n "$out" ]; then
                bad "systemd-analyze verify $unit with $unit.d/:"
                printf '%s\n' "$out" | sed 's/^/    /'
            else
                note "systemd-analyze verify $unit with $unit.d/: ok"
            fi
        fi
    done
}

need_tools || exit 1
k8s_checks
systemd_checks
if [ "$fail" -ne 0 ]; then
    note "deploy checks: FAILED"
    exit 1
fi
note "deploy checks: ok"
