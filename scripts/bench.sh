#!/usr/bin/env bash
# `make bench*`: builds Herald, the load generator and the bare fan-out server in release mode,
# installs the Socket.IO peer's pinned packages, then runs the scenarios named in the arguments
# (idle gateway direct fanout topic storm loss backlog backlog-storm resend rollout cost) on the systems
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
        idle | gateway | direct | fanout | topic | storm | loss | backlog | backlog-storm | resend | rollout | cost) scenarios+=("$arg") ;;
        *)
            say "unknown argument $arg"
            exit 2
            ;;
    esac
done
[ "${#scenarios[@]}" -gt 0 ] || {
    say "usage: scripts/bench.sh [--short] idle|gateway|direct|fanout|topic|storm|loss|backlog|backlog-storm|resend|rollout|cost..."
    exit 2
}

scripts/deps.sh
export HERALD_TEST_REDIS_SERVER="${HERALD_TEST_REDIS_SERVER:-$(command -v redis-server)}"
export HERALD_TEST_NATS_SERVER="${HERALD_TEST_NATS_SERVER:-$root/.venv/bin/nats-server}"
export HERALD_TEST_MONGO_SERVER="${HERALD_TEST_MONGO_SERVER:-$root/.venv/bin/nx-27017}"

# With a counting allocator in Herald's binaries (`herald_allocations_total`, read by the cost
# scenario): an atomic add or two per allocation, in every scenario alike.
say "building release binaries (with allocation counters)"
cargo build --release --bins -p herald-gateway -p herald-dispatcher -p herald-tests \
    --features herald-gateway/alloc-count,herald-dispatcher/alloc-count

# The peer runs only in the scenarios it can do (idle and gateway); it needs Node.
systems=(--system herald --system limit)
if [[ " ${scenarios[*]} " =~ \ (idle|gateway)\  ]]; then
    if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then
        (cd tests/peer && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
        systems+=(--system peer)
    else
        say "node/npm not found: the Socket.IO peer is skipped (apt-get install nodejs npm)"
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
