#!/usr/bin/env bash
# Provisions Apache Kafka 4.4 for the tests without Docker: Maven resolves
# org.apache.kafka:kafka_2.13 and its runtime dependencies from Maven Central into
# .kafka/libs (cached; delete the folder to re-resolve). The test harness formats
# storage and runs the broker from there (tests/src/kafka.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
libs="$PWD/.kafka/libs"
if [ -f "$libs/kafka_2.13-4.4.0.jar" ] && [ -f "$libs/.complete" ]; then
  exit 0
fi
command -v java >/dev/null || { echo "kafka setup: java not found (Java 17+ is required)" >&2; exit 1; }
command -v mvn >/dev/null || { echo "kafka setup: mvn not found" >&2; exit 1; }
echo "kafka setup: resolving Apache Kafka 4.4.0 from Maven Central into $libs" >&2
rm -rf "$libs"
mvn -q -B -f tests/kafka/pom.xml dependency:copy-dependencies \
  -DoutputDirectory="$libs" -DincludeScope=runtime
[ -f "$libs/kafka_2.13-4.4.0.jar" ] || { echo "kafka setup: kafka_2.13-4.4.0.jar missing after mvn" >&2; exit 1; }
touch "$libs/.complete"
echo "kafka setup: $(ls "$libs" | wc -l) jars ready" >&2
