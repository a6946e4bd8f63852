#!/usr/bin/env bash
# The project's test command (see README.md): formatting, lints, the host-side unit tests of
# the guest crates, and the whole workspace test suite, which boots real KVM guests (tests that
# need huge pages reserve them themselves, as root).
set -euo pipefail
cd "$(dirname "$0")"
cargo fmt --all -- --check
# No import circle between the modules of any crate, host or guest.
python3 guest-fixtures/tools/module-cycles.py .
python3 guest-fixtures/tools/module-cycles.py guest-fixtures
(cd guest-fixtures && cargo fmt --all -- --check)
cargo clippy --workspace --all-targets -- -D warnings
(cd guest-fixtures && cargo clippy --release -p rt -p rtcore -p fixtures -p swiotlb -p virtio -p workload -- -D warnings)
(cd guest-fixtures && cargo test -p rt -p rtcore -p swiotlb -p virtio -p workload)
cargo test --workspace
