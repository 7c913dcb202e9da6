#!/usr/bin/env bash
# The Slicer Extensions Index takes repositories of up to 100 MB, history included. Fail above 95 MB
# ($REPO_LIMIT_MB, for tests) so that no further weights land by accident. The size is that of every
# object reachable from a ref, as stored (compressed): a fresh clone's pack.
set -euo pipefail
cd "$(dirname "$0")/.."
limit_mb="${REPO_LIMIT_MB:-95}"
if ! git rev-parse --git-dir >/dev/null 2>&1; then
    echo "repository size: not a git checkout, not checked"
    exit 0
fi
bytes=$(git rev-list --objects --all | cut -d' ' -f1 | git cat-file --batch-check='%(objectsize:disk)' \
    | awk '{ s += $1 } END { printf "%d", s }')
mb=$(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1048576 }')
if awk -v b="$bytes" -v l="$limit_mb" 'BEGIN { exit !(b > l * 1048576) }'; then
    echo "the repository is $mb MB with its history, over the $limit_mb MB limit (the Extensions Index takes 100 MB):" \
        "keep weights out of git (publish them as a release asset or on a hub, downloaded on first use)" >&2
    exit 1
fi
echo "repository size: $mb MB with its history (limit $limit_mb MB)"
