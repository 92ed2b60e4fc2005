#!/usr/bin/env bash
# Validates the Kubernetes manifests in docker/k8s/ offline (issue 11, item 3):
#
#  1. kubernetes-validate (PyPI; it ships the API schemas, no cluster and no network) in
#     strict mode (unknown fields are errors), for Kubernetes 1.30 and 1.37, on every
#     manifest including examples/; a deliberately broken copy must be refused, so a
#     validator that checks nothing cannot pass;
#  2. what the schema cannot see: the pieces refer to each other correctly (Service and
#     PDB selectors match the pod labels, named ports exist, the ConfigMap and Secrets the
#     pod mounts are the ones defined, probe paths /healthz and /readyz on the admin
#     port, a volumeClaimTemplate for /var/lib/gateway, token_file and certificate paths
#     inside the mounts, terminationGracePeriodSeconds >= preStop +
#     gateway.shutdown_grace_secs, resources set);
#  3. `gateway check-config` on the ConfigMap's gateway.toml (the files it names are
#     replaced by temporary ones through GATEWAY_* overrides, which check-config reads).
#
# Exit 0 only when every step passed; otherwise "FAIL: <reason>" and non-zero.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
die() { echo "FAIL (test-k8s.sh): $*" >&2; exit 1; }
log() { echo "[$(date -u +%H:%M:%S) test-k8s.sh] $*" >&2; }

KV_VERSION=1.37.0
VENV="$REPO/.containers/venv-k8s"
if ! "$VENV/bin/kubernetes-validate" --version 2>/dev/null | grep -q "$KV_VERSION"; then
  log "creating $VENV with kubernetes-validate $KV_VERSION"
  mkdir -p "$REPO/.containers"
  python3 -m venv "$VENV" || die "python3 -m venv failed (apt-get install python3-venv)"
  "$VENV/bin/pip" install -q "kubernetes-validate==$KV_VERSION" \
    || die "pip install kubernetes-validate==$KV_VERSION failed"
fi

