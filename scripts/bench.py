#!/usr/bin/env python3
"""Benchmark suite: the gateway against Mosquitto, same machine, same simulator, one run.

    python3 scripts/bench.py [--runs 3] [--connections 18000] [--replay 1000000]

Builds release binaries, provisions Apache Kafka (scripts/kafka.sh), installs Mosquitto
(Debian package) if missing, runs every case --runs times alternating the two brokers,
and writes docs/BENCHMARKS.md (medians, min-max, ratios) plus docs/bench-results.json.
"""
import argparse
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = os.path.join(ROOT, "target", "release")
FLEET = os.path.join(REL, "fleet")
GATEWAY = os.path.join(REL, "gateway")


def raise_fd_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def sh(cmd, **kw):
    print("+", " ".join(cmd) if isinstance(cmd, list) else cmd, flush=True)
    return subprocess.run(cmd, check=True, **kw)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(port, timeout=60):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"port {port} did not open")


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Kafka:
    def __init__(self, work):
        self.dir = os.path.join(work, "kafka")
        os.makedirs(self.dir, exist_ok=True)
        self.port, self.controller = free_port(), free_port()
        libs = os.path.join(ROOT, ".kafka", "libs")
        self.cp = f"{libs}/*"
        props = os.path.join(self.dir, "server.properties")
        with open(props, "w") as f:
            f.write(f"""process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{self.controller}
listeners=PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller}
advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs={self.dir}/data
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
num.partitions=4
""")
        uuid = subprocess.run(["java", "-cp", self.cp, "kafka.tools.StorageTool", "random-uuid"],
                              capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        subprocess.run(["java", "-cp", self.cp, "kafka.tools.StorageTool", "format", "-t", uuid, "-c", props],
                       check=True, capture_output=True)
        self.props = props
        self.proc = None
        self.start()

    def start(self, wait=True):
        log = open(os.path.join(self.dir, "broker.log"), "a")
        self.proc = subprocess.Popen(["java", "-Xms512m", "-Xmx1g", "-cp", self.cp, "kafka.Kafka", self.props],
                                     stdout=log, stderr=log)
        if wait:
            wait_port(self.port)
            time.sleep(2)

    def kill(self):
        if self.proc:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    @property
    def bootstrap(self):
        return f"127.0.0.1:{self.port}"


class Gateway:
    def __init__(self, work, kafka_bootstrap, certs, name="gw"):
        self.dir = os.path.join(work, name)
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir)
        self.port, self.tls_port, self.admin = free_port(), free_port(), free_port()
        cfg = os.path.join(self.dir, "gateway.toml")
        with open(cfg, "w") as f:
            f.write(f"""[mqtt]
listen = "127.0.0.1:{self.port}"
tls_listen = "127.0.0.1:{self.tls_port}"
max_connections = 19500
max_publish_rate = 0
[tls]
cert = "{certs}/server.pem"
key = "{certs}/server.key"
[journal]
dir = "{self.dir}/journal"
max_bytes = 4294967296
[kafka]
bootstrap = "{kafka_bootstrap}"
[[routes]]
mqtt = "vehicles/+/telemetry"
kafka_topic = "vehicles.telemetry"
[admin]
listen = "127.0.0.1:{self.admin}"
[auth]
allow_anonymous = true
publish_acl = ["vehicles/{{client_id}}/#"]
connect_rate_per_ip = 0
""")
        log = open(os.path.join(self.dir, "gateway.log"), "w")
        self.proc = subprocess.Popen([GATEWAY, "run", "--config", cfg], stdout=log, stderr=log,
                                     env={**os.environ, "RUST_LOG": "warn"})
        wait_port(self.port)
        wait_port(self.admin)

    def metric(self, name):
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/metrics", timeout=5).read().decode()
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return 0.0

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Mosquitto:
    def __init__(self, work, certs):
        self.dir = os.path.join(work, "mosquitto")
        os.makedirs(self.dir, exist_ok=True)
        self.port, self.tls_port = free_port(), free_port()
        cfg = os.path.join(self.dir, "mosquitto.conf")
        with open(cfg, "w") as f:
            # Default settings; only the listeners (plain and TLS) are configured.
            f.write(f"""user root
listener {self.port} 127.0.0.1
allow_anonymous true
listener {self.tls_port} 127.0.0.1
certfile {certs}/server.pem
keyfile {certs}/server.key
""")
        log = open(os.path.join(self.dir, "mosquitto.log"), "w")
        self.proc = subprocess.Popen(["/usr/sbin/mosquitto", "-c", cfg], stdout=log, stderr=log)
        wait_port(self.port)

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


