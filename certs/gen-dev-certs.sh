#!/usr/bin/env bash
# Development PKI for TLS and mTLS on a laptop. Never use these keys in production.
#   certs/gen-dev-certs.sh [out-dir] [vehicle-id ...]
# Creates: ca.pem/ca.key (signs both the server and vehicle certificates),
# server.pem/server.key (CN=gateway, SAN localhost and 127.0.0.1),
# vehicle-<id>.pem/.key (CN=<id>: with mTLS the MQTT client id must equal it).
set -euo pipefail
out="${1:-certs/dev}"; shift || true
vehicles=("${@:-VIN0001}")
mkdir -p "$out"; cd "$out"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 825 \
  -keyout ca.key -out ca.pem -subj "/CN=edge-gateway dev CA" 2>/dev/null
issue() { # name cn [san]
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$1.key" -out "$1.csr" -subj "/CN=$2" 2>/dev/null
  # Extensions make it an X.509 v3 certificate: without any, openssl issues v1, which
  # rustls/webpki refuse (UnsupportedCertVersion).
  printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=%s\n' \
    "$([ -n "${3:-}" ] && echo serverAuth || echo clientAuth)" > "$1.ext"
  if [ -n "${3:-}" ]; then printf 'subjectAltName=%s\n' "$3" >> "$1.ext"; fi
  openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 825 -out "$1.pem" -extfile "$1.ext" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}
issue server gateway "DNS:localhost,IP:127.0.0.1"
for v in "${vehicles[@]}"; do issue "vehicle-$v" "$v"; done
echo "wrote $(pwd): ca.pem server.pem/key ${vehicles[*]/#/vehicle-}"