K8S="$REPO/docker/k8s"
manifests=("$K8S"/*.yaml "$K8S"/examples/*.yaml)
for v in 1.30.0 1.37.0; do
  "$VENV/bin/kubernetes-validate" --strict -k "$v" --quiet "${manifests[@]}" >"/tmp/kv-$$.txt" 2>&1 \
    || { cat "/tmp/kv-$$.txt" >&2; rm -f "/tmp/kv-$$.txt"; die "kubernetes-validate --strict -k $v refused the manifests"; }
  grep -qi "fail\|error" "/tmp/kv-$$.txt" && { cat "/tmp/kv-$$.txt" >&2; die "kubernetes-validate -k $v reported problems"; }
  log "kubernetes-validate --strict -k $v: ${#manifests[@]} files, every resource valid"
done
rm -f "/tmp/kv-$$.txt"

# Negative control: an unknown field in the pod spec must be refused in strict mode.
TMP="$(mktemp -d)"; trap 'rm -rf "$TMP"' EXIT
sed 's/^      terminationGracePeriodSeconds:/      terminationGracePeriodSecs:/' "$K8S/statefulset.yaml" >"$TMP/broken.yaml"
cmp -s "$K8S/statefulset.yaml" "$TMP/broken.yaml" && die "negative control: could not break statefulset.yaml"
if "$VENV/bin/kubernetes-validate" --strict --quiet "$TMP/broken.yaml" >/dev/null 2>&1; then
  die "kubernetes-validate --strict accepted an unknown field: it is not validating"
fi
log "negative control: an unknown field is refused"

# --- 2. cross-references --------------------------------------------------------------------
"$VENV/bin/python" - "$K8S" "$TMP" <<'EOF' || die "the manifests do not fit together"
import pathlib, re, sys, tomllib, yaml
k8s, tmp = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
docs = []
for f in sorted(k8s.glob("*.yaml")) + sorted((k8s / "examples").glob("*.yaml")):
    docs += [d for d in yaml.safe_load_all(f.read_text()) if d]
by = {}
for d in docs:
    by.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
bad = []
def need(cond, msg):
    if not cond: bad.append(msg)

sts = by["StatefulSet"]["gateway"]
pod = sts["spec"]["template"]
labels = pod["metadata"]["labels"]
need(sts["spec"]["selector"]["matchLabels"].items() <= labels.items(), "StatefulSet selector does not match its pod labels")
need(sts["spec"]["serviceName"] in by["Service"] and by["Service"][sts["spec"]["serviceName"]]["spec"].get("clusterIP") == "None",
     "serviceName is not a headless Service")
c = pod["spec"]["containers"][0]
ports = {p["name"]: p["containerPort"] for p in c["ports"]}
need(ports.get("mqtts") == 8883 and ports.get("admin") == 8080, f"container ports {ports}")

for name, svc in by["Service"].items():
    need(svc["spec"]["selector"].items() <= labels.items(), f"Service {name} selects no gateway pod")
    for p in svc["spec"]["ports"]:
        need(p.get("targetPort", p["port"]) in ports or p.get("targetPort") in ports.values(),
             f"Service {name} targets unknown port {p.get('targetPort')}")
need(by["Service"]["gateway-mqtt"]["spec"]["type"] == "LoadBalancer", "MQTT Service is not a LoadBalancer")
need(by["Service"]["gateway-admin"]["spec"]["type"] == "ClusterIP", "admin Service is not ClusterIP")
pdb = by["PodDisruptionBudget"]["gateway"]
need(pdb["spec"]["selector"]["matchLabels"].items() <= labels.items(), "PodDisruptionBudget selects no gateway pod")

for probe, path in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")]:
    g = c.get(probe, {}).get("httpGet", {})
    need(g.get("path") == path and g.get("port") in ("admin", 8080), f"{probe} is {g}, want {path} on the admin port")
res = c.get("resources", {})
need(res.get("requests", {}).get("cpu") and res.get("requests", {}).get("memory") and res.get("limits", {}).get("memory"),
     f"resources incomplete: {res}")

mounts = {m["name"]: m for m in c["volumeMounts"]}
templates = {t["metadata"]["name"] for t in sts["spec"].get("volumeClaimTemplates", [])}
need("journal" in templates and mounts.get("journal", {}).get("mountPath") == "/var/lib/gateway",
     "no volumeClaimTemplate mounted at /var/lib/gateway")
vols = {v["name"]: v for v in pod["spec"]["volumes"]}
for m in mounts:
    need(m in vols or m in templates, f"volumeMount {m} has no volume")
cm_name = vols["config"]["configMap"]["name"]
need(cm_name in by["ConfigMap"], f"ConfigMap {cm_name} not defined")
for v in ("tls", "admin-token"):
    sec = vols[v]["secret"]["secretName"]
    need(sec in by.get("Secret", {}), f"Secret {sec} not defined (examples/secrets.yaml)")

toml_text = by["ConfigMap"][cm_name]["data"]["gateway.toml"]
cfg = tomllib.loads(toml_text)
(tmp / "gateway.toml").write_text(toml_text)
def mounted(path, vol):
    return path.startswith(mounts[vol]["mountPath"].rstrip("/") + "/")
need(mounted(cfg["admin"]["token_file"], "admin-token"), f"admin.token_file {cfg['admin']['token_file']} is outside the token Secret's mount")
token_keys = set(by["Secret"][vols["admin-token"]["secret"]["secretName"]]["stringData"])
need(cfg["admin"]["token_file"].rsplit("/", 1)[1] in token_keys, "admin.token_file names no key of the token Secret")
tls_keys = set(by["Secret"][vols["tls"]["secret"]["secretName"]]["stringData"])
for k in ("cert", "key", "client_ca"):
    p = cfg["tls"][k]
    need(mounted(p, "tls") and p.rsplit("/", 1)[1] in tls_keys, f"tls.{k} = {p} is not a key of the TLS Secret's mount")
need(cfg["journal"]["dir"].startswith("/var/lib/gateway/"), "journal.dir is not on the claim")

grace = sts["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
pre = c["lifecycle"]["preStop"]["exec"]["command"]
pre_secs = int(pre[-1]) if pre[0].endswith("sleep") else 0
shutdown = cfg["gateway"]["shutdown_grace_secs"]
need(grace >= pre_secs + shutdown + 5,
     f"terminationGracePeriodSeconds {grace} < preStop {pre_secs} + shutdown_grace_secs {shutdown} + 5")
for b in bad:
    print("k8s:", b, file=sys.stderr)
print(f"k8s: cross-references ok (grace {grace} s >= preStop {pre_secs} + drain {shutdown})", file=sys.stderr)
sys.exit(1 if bad else 0)
EOF

# --- 3. the ConfigMap's gateway.toml is a valid gateway configuration ------------------------
BIN="${GATEWAY_BINARY:-$REPO/target/debug/gateway}"
if [ -z "${GATEWAY_BINARY:-}" ]; then
  (cd "$REPO" && cargo build -q -p gateway) || die "cargo build -p gateway failed"
fi
[ -x "$BIN" ] || die "gateway binary $BIN not found"
"$REPO/certs/gen-dev-certs.sh" "$TMP/certs" >/dev/null || die "certs/gen-dev-certs.sh failed"
echo "test-token" >"$TMP/token"
GATEWAY_TLS__CERT="$TMP/certs/server.pem" GATEWAY_TLS__KEY="$TMP/certs/server.key" \
GATEWAY_TLS__CLIENT_CA="$TMP/certs/ca.pem" GATEWAY_ADMIN__TOKEN_FILE="$TMP/token" \
  "$BIN" check-config --config "$TMP/gateway.toml" >"$TMP/check.txt" 2>&1 \
  || die "gateway check-config refused the ConfigMap's gateway.toml: $(cat "$TMP/check.txt")"
log "gateway check-config: the ConfigMap's gateway.toml is valid"
log "PASS: docker/k8s/ valid in strict mode (1.30, 1.37), consistent, and its gateway.toml accepted"
