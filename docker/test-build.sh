#!/usr/bin/env bash
# Builds docker/Dockerfile the way a user does, the build stage compiling the gateway
# from the sources with cargo (issue 11, item 1), and runs the resulting image.
#
# docker/test-image.sh checks the image's behaviour with the host's binary copied in
# (PREBUILT_GATEWAY); this script proves the other path, the one users take: `RUN cargo
# build --release --locked -p gateway` inside the builder image.
#
# No registry is reachable from these machines, so rust:1-bookworm is substituted by
# BUILDER_IMAGE=localhost/edge-gw-rust:bookworm: the debootstrap base (docker/lib.sh)
# plus Debian's C toolchain (what rust:1-bookworm ships and librdkafka's build needs),
# with the host's Rust toolchain mounted read-only at build time (`podman build -v`;
# static.rust-lang.org is unreachable, and the toolchain is what `cargo test` uses
# anyway). Crates come from crates.io over the host network (`--network host`), trusting
# the host's CA bundle (mounted the same way).
#
# Cost: one release build of the gateway on this machine's cores (several minutes).
# Exit 0 only when the image was built from source and its binary runs.
source "$(dirname "$0")/lib.sh"

BUILDER_IMAGE="localhost/edge-gw-rust:bookworm"
SOURCE_IMAGE="localhost/edge-gateway:from-source"

ensure_packages
write_containers_conf
ensure_base_image

TOOLCHAIN="$(rustc --print sysroot)" || die "no host Rust toolchain (rustc --print sysroot)"
[ -x "$TOOLCHAIN/bin/cargo" ] || die "no cargo in the host toolchain $TOOLCHAIN"
# The host's trust store: where egress goes through a TLS-inspecting proxy, its CA is
# there, and cargo inside the build must trust it to reach crates.io.
HOST_CA="${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}"
[ -f "$HOST_CA" ] || die "no CA bundle at $HOST_CA (set SSL_CERT_FILE)"

if ! podman image exists "$BUILDER_IMAGE"; then
  log "podman build $BUILDER_IMAGE (bookworm + gcc, g++, make, perl, pkg-config)"
  podman build --network host --format docker -t "$BUILDER_IMAGE" -f - "$CACHE" \
    >"$CACHE/build-builder.log" 2>&1 <<DOCKERFILE || die "builder image failed: $(tail -15 "$CACHE/build-builder.log")"
FROM $BASE_IMAGE
RUN set -eu; apt-get update; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      gcc g++ make libc6-dev perl pkg-config ca-certificates python3; \
    rm -rf /var/lib/apt/lists/*
ENV CARGO_HOME=/usr/local/cargo \
    CARGO_HTTP_CAINFO=/etc/ssl/certs/host-ca-certificates.crt \
    PATH=/usr/local/rust/bin:/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
DOCKERFILE
fi

TMP="$(mktemp -d /tmp/edge-gw-build.XXXXXX)"
cleanup() {
  local rc=$?
  podman rmi -f "$SOURCE_IMAGE" >/dev/null 2>&1 || true
  podman image prune -f --filter label=io.edge-gateway.stage=build >/dev/null 2>&1 || true
  rm -rf "$TMP"
  exit $rc
}
trap cleanup EXIT

log "podman build $SOURCE_IMAGE: docker/Dockerfile's build stage runs cargo build --release (several minutes)"
start=$SECONDS
podman build --network host --format docker \
  -v "$TOOLCHAIN:/usr/local/rust:ro" \
  -v "$HOST_CA:/etc/ssl/certs/host-ca-certificates.crt:ro" \
  --build-arg BUILDER_IMAGE="$BUILDER_IMAGE" \
  --build-arg RUNTIME_IMAGE="$BASE_IMAGE" \
  -f "$REPO/docker/Dockerfile" -t "$SOURCE_IMAGE" "$REPO" >"$CACHE/build-from-source.log" 2>&1 \
  || die "podman build from source failed: $(tail -25 "$CACHE/build-from-source.log")"
log "built from source in $((SECONDS - start)) s"
grep -q "Compiling gateway" "$CACHE/build-from-source.log" \
  || die "the build stage did not compile the gateway (see $CACHE/build-from-source.log)"

# The binary the build stage produced runs in the runtime stage, as the non-root user,
# and is a release build of this commit.
# (stderr apart: podman complains there about the missing systemd for health checks.)
version="$(podman run --rm --network host "$SOURCE_IMAGE" --version 2>"$TMP/stderr")" \
  || die "gateway --version in the built image failed: $version $(cat "$TMP/stderr")"
log "image says: $version"
[[ "$version" == gateway\ * ]] || die "unexpected --version output: $version"
user="$(podman run --rm --network host --entrypoint /usr/bin/id "$SOURCE_IMAGE" -u 2>"$TMP/stderr")" \
  || die "id in the built image failed: $user $(cat "$TMP/stderr")"
[ "$user" = 10001 ] || die "the image runs as uid $user, want 10001"

# It serves: embedded Kafka default is not in the image, so a config of its own with
# plain MQTT and the admin API on free ports, pointed at a Kafka bootstrap that need not
# answer (/healthz is about the process, not the backbone).
mqtt_port="$(free_port)"; admin_port="$(free_port)"
cat >"$TMP/gateway.toml" <<TOML
[mqtt]
listen = "127.0.0.1:$mqtt_port"
[admin]
listen = "127.0.0.1:$admin_port"
[kafka]
bootstrap = "127.0.0.1:1"
[journal]
dir = "/var/lib/gateway/journal"
[auth]
allow_anonymous = true
TOML
name="edge-gw-build-test-$$"
podman run -d --name "$name" --network host -v "$TMP/gateway.toml:/etc/gateway/gateway.toml:ro,Z" \
  "$SOURCE_IMAGE" >/dev/null 2>"$TMP/stderr" || die "podman run of the built image failed: $(cat "$TMP/stderr")"
ok=""
for _ in $(seq 1 100); do
  if curl -fsS "http://127.0.0.1:$admin_port/healthz" >/dev/null 2>&1; then ok=1; break; fi
  sleep 0.2
done
if [ -z "$ok" ]; then
  podman logs --tail 30 "$name" >&2 || true
  podman rm -f -t 0 "$name" >/dev/null 2>&1 || true
  die "the gateway built from source never answered /healthz"
fi
podman rm -f -t 5 "$name" >/dev/null 2>&1 || true
log "PASS: docker/Dockerfile builds the gateway from source and the image serves"
