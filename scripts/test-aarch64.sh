#!/usr/bin/env bash
# The NEON kernels on aarch64: cross-built on this x86-64 machine and run under qemu-user
# (`.cargo/config.toml` sets the cross linker and qemu as the runner). qemu checks correctness,
# not speed.
#
# What runs: clippy on the aarch64 build (-D warnings); the kernel, SIMD and pool unit tests
# (every kernel set the emulated CPU supports against the portable reference) on a CPU with
# `dotprod` (qemu's `max`: neon-dotprod, neon and portable) and on one without (Cortex-A53: neon
# and portable); and the whole engine test file under each NEON set (except its one test that
# decodes the real 135M model, far too slow under emulation).
#
# Needs the aarch64 Rust standard library (`rustup target add aarch64-unknown-linux-gnu`) and
# Debian's gcc-aarch64-linux-gnu, libc6-dev-arm64-cross and qemu-user-static; installs what is
# missing when it can. If the aarch64 standard library cannot be had, it says so loudly and
# exits 0 — unless LETHE_REQUIRE_AARCH64=1, which makes that a failure.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

target=aarch64-unknown-linux-gnu
require=${LETHE_REQUIRE_AARCH64:-0}
# Headings carry the seconds since this script started (the cross build and qemu are a large
# share of CI's time).
step() { printf '== [aarch64 +%ds] %s\n' "$SECONDS" "$*"; }

skip() {
  echo
  echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
  echo "!!! aarch64/NEON kernel tests NOT RUN: $1"
  echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
  echo
  if [[ $require == 1 ]]; then exit 1; fi
  exit 0
}

if ! rustup target list --installed 2>/dev/null | grep -qx "$target"; then
  step "rustup target add $target"
  rustup target add "$target" || skip "the aarch64 Rust standard library could not be installed (rustup target add $target failed)"
fi

if ! command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || ! command -v qemu-aarch64-static >/dev/null 2>&1; then
  sudo=""; [[ $(id -u) -ne 0 ]] && sudo="sudo -n"
  pkgs="gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user-static"
  step "installing $pkgs (apt)"
  $sudo apt-get install -y --no-install-recommends $pkgs >/dev/null 2>&1 \
    || { $sudo apt-get update -qq && $sudo apt-get install -y --no-install-recommends $pkgs >/dev/null; } \
    || skip "could not install $pkgs"
fi

# The NEON code is invisible to the x86-64 clippy run (cfg'd out), so lint it here, as CI
# lints the rest (-D warnings); ~2.5 minutes from nothing on two cores.
step "cargo clippy for aarch64"
cargo clippy --release --target "$target" --all-targets -- -D warnings
step "kernel unit tests under qemu (CPU with dotprod)"
QEMU_CPU=max cargo test --release --target "$target" --lib -- simd:: model::kernels::
step "kernel unit tests under qemu (Cortex-A53: NEON without dotprod)"
QEMU_CPU=cortex-a53 cargo test --release --target "$target" --lib -- simd:: model::kernels::
for kernels in neon-dotprod neon; do
  step "engine tests under qemu, LETHE_KERNELS=$kernels"
  LETHE_KERNELS=$kernels QEMU_CPU=max cargo test --release --target "$target" --test engine -- \
    --skip guidance_changes_behaviour_on_the_default_model
done
step "aarch64 tests passed"
