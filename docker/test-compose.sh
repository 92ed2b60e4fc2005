#!/usr/bin/env bash
# Brings docker/compose.yaml up under podman-compose for real (issue 11, item 2):
#
#  1. images built locally (no registry is reachable here): the gateway from
#     docker/Dockerfile (as docker/test-image.sh), Kafka from docker/kafka/Dockerfile
#     with the Maven-resolved jars of .kafka/libs and Debian's Java, Prometheus from
#     Debian's package (docker/prometheus/Dockerfile.debian), all on the debootstrap
#     base; podman-compose 1.6.0 from PyPI in a venv this script creates;
#  2. `podman-compose up -d` on host networking, with free ports;
#  3. waits until Prometheus has scraped the gateway: its HTTP API answers
#     up{job="gateway"} = 1;
#  4. publishes with mosquitto_pub, reads the message from the compose file's Kafka;
#  5. runs every query of the Grafana dashboard (docker/grafana/dashboards/*.json)
#     against that Prometheus: each must be valid PromQL and the metrics it names must
#     exist (Grafana itself is not started: no image of it can be fetched here);
#  6. stops Kafka, publishes (journaled), `podman-compose stop gateway`: the gateway
#     must exit 0 within stop_grace_period (its drain waits shutdown_grace_secs); starts
#     both again: the message reaches Kafka;
#  7. `podman-compose down -v`.
#
# Exit 0 only when every step passed; otherwise "FAIL: <reason>" and non-zero.
source "$(dirname "$0")/lib.sh"

PODMAN_COMPOSE_VERSION=1.6.0
ensure_packages python3-venv
write_containers_conf
ensure_base_image
"$REPO/scripts/kafka.sh" || die "scripts/kafka.sh could not provision the Kafka jars"

VENV="$CACHE/venv-compose"
if ! "$VENV/bin/podman-compose" version 2>/dev/null | grep -q "$PODMAN_COMPOSE_VERSION"; then
  log "creating $VENV with podman-compose $PODMAN_COMPOSE_VERSION"
  python3 -m venv "$VENV" || die "python3 -m venv failed"
  "$VENV/bin/pip" install -q "podman-compose==$PODMAN_COMPOSE_VERSION" \
    || die "pip install podman-compose==$PODMAN_COMPOSE_VERSION failed"
fi

KAFKA_IMAGE_LOCAL="localhost/edge-gw-kafka:4.4.0"
PROMETHEUS_IMAGE_LOCAL="localhost/edge-gw-prometheus:debian"
build_gateway_image
log "podman build $KAFKA_IMAGE_LOCAL (docker/kafka/Dockerfile, context .kafka/)"
podman build --network host --format docker --build-arg BASE_IMAGE="$BASE_IMAGE" \
  -f "$REPO/docker/kafka/Dockerfile" -t "$KAFKA_IMAGE_LOCAL" "$REPO/.kafka" \
  >"$CACHE/build-kafka.log" 2>&1 \
  || die "podman build of docker/kafka/Dockerfile failed: $(tail -15 "$CACHE/build-kafka.log")"
log "podman build $PROMETHEUS_IMAGE_LOCAL (docker/prometheus/Dockerfile.debian)"
podman build --network host --format docker --build-arg BASE_IMAGE="$BASE_IMAGE" \
  -f "$REPO/docker/prometheus/Dockerfile.debian" -t "$PROMETHEUS_IMAGE_LOCAL" "$REPO/docker/prometheus" \
  >"$CACHE/build-prometheus.log" 2>&1 \
  || die "podman build of docker/prometheus/Dockerfile.debian failed: $(tail -15 "$CACHE/build-prometheus.log")"

TMP="$(mktemp -d /tmp/edge-gw-compose.XXXXXX)"
PROJECT="edge-gw-compose-test-$$"
export GATEWAY_IMAGE="$GATEWAY_IMAGE" KAFKA_IMAGE="$KAFKA_IMAGE_LOCAL" PROMETHEUS_IMAGE="$PROMETHEUS_IMAGE_LOCAL"
export BASE_IMAGE RUNTIME_IMAGE="$BASE_IMAGE" BUILDER_IMAGE="$BASE_IMAGE"
MQTT_PORT="$(free_port)"
export MQTT_LISTEN="127.0.0.1:$MQTT_PORT"
export ADMIN_PORT KAFKA_PORT KAFKA_CONTROLLER_PORT PROMETHEUS_PORT
ADMIN_PORT="$(free_port)"; KAFKA_PORT="$(free_port)"; KAFKA_CONTROLLER_PORT="$(free_port)"
PROMETHEUS_PORT="$(free_port)"
# The shipped prometheus.yml with this run's admin port.
sed "s/127.0.0.1:8080/127.0.0.1:$ADMIN_PORT/" "$REPO/docker/prometheus/prometheus.yml" >"$TMP/prometheus.yml"
chmod 0644 "$TMP/prometheus.yml"; chmod 0755 "$TMP"
export PROMETHEUS_CONFIG="$TMP/prometheus.yml"

