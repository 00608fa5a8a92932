#!/usr/bin/env bash
# `make bench*`: builds Herald, the load generator and the bare fan-out server in release mode,
# installs the Socket.IO peer's pinned packages, then runs the scenarios named in the arguments
# (idle gateway direct fanout topic storm loss backlog backlog-storm resend rollout soak cost) on the systems
# each applies to, and writes target/bench/<name>/summary.{json,txt}. Every scenario stops by
# itself (--scenario-limit-secs).
#
#   scripts/bench.sh [--short] SCENARIO...
#
# Only loopback traffic: Herald, its dependencies (own redis/nats/nx-27017 on free ports; the
# system services on 6379 and 4222 are never touched), the peer and the generator all run here.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

say() { printf 'bench: %s\n' "$*" >&2; }

short=()
scenarios=()
for arg in "$@"; do
    case "$arg" in
        --short) short=(--short) ;;
        idle | gateway | direct | fanout | topic | storm | loss | backlog | backlog-storm | resend | rollout | soak | cost) scenarios+=("$arg") ;;
        *)
            say "unknown argument $arg"
            exit 2
            ;;
    esac
done
[ "${#scenarios[@]}" -gt 0 ] || {
    say "usage: scripts/bench.sh [--short] idle|gateway|direct|fanout|topic|storm|loss|backlog|backlog-storm|resend|rollout|soak|cost..."
    exit 2
}

scripts/deps.sh
export HERALD_TEST_REDIS_SERVER="${HERALD_TEST_REDIS_SERVER:-$(command -v redis-server)}"
export HERALD_TEST_NATS_SERVER="${HERALD_TEST_NATS_SERVER:-$root/.venv/bin/nats-server}"
export HERALD_TEST_MONGO_SERVER="${HERALD_TEST_MONGO_SERVER:-$root/.venv/bin/nx-27017}"

# The cost scenario counts allocations (`herald_allocations_total`): its Herald binaries carry a
# counting allocator over the system's, in place of jemalloc. Every other scenario measures the
# binaries as shipped, so a run with `cost` in it is built the counting way for all its scenarios
# (and says so); keep memory figures to runs without it.
features=()
if [[ " ${scenarios[*]} " =~ \ cost\  ]]; then
    features=(--features herald-gateway/alloc-count,herald-dispatcher/alloc-count)
    say "building release binaries with allocation counters (system allocator, not jemalloc)"
else
    say "building release binaries"
fi
cargo build --release --bins -p herald-gateway -p herald-dispatcher -p herald-tests "${features[@]}"

# The peers run only in the scenarios they can do (idle and gateway); they need Node. The plain
# `ws` peer is the idle yardstick, added only when idle is measured (it then runs the delivery
# stage too, if that is in the same run).
systems=(--system herald --system limit)
if [[ " ${scenarios[*]} " =~ \ (idle|gateway)\  ]]; then
    if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then
        (cd tests/peer && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
        systems+=(--system peer)
        if [[ " ${scenarios[*]} " =~ \ idle\  ]]; then
            systems+=(--system ws)
        fi
    else
        say "node/npm not found: the Socket.IO and ws peers are skipped (apt-get install nodejs npm)"
    fi
fi

# One process holds at most this many files; the generator and the servers each need ~18k.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

name="$(IFS=-; echo "${scenarios[*]}")${short:+-short}"
out="target/bench/$name"
mkdir -p "$out"
args=()
for s in "${scenarios[@]}"; do args+=(--scenario "$s"); done
say "running ${scenarios[*]} ${short[*]:-} (logs in $out/logs)"
./target/release/loadgen run "${args[@]}" "${systems[@]}" "${short[@]}" --out "$out/summary.json"
