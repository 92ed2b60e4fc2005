# Shared set-up of the container tests (sourced by docker/test-image.sh and
# docker/test-compose.sh). What it provides, and why it is done this way here:
#
# * Debian packages the tests drive (podman, buildah, runc, debootstrap, mosquitto-clients,
#   kcat, openssl, curl, Java), installed with apt when missing.
# * A containers.conf of our own (CONTAINERS_CONF, nothing global is changed): the
#   `runc` runtime and the `cgroupfs` cgroup manager (the default crun fails on these
#   machines, and there is no systemd to manage cgroups), `nofile` capped at this shell's
#   hard limit and `nproc` at 32768 (a higher default ulimit is refused by the kernel).
# * A local base image: no container registry is reachable from these machines, so
#   `debootstrap --variant=minbase bookworm` from Debian's archive, `podman import`ed as
#   localhost/edge-gw-bookworm:minbase. It stands in for debian:bookworm-slim (same
#   release) and, with the host's gateway binary, for rust:1-bookworm.
# * Apache Kafka from the jars scripts/kafka.sh resolved into .kafka/libs.
#
# Every failure exits non-zero with the reason (`die`); nothing is skipped.

set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="$REPO/.containers"
BASE_IMAGE="localhost/edge-gw-bookworm:minbase"
GATEWAY_IMAGE="localhost/edge-gateway:test"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

die() { echo "FAIL ($(basename "$0")): $*" >&2; exit 1; }
log() { echo "[$(date -u +%H:%M:%S) $(basename "$0")] $*" >&2; }

ensure_packages() {
  local need=() pkg
  command -v podman >/dev/null 2>&1 || need+=(podman)
  command -v buildah >/dev/null 2>&1 || need+=(buildah)
  command -v runc >/dev/null 2>&1 || [ -x /usr/sbin/runc ] || need+=(runc)
  command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || need+=(debootstrap)
  command -v mosquitto_pub >/dev/null 2>&1 || need+=(mosquitto-clients)
  command -v kcat >/dev/null 2>&1 || need+=(kcat)
  command -v openssl >/dev/null 2>&1 || need+=(openssl)
  command -v curl >/dev/null 2>&1 || need+=(curl)
  command -v java >/dev/null 2>&1 || need+=(openjdk-17-jre-headless)
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg"); done
  if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]} with apt"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    DEBIAN_FRONTEND=noninteractive $sudo apt-get update -qq \
      || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null \
      || die "apt-get install ${need[*]} failed"
  fi
  export PATH="$PATH:/usr/sbin:/sbin"
  for pkg in podman buildah runc debootstrap mosquitto_pub kcat openssl curl java; do
    command -v "$pkg" >/dev/null 2>&1 || die "$pkg is still missing after apt-get install"
  done
}