compose() { "$VENV/bin/podman-compose" -p "$PROJECT" -f "$REPO/docker/compose.yaml" "$@"; }
cleanup() {
  local rc=$?
  if [ $rc -ne 0 ]; then
    for s in kafka gateway prometheus; do
      echo "--- $s log (last 15 lines) ---" >&2
      podman logs --tail 15 "${PROJECT}_${s}_1" >&2 2>&1 || true
    done
  fi
  compose down -v >"$TMP/down.log" 2>&1 || echo "podman-compose down failed: $(tail -5 "$TMP/down.log")" >&2
  rm -rf "$TMP"
  exit $rc
}
trap cleanup EXIT

log "podman-compose up (project $PROJECT: MQTT $MQTT_PORT, admin $ADMIN_PORT, Kafka $KAFKA_PORT, Prometheus $PROMETHEUS_PORT)"
compose up -d --no-build >"$TMP/up.log" 2>&1 || die "podman-compose up failed: $(tail -20 "$TMP/up.log")"
for s in kafka gateway prometheus; do
  [ "$(podman inspect "${PROJECT}_${s}_1" --format '{{.State.Running}}' 2>/dev/null)" = true ] \
    || die "service $s is not running after up: $(podman logs --tail 10 "${PROJECT}_${s}_1" 2>&1)"
done
BOOT="127.0.0.1:$KAFKA_PORT"
wait_for 120 kcat -b "$BOOT" -L -m 2 || die "Kafka of the compose file not reachable on $BOOT within 120 s"
log "Kafka up on $BOOT"
wait_for 60 curl -fsS "http://127.0.0.1:$ADMIN_PORT/readyz" \
  || die "gateway not ready on 127.0.0.1:$ADMIN_PORT within 60 s"
log "gateway ready"
# What compose.yaml asks of the engine for the gateway: the nofile limit and the image's
# HEALTHCHECK (the stop grace period is checked at the end, by stopping it).
GW="${PROJECT}_gateway_1"
nofile="$(podman exec "$GW" sh -c 'ulimit -n')"
[ "$nofile" = 20000 ] || die "gateway nofile is $nofile, compose.yaml says 20000"
podman healthcheck run "$GW" >"$TMP/hc.txt" 2>&1 || die "HEALTHCHECK of the compose gateway failed: $(cat "$TMP/hc.txt")"
log "gateway container: nofile 20000, HEALTHCHECK passes"

# --- 3. Prometheus has scraped the gateway --------------------------------------------------
prom_query() { # expr -> JSON
  curl -fsS --get "http://127.0.0.1:$PROMETHEUS_PORT/api/v1/query" --data-urlencode "query=$1"
}
up_is_one() {
  prom_query 'up{job="gateway"}' | python3 -c '
import json, sys
r = json.load(sys.stdin)["data"]["result"]
sys.exit(0 if r and r[0]["value"][1] == "1" else 1)'
}
wait_for 90 up_is_one || die "Prometheus did not report up{job=\"gateway\"} = 1 within 90 s: $(prom_query 'up' 2>&1)"
log "Prometheus: up{job=\"gateway\"} = 1"

# --- 4. publish, read from Kafka ---------------------------------------------------------
MSG="compose-$(date +%s)-$$"
mqtt_pub "$MQTT_PORT" VIN-COMPOSE-1 vehicles/VIN-COMPOSE-1/telemetry "$MSG" \
  || die "mosquitto_pub to the compose gateway got no PUBACK"
end=$((SECONDS + 60))
until kafka_values "$BOOT" vehicles.telemetry | grep -qxF "$MSG"; do
  [ $SECONDS -lt $end ] || die "message $MSG not in Kafka topic vehicles.telemetry after 60 s"
  sleep 1
done
log "message published through the gateway read back from Kafka"

