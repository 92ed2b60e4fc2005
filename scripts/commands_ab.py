#!/usr/bin/env python3
"""Command latency, the working tree's gateway against another revision's, in one run (A/B).

    python3 scripts/commands_ab.py --baseline <rev> [--runs 3] [--paths mqtt] [--rates 1000,10000]
    python3 scripts/commands_ab.py --baseline-binary <path to a gateway> ...

Builds the release gateway of `--baseline` (bench.build_baseline) and the working tree's,
starts one Kafka, then for each run, rate and path measures the baseline and the working
tree one after the other, each on a fresh gateway, with the commands benchmark's own case
(`bench.command_case`, 10,000 vehicles). On this shared machine a whole table moves with
the load between runs taken hours apart; two builds alternated in one run do not.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    bench.ab_arguments(ap)
    ap.add_argument("--paths", default="mqtt", help="of mqtt,rest,kafka")
    ap.add_argument("--rates", default="1000,10000")
    ap.add_argument("--command-vehicles", type=int, default=10000)
    ap.add_argument("--command-issuers", type=int, default=8)
    ap.add_argument("--command-warmup", type=int, default=3)
    ap.add_argument("--command-seconds", type=int, default=10)
    ap.add_argument("--command-kafka-linger-ms", type=int, default=5)
    args = ap.parse_args()
    builds, work, certs = bench.ab_prepare(args, "commands-ab-")
    pw_hash = subprocess.run([bench.GATEWAY, "hash-password"], input=bench.OPERATOR_PASSWORD,
                             capture_output=True, text=True, check=True).stdout.strip()
    kafka = bench.Kafka(work)
    kafka.create_topic("vehicles.commands")
    kafka.create_topic("vehicles.command-outcomes")
    rows = {}
    try:
        for run in range(args.runs):
            for rate in [float(x) for x in args.rates.split(",") if x]:
                for path in [x for x in args.paths.split(",") if x]:
                    for name, binary in builds.items():
                        gw = bench.Gateway(work, kafka.bootstrap, certs, name=f"ab-{name}",
                                           operator_hash=pw_hash, binary=binary)
                        try:
                            deadline = time.time() + 60
                            while gw.metric("gateway_commands_partitions_assigned") < 1 and time.time() < deadline:
                                time.sleep(0.2)
                            tag = f"{name[0]}{path}{rate:g}r{run}"
                            extra = ["--port", str(gw.port), "--id-prefix", f"v{tag}"]
                            if path == "mqtt":
                                extra += ["--operator-username", bench.OPERATOR_USER, "--operator-password",
                                          bench.OPERATOR_PASSWORD, "--operator-prefix", f"op-{tag}"]
                            elif path == "rest":
                                extra += ["--admin", f"127.0.0.1:{gw.admin}"]
                            else:
                                extra += ["--kafka-bootstrap", kafka.bootstrap, "--kafka-topic", "vehicles.commands",
                                          "--kafka-linger-ms", str(args.command_kafka_linger_ms)]
                            r = bench.command_run(name, bench.command_case(path, rate, args), extra,
                                                  {"broker": gw.proc.pid}, args)
                        finally:
                            gw.stop()
                        rl = r["received_latency"]
                        rows.setdefault((path, rate, name), []).append(r)
                        print(f"{path} {rate:g}/s {name}: p50 {rl['p50_us']} µs p99 {rl['p99_us']} µs "
                              f"p99.9 {rl['p999_us']} µs, CPU {r['cpu_secs'].get('broker', 0):.2f} s", flush=True)
    finally:
        kafka.kill()
    print("\nmedians (min-max) of received p99 and gateway CPU s:")
    for (path, rate, name), rs in sorted(rows.items()):
        p99 = [r["received_latency"]["p99_us"] / 1000 for r in rs]
        cpu = [r["cpu_secs"].get("broker", 0) for r in rs]
        print(f"  {path} {rate:g}/s {name:8}: p99 {statistics.median(p99):.3f} ms ({min(p99):.3f}-{max(p99):.3f}), "
              f"CPU {statistics.median(cpu):.2f} s ({min(cpu):.2f}-{max(cpu):.2f})")


if __name__ == "__main__":
    main()
