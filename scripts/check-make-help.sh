#!/usr/bin/env bash
# Every target the Makefile defines is named by `make help`, so a new user finds it there. A
# help line is `make <target> [| <target> ...] [ARGS]`, then two spaces and what it does.
set -euo pipefail
cd "$(dirname "$0")/.."
named=$(make --no-print-directory help | sed -n 's/^make \(.*\)$/\1/p' | sed 's/  .*//' | tr ' |' '\n\n' | grep -E '^[a-z][a-z0-9-]*$' | sort -u)
missing=()
for target in $(grep -oE '^[a-z][a-z0-9-]*:' Makefile | tr -d ':' | sort -u); do
	[ "$target" = help ] || grep -qx "$target" <<<"$named" || missing+=("$target")
done
if [ ${#missing[@]} -gt 0 ]; then
	echo "make help does not name: ${missing[*]}" >&2
	exit 1
fi
echo "make help names every target"