# Podman's settings for this machine, in a file of ours.
write_containers_conf() {
  mkdir -p "$CACHE"
  local hard
  hard="$(ulimit -Hn)"
  [ "$hard" = unlimited ] && hard=1048576
  cat >"$CACHE/containers.conf" <<EOF
# Written by docker/lib.sh for the container tests on this machine.
[containers]
default_ulimits = ["nofile=${hard}:${hard}", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
  export CONTAINERS_CONF="$CACHE/containers.conf"
  NOFILE_HARD="$hard"
  podman info --format '{{.Host.OCIRuntime.Name}} {{.Host.CgroupManager}}' >"$CACHE/podman-info.txt" 2>&1 \
    || die "podman info failed: $(cat "$CACHE/podman-info.txt")"
  read -r rt cg <"$CACHE/podman-info.txt"
  [ "$rt" = runc ] && [ "$cg" = cgroupfs ] \
    || die "podman uses runtime '$rt', cgroup manager '$cg' (wanted runc, cgroupfs)"
}

# localhost/edge-gw-bookworm:minbase from debootstrap (cached in .containers/).
ensure_base_image() {
  if podman image exists "$BASE_IMAGE"; then return 0; fi
  local root="$CACHE/rootfs"
  if [ ! -f "$root/.complete" ]; then
    rm -rf "$root" "$root.tmp"
    log "debootstrap --variant=minbase bookworm from $DEBIAN_MIRROR (a few minutes)"
    debootstrap --variant=minbase bookworm "$root.tmp" "$DEBIAN_MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
      || die "debootstrap failed (see $CACHE/debootstrap.log): $(tail -3 "$CACHE/debootstrap.log")"
    # Keep the image small and reproducible: no package cache, no lists.
    rm -rf "$root.tmp"/var/cache/apt/archives/*.deb "$root.tmp"/var/lib/apt/lists/*
    mv "$root.tmp" "$root"
    touch "$root/.complete"
  fi
  log "podman import $BASE_IMAGE"
  tar -C "$root" --exclude=./.complete -c . \
    | podman import --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null \
    || die "podman import of the debootstrap root failed"
}

# A free TCP port (on every address), below the kernel's ephemeral range (32768+): the
# containers share the host's network, and a port the kernel hands out for outgoing
# connections (Kafka clients, other engineers' tests) could take it before the container
# binds it.
free_port() {
  python3 - <<'PY'
import random, socket
for _ in range(200):
    p = random.randint(20000, 32000)
    s = socket.socket()
    try:
        s.bind(("0.0.0.0", p)); print(p); break
    except OSError:
        pass
    finally:
        s.close()
else:
    raise SystemExit("no free port found in 20000-32000")
PY
}

# Waits until a command succeeds, up to $1 seconds.
wait_for() {
  local secs="$1"; shift
  local end=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $end ] || return 1
    sleep 1
  done
}

# Apache Kafka on the host, single-node KRaft, from .kafka/libs (as tests/src/kafka.rs).
#   start_host_kafka DIR  -> sets KAFKA_PORT, KAFKA_PID; DIR keeps data and the log.
KAFKA_LIBS="${KAFKA_LIBS:-$REPO/.kafka/libs}"
start_host_kafka() {
  local dir="$1"
  "$REPO/scripts/kafka.sh" || die "scripts/kafka.sh could not provision Kafka"
  mkdir -p "$dir"
  if [ ! -f "$dir/server.properties" ]; then
    KAFKA_PORT="$(free_port)"
    local controller; controller="$(free_port)"
    cat >"$dir/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:${controller}
listeners=PLAINTEXT://127.0.0.1:${KAFKA_PORT},CONTROLLER://127.0.0.1:${controller}
advertised.listeners=PLAINTEXT://127.0.0.1:${KAFKA_PORT}
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=${dir}/data
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
num.partitions=4
auto.create.topics.enable=true
EOF
    local uuid
    uuid="$(java -cp "$KAFKA_LIBS/*" kafka.tools.StorageTool random-uuid 2>/dev/null | tail -1)"
    [ -n "$uuid" ] || die "kafka StorageTool random-uuid failed"
    java -cp "$KAFKA_LIBS/*" kafka.tools.StorageTool format -t "$uuid" -c "$dir/server.properties" \
      >"$dir/format.log" 2>&1 || die "kafka storage format failed: $(tail -3 "$dir/format.log")"
  fi
  KAFKA_PORT="$(sed -n 's/^advertised.listeners=PLAINTEXT:\/\/127.0.0.1:\([0-9]*\)$/\1/p' "$dir/server.properties")"
  java -Xms256m -Xmx768m -cp "$KAFKA_LIBS/*" kafka.Kafka "$dir/server.properties" \
    >>"$dir/broker.log" 2>&1 &
  KAFKA_PID=$!
  wait_for 90 kcat -b "127.0.0.1:$KAFKA_PORT" -L -m 2 \
    || die "Kafka did not start on 127.0.0.1:$KAFKA_PORT: $(tail -5 "$dir/broker.log")"
  log "Kafka up on 127.0.0.1:$KAFKA_PORT (pid $KAFKA_PID)"
}

stop_host_kafka() {
  if [ -n "${KAFKA_PID:-}" ] && kill -0 "$KAFKA_PID" 2>/dev/null; then
    kill -KILL "$KAFKA_PID" 2>/dev/null || true
    wait "$KAFKA_PID" 2>/dev/null || true
  fi
  KAFKA_PID=""
}

# The gateway binary the images carry in the tests: the host's debug build (a release
# build would double the compile time on these 2 cores; the tests check behaviour, not
# speed), debug info stripped, copied into the build context at docker/.prebuilt/.
prepare_prebuilt_gateway() {
  local bin="${GATEWAY_BINARY:-$REPO/target/debug/gateway}"
  if [ -z "${GATEWAY_BINARY:-}" ]; then
    (cd "$REPO" && cargo build -q -p gateway) || die "cargo build -p gateway failed"
  fi
  [ -x "$bin" ] || die "gateway binary $bin not found"
  mkdir -p "$REPO/docker/.prebuilt"
  objcopy --strip-debug "$bin" "$REPO/docker/.prebuilt/gateway" \
    || cp "$bin" "$REPO/docker/.prebuilt/gateway"
}

build_gateway_image() {
  prepare_prebuilt_gateway
  log "podman build $GATEWAY_IMAGE (docker/Dockerfile, local bases, host-built binary)"
  podman build --network host --format docker \
    --build-arg BUILDER_IMAGE="$BASE_IMAGE" \
    --build-arg RUNTIME_IMAGE="$BASE_IMAGE" \
    --build-arg PREBUILT_GATEWAY=docker/.prebuilt/gateway \
    -f "$REPO/docker/Dockerfile" -t "$GATEWAY_IMAGE" "$REPO" >"$CACHE/build-gateway.log" 2>&1 \
    || die "podman build of docker/Dockerfile failed: $(tail -15 "$CACHE/build-gateway.log")"
  # Each new binary leaves the previous build stage's image untagged: remove those.
  podman image prune -f --filter label=io.edge-gateway.stage=build >/dev/null 2>&1 || true
}

# Publishes one QoS 1 message; mosquitto_pub exits 0 only after the PUBACK.
mqtt_pub() { # port client-id topic payload [extra mosquitto_pub args...]
  local port="$1" id="$2" topic="$3" msg="$4"; shift 4
  mosquitto_pub -h 127.0.0.1 -p "$port" -V mqttv5 -q 1 -i "$id" -t "$topic" -m "$msg" "$@"
}

# Every value on a topic, from the beginning (waits until $3 lines or 60 s).
kafka_values() { # bootstrap topic expected-count
  kcat -b "$1" -t "$2" -C -o beginning -e -q -f '%s\n' 2>/dev/null || true
}
