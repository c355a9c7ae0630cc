#!/usr/bin/env bash
# Builds the Debian package: release binaries, man pages and completions from
# the clap definitions, then cargo-deb. Prints the path of the .deb.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-deb >/dev/null || { echo "cargo-deb is missing: cargo install cargo-deb --locked" >&2; exit 2; }
cargo build --release --workspace
rm -rf target/release/gendocs
./target/release/warmspare-agent generate --out target/release/gendocs
./target/release/warmsparectl generate --out target/release/gendocs
cargo deb -p warmspare-agent --no-build --strip "$@"
