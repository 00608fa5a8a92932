# Shared by scripts/check-k8s.sh and scripts/check-dockerfile.sh (sourced, not run): the pinned
# lint tools in the repo's .venv, installed once. The caller sets `venv`, `requirements` and a
# `log` function first.

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
