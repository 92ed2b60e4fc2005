#!/usr/bin/env bash
# The whole test suite on a fresh machine, set-up included:
#   1. system packages the tests drive (mosquitto-clients, the mosquitto broker for the
#      simulator's tests, kcat, promtool from prometheus, Java and Maven, headless
#      Chromium for the status page),
#   2. the Python conformance suite's virtualenv (.venv-tests/: paho-mqtt, pytest),
#   3. Apache Kafka 4.4 jars from Maven Central (scripts/kafka.sh, cached in .kafka/),
#   4. cargo test for every workspace member (unit, model, mock-cluster and integration
#      tests against the real gateway binary and a real Kafka broker),
#   5. the container and Kubernetes tests (docker/test-k8s.sh, docker/test-image.sh,
#      docker/test-compose.sh: the manifests validated offline, the image built and run
#      under Podman, the compose file brought up with podman-compose; they install
#      podman, buildah, runc and debootstrap with apt and take a few minutes), and
#      docker/test-build.sh: the image built from source, its build stage running
#      `cargo build --release` in a container (the longest step: one release build).
#      CONTAINER_TESTS=0 leaves them out, and says so.
# Fails loudly if a prerequisite cannot be installed; never skips tests.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
command -v mosquitto_pub >/dev/null 2>&1 || need_pkgs+=(mosquitto-clients)
[ -x /usr/sbin/mosquitto ] || command -v mosquitto >/dev/null 2>&1 || need_pkgs+=(mosquitto)
command -v openssl >/dev/null 2>&1 || need_pkgs+=(openssl)
command -v kcat >/dev/null 2>&1 || need_pkgs+=(kcat)
command -v promtool >/dev/null 2>&1 || need_pkgs+=(prometheus)
command -v java >/dev/null 2>&1 || need_pkgs+=(openjdk-17-jre-headless)
command -v mvn >/dev/null 2>&1 || need_pkgs+=(maven)
command -v chromium >/dev/null 2>&1 || need_pkgs+=(chromium)
[ -x /usr/sbin/haproxy ] || command -v haproxy >/dev/null 2>&1 || need_pkgs+=(haproxy)
command -v python3 >/dev/null 2>&1 || need_pkgs+=(python3)
# Building librdkafka and the OpenSSL compiled into it (rdkafka's ssl-vendored): a C
# toolchain with make, and a full perl (OpenSSL's Configure needs more than perl-base).
command -v make >/dev/null 2>&1 || need_pkgs+=(make)
command -v cc >/dev/null 2>&1 || need_pkgs+=(gcc)
perl -MIPC::Cmd -MFindBin -e1 >/dev/null 2>&1 || need_pkgs+=(perl)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_pkgs+=(python3-venv)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "test setup: installing ${need_pkgs[*]}" >&2
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "${need_pkgs[@]}"
fi
command -v mosquitto_pub >/dev/null || { echo "test setup: mosquitto_pub still missing" >&2; exit 1; }
command -v promtool >/dev/null || { echo "test setup: promtool (package prometheus) still missing" >&2; exit 1; }
command -v chromium >/dev/null || { echo "test setup: chromium still missing" >&2; exit 1; }

# The MQTT conformance suite (tests/conformance, driven by tests/tests/conformance.rs).
PAHO_VERSION=2.1.0
PYTEST_VERSION=9.2.0
if ! .venv-tests/bin/python -c "import paho.mqtt, pytest, sys; \
    from importlib.metadata import version as v; \
    sys.exit(v('paho-mqtt') != '$PAHO_VERSION' or v('pytest') != '$PYTEST_VERSION')" >/dev/null 2>&1; then
  echo "test setup: creating .venv-tests (paho-mqtt $PAHO_VERSION, pytest $PYTEST_VERSION)" >&2
  [ -x .venv-tests/bin/python ] || python3 -m venv .venv-tests
  .venv-tests/bin/pip install -q "paho-mqtt==$PAHO_VERSION" "pytest==$PYTEST_VERSION"
fi

./scripts/kafka.sh

if ! command -v cargo >/dev/null 2>&1; then
  echo "test setup: cargo not found; install Rust with rustup (https://rustup.rs)" >&2
  exit 1
fi

cargo test --workspace --locked --no-fail-fast "$@"

# 5. Containers and Kubernetes (README, "Containers and Kubernetes"). Separate scripts:
# each prints PASS or "FAIL (<script>): <reason>" and exits non-zero on failure.
if [ "${CONTAINER_TESTS:-1}" = 0 ]; then
  echo "test.sh: CONTAINER_TESTS=0: docker/test-k8s.sh, test-image.sh, test-compose.sh and test-build.sh were NOT run" >&2
  exit 0
fi
./docker/test-k8s.sh
./docker/test-image.sh
./docker/test-compose.sh
./docker/test-build.sh