def fleet(port, *args, tls_ca=None, background=False):
    cmd = [FLEET, "run", "--port", str(port), "--json", "--no-progress", *args]
    if tls_ca:
        cmd += ["--ca", tls_ca, "--server-name", "localhost"]
    print("+", " ".join(cmd), flush=True)
    if background:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def med(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None, None
    return statistics.median(values), min(values), max(values)


def fmt(v, unit="", digits=0):
    m, lo, hi = med(v)
    if m is None:
        return "n/a"
    f = f"{{:,.{digits}f}}"
    return f"{f.format(m)}{unit} ({f.format(lo)}–{f.format(hi)})"


def idle_case(server_pid, port, n, tls_ca, source_ips):
    """Connects n idle vehicles; returns (KiB per connection, connections/s, connected)."""
    time.sleep(1)
    before = rss_kib(server_pid)
    hold = 10
    p = fleet(port, "--vehicles", str(n), "--idle", "--connect-rate", "4000", "--keep-alive", "0",
              "--duration-secs", str(hold), "--source-ips", str(source_ips), tls_ca=tls_ca, background=True)
    ramp = n / 4000.0
    time.sleep(ramp + hold / 2)
    during = rss_kib(server_pid)
    out, _ = p.communicate()
    r = json.loads(out.strip().splitlines()[-1])
    c = max(r["connected"], 1)
    return (during - before) / c, r["connected"] / max(r["connect_secs"], 1e-9), r["connected"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--connections", type=int, default=18000)
    ap.add_argument("--replay", type=int, default=1_000_000)
    ap.add_argument("--seconds", type=int, default=15)
    args = ap.parse_args()
    raise_fd_limit()
    os.chdir(ROOT)
    if not os.path.exists("/usr/sbin/mosquitto"):
        sh(["apt-get", "install", "-y", "-qq", "mosquitto"])
    sh(["./scripts/kafka.sh"])
    sh(["cargo", "build", "--release", "-p", "gateway", "-p", "fleet"])
    sh(["cargo", "build", "--release", "-p", "bridge", "--example", "journal_bench"])
    work = tempfile.mkdtemp(prefix="bench-", dir=os.path.join(ROOT, "target"))
    certs = os.path.join(work, "certs")
    sh(["./certs/gen-dev-certs.sh", certs], stdout=subprocess.DEVNULL)
    ca = os.path.join(certs, "ca.pem")
    results = {"ingest": {}, "latency": {}, "idle": {}, "replay": {}, "journal": {}}

    kafka = Kafka(work)
    gw = Gateway(work, kafka.bootstrap, certs)
    mq = Mosquitto(work, certs)
    sat = ["--vehicles", "100", "--window", "16", "--duration-secs", str(args.seconds), "--qos", "1"]
    mod = ["--vehicles", "100", "--rate", "5000", "--duration-secs", str(args.seconds), "--qos", "1"]
    for run in range(args.runs):
        for name, port in (("gateway", gw.port), ("mosquitto", mq.port)):
            r = fleet(port, *sat, "--id-prefix", f"sat{run}")
            results["ingest"].setdefault(name, []).append(r["acked_per_sec"])
            r = fleet(port, *mod, "--id-prefix", f"mod{run}")
            results["latency"].setdefault(name, []).append(r["puback_latency"])
    print("ingest", results["ingest"], flush=True)

    gw.stop()
    mq.stop()

    # Idle connections: plain and TLS, each broker, RSS per connection, each on a fresh
    # process (memory freed by earlier cases would otherwise hide the cost).
    for run in range(args.runs):
        for name in ("gateway", "mosquitto"):
            for kind in ("plain", "tls"):
                srv = Gateway(work, kafka.bootstrap, certs, name="idle") if name == "gateway" else Mosquitto(work, certs)
                time.sleep(2)
                port = srv.tls_port if kind == "tls" else srv.port
                kib, rate, connected = idle_case(srv.proc.pid, port, args.connections, ca if kind == "tls" else None, 8)
                results["idle"].setdefault(f"{name}-{kind}", []).append(
                    {"kib_per_conn": kib, "connect_rate": rate, "connected": connected})
                srv.stop()
                time.sleep(2)
    print("idle", results["idle"], flush=True)

    # Replay: a backlog built while Kafka is down, drained when it returns.
    for run in range(args.runs):
        g = Gateway(work, kafka.bootstrap, certs, name=f"replay{run}")
        kafka.kill()
        per = args.replay // 100
        r = fleet(g.port, "--vehicles", "100", "--window", "16", "--messages", str(per),
                  "--duration-secs", "600", "--id-prefix", f"replay{run}")
        ingest = r["acked_per_sec"]
        durable = g.metric("gateway_journal_durable_seq")
        released0 = g.metric("gateway_journal_released_seq")
        kafka.start(wait=False)
        # The drain clock starts with the first confirmed record (Kafka's own start-up and
        # the producer's reconnect back-off are not the gateway's drain rate).
        t_start = time.time()
        t0 = r0 = None
        while time.time() - t_start < 900:
            released = g.metric("gateway_journal_released_seq")
            if t0 is None and released > released0:
                t0, r0 = time.time(), released
            if released >= durable:
                break
            time.sleep(0.02)
        t0, r0 = (t0, r0) if t0 is not None else (time.time(), durable)
        drain = (durable - r0) / (time.time() - t0)
        results["replay"].setdefault("gateway", []).append(
            {"backlog": durable - released0, "ingest_per_sec": ingest, "drain_per_sec": drain,
             "drain_secs": time.time() - t0, "reconnect_secs": t0 - t_start})
        wait_port(kafka.port)
        g.stop()
    print("replay", results["replay"], flush=True)
    kafka.kill()

    # Journal: group sizes against plain write + fdatasync on the same disk.
    jdir = os.path.join(work, "journal-bench")
    for run in range(args.runs):
        out = subprocess.run([os.path.join(REL, "examples", "journal_bench"), jdir, "3"],
                             check=True, capture_output=True, text=True).stdout
        for line in out.splitlines():
            row = json.loads(line)
            results["journal"].setdefault(f"{row['kind']}-{row['group']}", []).append(row)

    with open(os.path.join(ROOT, "docs", "bench-results.json"), "w") as f:
        json.dump(results, f, indent=1)
    write_markdown(results, args)
    shutil.rmtree(work, ignore_errors=True)


def machine():
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    rustc = subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.strip()
    mosq = subprocess.run(["/usr/sbin/mosquitto", "-h"], capture_output=True, text=True).stdout.splitlines()[0]
    disk = subprocess.run(["df", "-h", ROOT], capture_output=True, text=True).stdout.splitlines()[-1]
    return (f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, Linux {platform.release()}; "
            f"disk `{disk.split()[0]}`; {rustc}; {mosq}; Apache Kafka 4.4.0 (single-node KRaft, "
            f"Java {platform.python_version() and subprocess.run(['java', '-version'], capture_output=True, text=True).stderr.splitlines()[0]}); "
            f"librdkafka 2.12.1")


def write_markdown(res, args):
    L = []
    L.append("# Benchmarks\n")
    L.append("Generated by `python3 scripts/bench.py` (" + f"--runs {args.runs} --connections {args.connections} "
             f"--replay {args.replay} --seconds {args.seconds}" + f") on {time.strftime('%Y-%m-%d')}.\n")
    L.append(f"**Machine:** {machine()}. The simulator (`fleet`), the brokers and Kafka share the "
             "machine and its 2 cores; numbers are medians of the runs with (min–max). These machines "
             "are shared and noisy: compare ratios measured in the same run, not absolute numbers "
             "across runs.\n")
    L.append("**Brokers:** the gateway (release build; journal fsync'd before every PUBACK; bridge to a real "
             "Kafka with `acks=all`, idempotent) and Mosquitto 2.x from Debian with default settings "
             "(listeners only; it persists nothing and forwards nowhere).\n")
    L.append("## Durable QoS1 ingest at saturation\n")
    L.append(f"`fleet run --vehicles 100 --window 16 --duration-secs {args.seconds} --qos 1` "
             "(100 vehicles, 16 QoS1 publishes in flight each, PUBACKs counted).\n")
    g, m = res["ingest"].get("gateway", []), res["ingest"].get("mosquitto", [])
    L.append("| broker | PUBACK'd msgs/s |\n|---|---|")
    L.append(f"| gateway | {fmt(g)} |\n| mosquitto | {fmt(m)} |")
    if g and m:
        L.append(f"\n**Ratio gateway / mosquitto: {statistics.median(g) / statistics.median(m):.2f}×** "
                 "(target ≥ 1.0×).\n")
    L.append("## PUBACK latency at a fixed moderate rate\n")
    L.append(f"`fleet run --vehicles 100 --rate 5000 --duration-secs {args.seconds} --qos 1`.\n")
    L.append("| broker | p50 | p90 | p99 | p99.9 |\n|---|---|---|---|---|")
    for name in ("gateway", "mosquitto"):
        rows = res["latency"].get(name, [])
        cells = [fmt([r[k] / 1000 for r in rows], " ms", 3) for k in ("p50_us", "p90_us", "p99_us", "p999_us")]
        L.append(f"| {name} | " + " | ".join(cells) + " |")
    L.append("\nThe gateway's PUBACK waits for an `fdatasync` of the journal (group commit); Mosquitto "
             "acknowledges from memory.\n")
    L.append("## Idle connections\n")
    L.append(f"`fleet run --vehicles {args.connections} --idle --connect-rate 4000 --keep-alive 0 "
             "--source-ips 8` (TLS: `--ca`), server RSS (VmRSS) measured before connecting and while "
             "all are held.\n")
    L.append("| broker | transport | connected | RSS per connection | connections/s |\n|---|---|---|---|---|")
    for key in ("gateway-plain", "gateway-tls", "mosquitto-plain", "mosquitto-tls"):
        rows = res["idle"].get(key, [])
        name, kind = key.split("-")
        L.append(f"| {name} | {kind} | {fmt([r['connected'] for r in rows])} | "
                 f"{fmt([r['kib_per_conn'] for r in rows], ' KiB', 2)} | {fmt([r['connect_rate'] for r in rows])} |")
    gp = [r["kib_per_conn"] for r in res["idle"].get("gateway-plain", [])]
    gt = [r["kib_per_conn"] for r in res["idle"].get("gateway-tls", [])]
    if gp and gt:
        L.append(f"\nTargets: ≤ 2 KiB per plain connection (measured {statistics.median(gp):.2f}), ≤ 8 KiB per TLS "
                 f"connection (measured {statistics.median(gt):.2f}). A million TLS vehicles at this rate: "
                 f"{statistics.median(gt) * 1e6 / 2**20:.1f} GiB.\n")
    L.append("## Replay after an outage\n")
    L.append(f"Kafka stopped; `fleet run --vehicles 100 --messages {args.replay // 100}` builds a "
             f"{args.replay:,}-record backlog in the journal; Kafka started; drain rate measured from the first "
             "confirmed record until the release watermark reaches the durable one.\n")
    rows = res["replay"].get("gateway", [])
    L.append("| backlog | ingest msgs/s | drain records/s | drain / ingest |\n|---|---|---|---|")
    if rows:
        ratio = [r["drain_per_sec"] / r["ingest_per_sec"] for r in rows]
        L.append(f"| {fmt([r['backlog'] for r in rows])} | {fmt([r['ingest_per_sec'] for r in rows])} | "
                 f"{fmt([r['drain_per_sec'] for r in rows])} | {fmt(ratio, '×', 2)} |")
        L.append(f"\nTarget: drain ≥ 2× the sustained ingest rate (measured {statistics.median(ratio):.2f}×).\n")
    L.append("## Journal group commit\n")
    L.append("`cargo run --release -p bridge --example journal_bench -- <dir> 3`: `group` appends then wait "
             "for durability, against the same bytes written with `write` + `fdatasync` to a pre-allocated "
             "file on the same disk (the physical limit).\n")
    L.append("| group | journal records/s | journal p99 commit | raw records/s | raw p99 commit | journal / raw |\n"
             "|---|---|---|---|---|---|")
    for gsz in (1, 16, 256, 4096):
        j = res["journal"].get(f"journal-{gsz}", [])
        r = res["journal"].get(f"raw-{gsz}", [])
        if not j or not r:
            continue
        ratio = statistics.median([x["records_per_sec"] for x in j]) / statistics.median([x["records_per_sec"] for x in r])
        L.append(f"| {gsz} | {fmt([x['records_per_sec'] for x in j])} | {fmt([x['p99_commit_us'] for x in j], ' µs')} | "
                 f"{fmt([x['records_per_sec'] for x in r])} | {fmt([x['p99_commit_us'] for x in r], ' µs')} | {ratio:.2f} |")
    L.append("")
    path = os.path.join(ROOT, "docs", "BENCHMARKS.md")
    notes = os.path.join(ROOT, "docs", "BENCHMARKS.notes.md")
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")
        if os.path.exists(notes):
            f.write("\n" + open(notes).read())
    print("wrote", path)


if __name__ == "__main__":
    sys.exit(main())
