#!/usr/bin/env bash
# Runs the actors crate's loom models (actors/src/mailbox/loom.rs).
#
# The `loom` cfg goes to granary-actors alone, through `cargo rustc`: under
# a global RUSTFLAGS="--cfg loom" tokio leaves out its `net` module and the
# crates built on it (tokio-postgres) stop compiling. The binary sits
# beside the ordinary test build's (cargo hashes the extra arguments into
# its name); the dependencies are built once more where the workspace build
# unified other features into them. Warnings in the loom-only code fail.
set -euo pipefail
cd "$(dirname "$0")/.."

built=$(cargo rustc -p granary-actors --lib --profile test \
    --message-format=json-render-diagnostics -- --cfg loom -D warnings)
exe=$({ grep -o '"executable":"[^"]*"' <<<"$built" || true; } | tail -1 | cut -d'"' -f4)
if [[ -z "$exe" ]]; then
    echo "loom-actors: cargo rustc named no test binary" >&2
    exit 1
fi
# Every model must run: a filter that matched nothing would pass.
out=$("$exe" mailbox::loom 2>&1) || { printf '%s\n' "$out"; exit 1; }
printf '%s\n' "$out" | grep -E "^test |^test result"
grep -qE "^test result: ok\. [1-9][0-9]* passed; 0 failed; 0 ignored" <<<"$out"