# --- 5. every dashboard query against the live Prometheus ------------------------------
# Wait for a scrape after the publish, so the histograms have observations.
sleep 6
python3 - "$PROMETHEUS_PORT" "$REPO"/docker/grafana/dashboards/*.json <<'EOF' || die "Grafana dashboard queries failed against Prometheus"
import json, re, sys, urllib.parse, urllib.request
port, files = sys.argv[1], sys.argv[2:]
bad, checked = [], 0
for path in files:
    dash = json.load(open(path))
    for panel in dash["panels"]:
        for t in panel.get("targets", []):
            expr = t["expr"].replace("$__rate_interval", "1m").replace("$instance", ".*")
            url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
            try:
                r = json.load(urllib.request.urlopen(url, timeout=10))
            except Exception as e:  # HTTP 400 = invalid PromQL
                bad.append(f"{panel['title']!r}: {expr}: {e}"); continue
            checked += 1
            if r.get("status") != "success":
                bad.append(f"{panel['title']!r}: {expr}: {r}"); continue
            # Every metric the panel names must exist in what Prometheus scraped.
            for metric in set(re.findall(r"\b(gateway_[a-z_]+)", expr)):
                q = urllib.parse.urlencode({"match[]": metric})
                series = json.load(urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/api/v1/series?{q}", timeout=10))["data"]
                if not series:
                    bad.append(f"{panel['title']!r}: metric {metric} was never scraped")
for b in bad:
    print("dashboard:", b, file=sys.stderr)
print(f"dashboard: {checked} queries valid, every metric scraped", file=sys.stderr)
sys.exit(1 if bad or checked == 0 else 0)
EOF

# --- 6. stop and start: the drain gets its grace period, the journal volume survives ------
# podman-compose applies stop_grace_period when it stops a service (podman stop -t), not
# as the container's own stop timeout. With Kafka stopped the gateway's drain waits its
# whole shutdown_grace_secs (30 s) for confirmations; an engine default of 10 s would
# SIGKILL it (exit 137).
compose stop kafka >"$TMP/stop-kafka.log" 2>&1 || die "podman-compose stop kafka failed: $(tail -5 "$TMP/stop-kafka.log")"
MSG2="compose-offline-$(date +%s)-$$"
mqtt_pub "$MQTT_PORT" VIN-COMPOSE-2 vehicles/VIN-COMPOSE-2/telemetry "$MSG2" \
  || die "mosquitto_pub with Kafka stopped got no PUBACK (the journal should take it)"
t0=$SECONDS
compose stop gateway >"$TMP/stop-gw.log" 2>&1 || die "podman-compose stop gateway failed: $(tail -5 "$TMP/stop-gw.log")"
took=$((SECONDS - t0))
code="$(podman inspect "$GW" --format '{{.State.ExitCode}}')"
[ "$code" = 0 ] || die "gateway exited $code after podman-compose stop (${took}s): the drain was cut (stop_grace_period not applied?)"
podman logs "$GW" >"$TMP/gw.log" 2>&1 || true
grep -q 'SIGTERM received' "$TMP/gw.log" || die "the compose gateway did not log 'SIGTERM received'"
log "podman-compose stop gateway: SIGTERM, drain of ${took}s, exit 0 (stop_grace_period 45s applied)"
compose start kafka >"$TMP/start.log" 2>&1 || die "podman-compose start kafka failed: $(tail -5 "$TMP/start.log")"
wait_for 120 kcat -b "$BOOT" -L -m 2 || die "Kafka did not come back on $BOOT"
compose start gateway >>"$TMP/start.log" 2>&1 || die "podman-compose start gateway failed: $(tail -5 "$TMP/start.log")"
end=$((SECONDS + 90))
until kafka_values "$BOOT" vehicles.telemetry | grep -qxF "$MSG2"; do
  [ $SECONDS -lt $end ] || die "message $MSG2, PUBACK'd while Kafka was stopped, not in Kafka 90 s after the restart"
  sleep 1
done
log "message PUBACK'd while Kafka was stopped reached Kafka after the gateway restarted on its volume"
log "PASS: compose (gateway, Kafka, Prometheus) up under podman-compose; Prometheus scraped the gateway; a message went MQTT -> gateway -> Kafka; every dashboard query is valid and its metrics exist; stop/start drains within stop_grace_period and loses nothing. NOT run: Grafana itself (the --profile grafana service), because no Grafana image or package can be fetched on these machines (no container registry; Grafana is not in Debian)"
