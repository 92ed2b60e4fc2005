#!/usr/bin/env python3
"""Idle memory, the working tree's gateway against another revision's, in one run (A/B).

    python3 scripts/idle_ab.py --baseline <rev> [--runs 3] [--kinds plain,plain+sub]
                               [--connections 18000]
    python3 scripts/idle_ab.py --baseline-binary <path to a gateway> ...

Builds the release gateway of `--baseline` (bench.build_baseline: a worktree under
target/ with target/release hard-linked in; or takes `--baseline-binary`, e.g. a copy of
target/release/gateway saved before a change) and the working tree's, starts one Kafka,
then for each run and each kind measures the baseline and the working tree one after
the other, each on a fresh process, with bench.idle_case (idle vehicles connected at
4,000/s, server RSS growth over the connected count): the measure of
`bench.py --only idle`. Alternating the builds inside one run is the point: on a shared
2-core machine one build's figure moves by 0.2-0.5 KiB with the load (the connect burst
leaves more freed-but-kept heap when the gateway lags), the difference between two
builds measured side by side much less.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    bench.ab_arguments(ap)
    ap.add_argument("--kinds", default="plain,plain+sub", help=f"of {','.join(bench.IDLE_KINDS)}")
    ap.add_argument("--connections", type=int, default=18000)
    args = ap.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    bad = [k for k in kinds if k not in bench.IDLE_KINDS]
    if bad:
        ap.error(f"unknown kind: {', '.join(bad)}")
    builds, work, certs = bench.ab_prepare(args, "idle-ab-")
    builds = tuple(builds.items())
    ca = os.path.join(certs, "ca.pem")
    results = {}
    kafka = bench.Kafka(work)
    try:
        for run in range(args.runs):
            for kind in kinds:
                for name, binary in builds:
                    gw = bench.Gateway(work, kafka.bootstrap, certs, name=f"ab-{name}", binary=binary)
                    try:
                        time.sleep(2)
                        tls = kind.startswith("tls")
                        kib, _, connected = bench.idle_case(
                            gw.proc.pid, gw.tls_port if tls else gw.port, args.connections,
                            ca if tls else None, 8, subscribe=kind.endswith("+sub"))
                    finally:
                        gw.stop()
                        time.sleep(2)
                    if kafka.proc.poll() is not None:
                        # Without Kafka the presence events pile up in the producer: a
                        # different measurement (it happened once, the broker killed).
                        raise SystemExit(f"idle_ab: Kafka exited during {kind} / {name}; run again")
                    results.setdefault((kind, name), []).append(kib)
                    print(f"run {run + 1} {kind:10} {name:9} {kib:.3f} KiB ({connected} connected)", flush=True)
    finally:
        kafka.kill()
    label = args.baseline or args.baseline_binary
    print(f"\nKiB per idle connection ({args.connections}), baseline {label} against the working tree:")
    for kind in kinds:
        for name, _ in builds:
            rows = results[(kind, name)]
            runs = ", ".join(f"{v:.3f}" for v in rows)
            print(f"  {kind:10} {name:9} median {statistics.median(rows):.3f}  ({runs})")


if __name__ == "__main__":
    main()
