#!/usr/bin/env python3
"""Ingest CPU per message and delivery latency, the working tree's gateway against
another revision's, in one run (A/B).

    python3 scripts/ingest_ab.py --baseline <rev> [--runs 5] [--cases ingest_cpu,fanout-q1]
    python3 scripts/ingest_ab.py --baseline-binary <path to a gateway> ...

Cases:
* `ingest_cpu`: the measure of `bench.py --only ingest_cpu` (100 vehicles × 16 in flight,
  QoS 1, real Kafka, the simulator pinned with taskset): PUBACK'd messages per second of
  the gateway's CPU (utime + stime from /proc).
* `fanout-q0`, `fanout-q1`, `fanin-q0`, `fanin-q1`: the delivery cases of
  `bench.py --only pubsub` (publish-to-receive latency, gateway CPU).
* `drain`: Kafka killed, a backlog of `--drain-backlog` records built by 100 vehicles
  (16 in flight each), Kafka started again; from then a connected fleet of 100 vehicles
  publishes QoS 1 at 1,000 msgs/s in total for `--drain-seconds`: its PUBACK latency
  while the journal drains, and how long the drain took (from Kafka's start until the
  release watermark reached the durable one).

Each run measures the baseline and the working tree one after the other, each on a
fresh gateway against one Kafka: a change worth a few percent of CPU is lost in the
drift of a shared 2-core machine between runs taken apart, not between neighbours.
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

PUBSUB = {f"{pattern}-q{qos}": (pattern, qos) for pattern, qos in bench.PUBSUB_CASES}
CASES = ("ingest_cpu", *PUBSUB, "drain")


def ingest_cpu(gw, kafka, tag, args):
    sat = ["--vehicles", "100", "--window", "16", "--duration-secs", str(args.seconds), "--qos", "1"]
    before = bench.cpu_secs(gw.proc.pid)
    r = bench.fleet(gw.port, *sat, "--id-prefix", tag, pin=args.fleet_cpu)
    cpu = bench.cpu_secs(gw.proc.pid) - before
    return {"msgs per CPU-s": r["acked"] / max(cpu, 1e-9), "msgs/s": r["acked_per_sec"], "CPU s": cpu}


def drain(gw, kafka, tag, args):
    kafka.kill()
    per = args.drain_backlog // 100
    bench.fleet(gw.port, "--vehicles", "100", "--window", "16", "--messages", str(per),
                "--duration-secs", "600", "--id-prefix", f"{tag}b")
    durable = gw.metric("gateway_journal_durable_seq")
    kafka.start(wait=False)
    t0 = time.time()
    live = bench.fleet(gw.port, "--vehicles", "100", "--rate", "1000", "--qos", "1",
                       "--duration-secs", str(args.drain_seconds), "--id-prefix", f"{tag}l", background=True)
    drained = None
    while time.time() - t0 < args.drain_seconds + 600:
        if drained is None and gw.metric("gateway_journal_released_seq") >= durable:
            drained = time.time() - t0
        if drained is not None and live.poll() is not None:
            break
        time.sleep(0.05)
    out, _ = live.communicate()
    lat = json.loads(out.strip().splitlines()[-1])["puback_latency"]
    bench.wait_port(kafka.port)
    return {"PUBACK p50 ms": lat["p50_us"] / 1000, "p99 ms": lat["p99_us"] / 1000,
            "max ms": lat["max_us"] / 1000, "drain s": drained if drained is not None else float("nan")}


def delivery(gw, kafka, tag, case, args):
    pattern, qos = PUBSUB[case]
    r = bench.pubsub_run("gateway", gw.port, bench.pubsub_case(pattern, qos, args), tag,
                         {"broker": gw.proc.pid}, args)
    lat = r["latency"]
    return {"p50 ms": lat["p50_us"] / 1000, "p99 ms": lat["p99_us"] / 1000,
            "delivered/s": r["delivered_per_sec"], "CPU s": r["cpu_secs"].get("broker", 0)}


def main():
    ap = argparse.ArgumentParser()
    bench.ab_arguments(ap)
    ap.add_argument("--cases", default="ingest_cpu,fanout-q1", help=f"of {','.join(CASES)}")
    ap.add_argument("--seconds", type=int, default=15, help="ingest_cpu: fleet run duration")
    ap.add_argument("--fleet-cpu", type=int, default=1, help="ingest_cpu: the CPU the simulator is pinned to")
    ap.add_argument("--pubsub-clients", type=int, default=1000)
    ap.add_argument("--fanout-rate", type=float, default=50)
    ap.add_argument("--fanin-rate", type=float, default=10000)
    ap.add_argument("--pubsub-warmup", type=int, default=3)
    ap.add_argument("--pubsub-seconds", type=int, default=10)
    ap.add_argument("--drain-backlog", type=int, default=1000000, help="drain: records in the backlog")
    ap.add_argument("--drain-seconds", type=int, default=25, help="drain: how long the connected fleet publishes")
    args = ap.parse_args()
    cases = [c for c in args.cases.split(",") if c]
    bad = [c for c in cases if c not in CASES]
    if bad:
        ap.error(f"unknown case: {', '.join(bad)}")
    builds, work, certs = bench.ab_prepare(args, "ingest-ab-")
    kafka = bench.Kafka(work)
    rows = {}
    try:
        for run in range(args.runs):
            for case in cases:
                for name, binary in builds.items():
                    gw = bench.Gateway(work, kafka.bootstrap, certs, name=f"ab-{name}",
                                       pubsub=case not in ("ingest_cpu", "drain"), binary=binary)
                    tag = f"{name[0]}{case.replace('-', '')}r{run}"
                    try:
                        if case == "ingest_cpu":
                            r = ingest_cpu(gw, kafka, tag, args)
                        elif case == "drain":
                            r = drain(gw, kafka, tag, args)
                        else:
                            r = delivery(gw, kafka, tag, case, args)
                    finally:
                        gw.stop()
                    rows.setdefault((case, name), []).append(r)
                    print(f"run {run + 1} {case} {name}: " + ", ".join(f"{k} {v:,.3f}" for k, v in r.items()), flush=True)
    finally:
        kafka.kill()
    label = args.baseline or args.baseline_binary
    print(f"\nmedians (min-max), baseline {label} against the working tree:")
    for case in cases:
        for name in builds:
            rs = rows[(case, name)]
            parts = []
            for k in rs[0]:
                v = [r[k] for r in rs]
                parts.append(f"{k} {statistics.median(v):,.3f} ({min(v):,.3f}-{max(v):,.3f})")
            print(f"  {case:10} {name:8}: " + ", ".join(parts))


if __name__ == "__main__":
    main()
