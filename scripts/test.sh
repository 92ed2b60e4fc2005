#!/usr/bin/env bash
# The whole test suite on a fresh machine, set-up included:
#   1. system packages the tests drive (mosquitto-clients: mosquitto_pub/mosquitto_sub),
#   2. cargo test for every workspace member (unit, model and integration tests against
#      the real gateway binary).
# Fails loudly if a prerequisite cannot be installed; never skips tests.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
command -v mosquitto_pub >/dev/null 2>&1 || need_pkgs+=(mosquitto-clients)
command -v openssl >/dev/null 2>&1 || need_pkgs+=(openssl)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "test setup: installing ${need_pkgs[*]}" >&2
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "${need_pkgs[@]}"
fi
command -v mosquitto_pub >/dev/null || { echo "test setup: mosquitto_pub still missing" >&2; exit 1; }

if ! command -v cargo >/dev/null 2>&1; then
  echo "test setup: cargo not found; install Rust with rustup (https://rustup.rs)" >&2
  exit 1
fi

cargo test --workspace --locked "$@"
