#!/usr/bin/env python3
"""Benchmark suite: the gateway against Mosquitto, same machine, same simulator, one run.

    python3 scripts/bench.py [--runs 3] [--connections 18000] [--replay 1000000]
    python3 scripts/bench.py --only pubsub                  # delivery: fan-out and fan-in
    python3 scripts/bench.py --only pubsub --brokers mosquitto
    python3 scripts/bench.py --only commands                # command latency to online vehicles
    python3 scripts/bench.py --only commands --command-paths mqtt,kafka   # without REST
    python3 scripts/bench.py --only overhead --baseline d302a4d  # metrics/tracing cost on ingest
    python3 scripts/bench.py --only ingest_cpu              # ingest per CPU-second, simulator pinned

Builds release binaries, provisions Apache Kafka (scripts/kafka.sh), installs Mosquitto
(Debian package) if missing, runs every case --runs times alternating the two brokers,
and writes docs/BENCHMARKS.md (medians, min-max, ratios) plus docs/bench-results.json.
With --only, the scenarios not run keep their results from docs/bench-results.json.
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
SCENARIOS = ("ingest", "ingest_cpu", "idle", "storm", "replay", "journal", "pubsub", "commands", "overhead")
# Run by default (`overhead` builds another revision: only when asked for).
DEFAULT_SCENARIOS = SCENARIOS[:-1]
# Delivery cases: (pattern, QoS); publish QoS = subscribe QoS.
PUBSUB_CASES = (("fanout", 0), ("fanout", 1), ("fanin", 0), ("fanin", 1))
PENDING = "not measured in this run"
# Command paths, and the brokers each one applies to (REST and Kafka are the gateway's own).
COMMAND_PATHS = ("mqtt", "rest", "kafka")
# The operator that issues MQTT commands to the gateway: a password user with its own
# publish ACL (vehicles keep the default ACLs). Mosquitto (no ACLs) takes it anonymously.
OPERATOR_USER, OPERATOR_PASSWORD = "operator", "bench-operator"


def raise_fd_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def sh(cmd, **kw):
    print("+", " ".join(cmd) if isinstance(cmd, list) else cmd, flush=True)
    return subprocess.run(cmd, check=True, **kw)


def free_ports(n):
    """n distinct free loopback ports: all bound at once, then released (one at a time,
    the kernel can hand the same just-released port out twice)."""
    held = []
    try:
        for _ in range(n):
            s = socket.socket()
            held.append(s)
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


def wait_port(port, timeout=60):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"port {port} did not open")


def cpu_secs(pid):
    """utime + stime of a process so far (/proc/<pid>/stat), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
        self.port, self.controller = free_ports(2)
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

    def create_topic(self, name, partitions=4):
        """Creates a topic (before a gateway that consumes it starts: a consumer started
        before its topic exists may not see it for minutes)."""
        sh(["java", "-cp", self.cp, "org.apache.kafka.tools.TopicCommand", "--bootstrap-server", self.bootstrap,
            "--create", "--if-not-exists", "--topic", name, "--partitions", str(partitions),
            "--replication-factor", "1"], stdout=subprocess.DEVNULL)

    def kill(self):
        if self.proc:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    @property
    def bootstrap(self):
        return f"127.0.0.1:{self.port}"


class Gateway:
    def __init__(self, work, kafka_bootstrap, certs, name="gw", pubsub=False, operator_hash=None, binary=None):
        self.dir = os.path.join(work, name)
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir)
        self.port, self.tls_port, self.admin = free_ports(3)
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
connect_rate_per_ip = 0
""")
            # Delivery benchmarks publish and subscribe anywhere; ingest keeps the vehicle ACL.
            if pubsub:
                f.write('publish_acl = ["#"]\nsubscribe_acl = ["#"]\n')
            else:
                f.write('publish_acl = ["vehicles/{client_id}/#"]\n')
            # Commands: an operator user may publish to every vehicle's command topic.
            if operator_hash:
                f.write(f"""[[auth.users]]
username = "{OPERATOR_USER}"
password_hash = "{operator_hash}"
client_ids = ["op-*"]
publish_acl = ["vehicles/+/commands"]
""")
        log = open(os.path.join(self.dir, "gateway.log"), "w")
        self.proc = subprocess.Popen([binary or GATEWAY, "run", "--config", cfg], stdout=log, stderr=log,
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
        self.port, self.tls_port = free_ports(2)
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


def fleet(port, *args, tls_ca=None, background=False, pin=None, nice=0):
    cmd = [FLEET, "run", "--port", str(port), "--json", "--no-progress", *args]
    if pin is not None:
        cmd = ["taskset", "-c", str(pin), *cmd]
    if nice:
        cmd = ["nice", "-n", str(nice), *cmd]
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


def pubsub_case(pattern, qos, args):
    """The fleet arguments of one delivery case (without port, id prefix and CPU pids)."""
    many = "--subscribers" if pattern == "fanout" else "--publishers"
    rate = args.fanout_rate if pattern == "fanout" else args.fanin_rate
    return [pattern, many, str(args.pubsub_clients), "--rate", f"{rate:g}", "--qos", str(qos),
            "--warmup-secs", str(args.pubsub_warmup), "--duration-secs", str(args.pubsub_seconds)]


def pubsub_run(name, port, case, prefix, cpu_pids, args, pin=None):
    """Runs one delivery case (the simulator pinned to CPU `pin` if given); a run that
    delivers nothing (or fails) stops the suite."""
    cmd = [FLEET, *case, "--port", str(port), "--id-prefix", prefix, "--json",
           *[f"--cpu-pid={n}={pid}" for n, pid in cpu_pids.items()]]
    if pin is not None:
        cmd = ["taskset", "-c", str(pin), *cmd]
    print("+", " ".join(cmd), flush=True)
    # fleet bounds every wait itself; this is the backstop against a wedged simulator.
    limit = args.pubsub_warmup + args.pubsub_seconds + 180
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"bench: {' '.join(case)} against {name}: no result after {limit} s")
    lines = p.stdout.strip().splitlines()
    report = json.loads(lines[-1]) if lines else {}
    if p.returncode != 0:
        why = report.get("failure") or p.stderr.strip()[-2000:] or f"exit status {p.returncode}"
        raise SystemExit(f"bench: {' '.join(case)} against {name} FAILED: {why}")
    return report


def idle_case(server_pid, port, n, tls_ca, source_ips, subscribe=False):
    """Connects n idle vehicles (each holding one subscription to its command topic when
    `subscribe`); returns (KiB per connection, connections/s, connected)."""
    time.sleep(1)
    before = rss_kib(server_pid)
    hold = 10
    extra = ["--subscribe-commands"] if subscribe else []
    p = fleet(port, "--vehicles", str(n), "--idle", *extra, "--connect-rate", "4000", "--keep-alive", "0",
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
    ap.add_argument("--only", default=",".join(DEFAULT_SCENARIOS),
                    help=f"comma-separated scenarios to run, of {','.join(SCENARIOS)}")
    ap.add_argument("--brokers", default="gateway,mosquitto",
                    help="brokers for the pubsub scenario (the others always run both)")
    ap.add_argument("--pubsub-clients", type=int, default=1000,
                    help="subscribers (fan-out) and publishers (fan-in)")
    ap.add_argument("--fanout-rate", type=float, default=50, help="fan-out publishes/s (× subscribers delivered)")
    ap.add_argument("--fanin-rate", type=float, default=10000, help="fan-in publishes/s over all publishers")
    ap.add_argument("--pubsub-pinned", type=int, default=1,
                    help="pubsub: also run every case with the broker on CPU 0 and the simulator on CPU 1 (0: not)")
    ap.add_argument("--pubsub-warmup", type=int, default=3)
    ap.add_argument("--pubsub-seconds", type=int, default=10)
    ap.add_argument("--command-vehicles", type=int, default=10000, help="connected vehicles (commands scenario)")
    ap.add_argument("--command-rates", default="1000,10000", help="comma-separated commands/s")
    ap.add_argument("--command-paths", default=",".join(COMMAND_PATHS),
                    help=f"comma-separated command paths, of {','.join(COMMAND_PATHS)} (leave out rest "
                         "while the gateway has no REST command route)")
    ap.add_argument("--command-issuers", type=int, default=8,
                    help="MQTT operator connections / REST connections / Kafka issuing tasks")
    ap.add_argument("--command-kafka-linger-ms", type=int, default=5,
                    help="linger.ms of the Kafka issuer's producer (5: librdkafka's and the Java client's "
                         "default; 0 sends a produce request per command, which saturates the broker's JVM "
                         "on 2 cores)")
    ap.add_argument("--command-warmup", type=int, default=3)
    ap.add_argument("--command-seconds", type=int, default=10)
    ap.add_argument("--storm-fleet-rate", type=int, default=1000,
                    help="storm: msgs/s of the 100 connected vehicles whose PUBACK latency is watched")
    ap.add_argument("--storm-nice", type=int, default=0,
                    help="storm: run the storm's simulator under `nice -n N` (its vehicles are remote devices "
                         "in production, not competitors for the broker's cores); rows are keyed `+nice`")
    ap.add_argument("--fleet-cpu", type=int, default=1,
                    help="ingest_cpu: the core the simulator is pinned to (taskset -c)")
    ap.add_argument("--baseline", default="d302a4d",
                    help="overhead: the revision to compare the working tree's gateway with")
    args = ap.parse_args()
    only = [x for x in args.only.split(",") if x]
    brokers = [x for x in args.brokers.split(",") if x]
    paths = [x for x in args.command_paths.split(",") if x]
    bad = ([x for x in only if x not in SCENARIOS] + [x for x in brokers if x not in ("gateway", "mosquitto")]
           + [x for x in paths if x not in COMMAND_PATHS])
    if bad:
        ap.error(f"unknown scenario or broker: {', '.join(bad)}")
    raise_fd_limit()
    os.chdir(ROOT)
    if not os.path.exists("/usr/sbin/mosquitto"):
        sh(["apt-get", "install", "-y", "-qq", "mosquitto"])
    need_kafka = (any(x in only for x in ("ingest", "ingest_cpu", "idle", "storm", "replay", "overhead"))
                  or (any(x in only for x in ("pubsub", "commands")) and "gateway" in brokers))
    if need_kafka:
        sh(["./scripts/kafka.sh"])
    sh(["cargo", "build", "--release", "-p", "gateway", "-p", "fleet"])
    if "journal" in only:
        sh(["cargo", "build", "--release", "-p", "bridge", "--example", "journal_bench"])
    work = tempfile.mkdtemp(prefix="bench-", dir=os.path.join(ROOT, "target"))
    certs = os.path.join(work, "certs")
    sh(["./certs/gen-dev-certs.sh", certs], stdout=subprocess.DEVNULL)
    ca = os.path.join(certs, "ca.pem")
    # Scenarios not run this time keep their earlier results.
    path = os.path.join(ROOT, "docs", "bench-results.json")
    results = json.load(open(path)) if os.path.exists(path) else {}
    results.setdefault("meta", {})
    fresh = {"ingest": ("ingest", "latency"), "ingest_cpu": ("ingest_cpu",), "idle": ("idle",), "storm": ("storm",),
             "replay": ("replay",),
             "journal": ("journal",), "pubsub": ("pubsub",), "commands": ("commands",),
             "overhead": ("overhead",)}
    for scenario in only:
        for key in fresh[scenario]:
            if key == "storm":
                # A storm run replaces only its own mode's rows (with or without --storm-nice).
                nice = bool(args.storm_nice)
                results[key] = {k: v for k, v in results.get(key, {}).items() if k.endswith("+nice") != nice}
            else:
                results[key] = {}
        results["meta"][scenario] = {"date": time.strftime("%Y-%m-%d"), "args": vars(args)}

    kafka = Kafka(work) if need_kafka else None
    try:
        # Delivery first: short, and it stops the suite at once if a broker delivers nothing.
        if "pubsub" in only:
            pubsub_phase(work, kafka, certs, brokers, results, args)
        if "commands" in only:
            commands_phase(work, kafka, certs, brokers, paths, results, args)
        if "ingest" in only:
            ingest_phase(work, kafka, certs, results, args)
        if "ingest_cpu" in only:
            ingest_cpu_phase(work, kafka, certs, results, args)
        if "idle" in only:
            idle_phase(work, kafka, certs, ca, results, args)
        if "storm" in only:
            storm_phase(work, kafka, certs, ca, results, args)
        if "replay" in only:
            replay_phase(work, kafka, certs, results, args)
        if "overhead" in only:
            overhead_phase(work, kafka, certs, results, args)
    finally:
        if kafka:
            kafka.kill()
    if "journal" in only:
        journal_phase(work, results, args)

    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    write_markdown(results, args)
    shutil.rmtree(work, ignore_errors=True)


def pubsub_phase(work, kafka, certs, brokers, results, args):
    """Delivery: fan-out and fan-in at QoS 0 and 1, the brokers alternating per case; then
    (unless --pubsub-pinned 0) again with each broker's threads on CPU 0 and the simulator
    on CPU 1 (results keyed `<case>+pinned`)."""
    pubsub_pass(work, kafka, certs, brokers, results, args, pinned=False)
    if args.pubsub_pinned:
        pubsub_pass(work, kafka, certs, brokers, results, args, pinned=True)


def pubsub_pass(work, kafka, certs, brokers, results, args, pinned):
    """One pass of the delivery cases on fresh brokers, pinned or not."""
    servers = {}
    tag = "+pinned" if pinned else ""
    if "gateway" in brokers:
        servers["gateway"] = Gateway(work, kafka.bootstrap, certs, name="pubsub" + tag, pubsub=True)
    if "mosquitto" in brokers:
        servers["mosquitto"] = Mosquitto(work, certs)
    if pinned:
        # Every thread of the broker on CPU 0 (the gateway's runtime workers, journal
        # writer and librdkafka threads alike); the Kafka JVM stays free.
        for srv in servers.values():
            sh(["taskset", "-a", "-p", "-c", "0", str(srv.proc.pid)], stdout=subprocess.DEVNULL)
    try:
        for run in range(args.runs):
            for pattern, qos in PUBSUB_CASES:
                case = pubsub_case(pattern, qos, args)
                for name, srv in servers.items():
                    cpu = {"broker": srv.proc.pid}
                    if name == "gateway":
                        cpu["kafka"] = kafka.proc.pid
                    r = pubsub_run(name, srv.port, case, f"{pattern}{qos}r{run}{'p' if pinned else ''}", cpu, args,
                                   pin=1 if pinned else None)
                    results["pubsub"].setdefault(f"{pattern}-q{qos}{tag}", {}).setdefault(name, []).append(r)
                    print(f"{pattern}{tag} QoS {qos} {name}: {r['delivered_per_sec']:,.0f} delivered/s, "
                          f"p50 {r['latency']['p50_us']} µs, p99 {r['latency']['p99_us']} µs, "
                          f"broker CPU {r['cpu_secs'].get('broker', 0):.2f} s", flush=True)
    finally:
        for srv in servers.values():
            srv.stop()


def command_case(path, rate, args):
    """The fleet arguments of one command case (without port, path addresses, prefixes, CPU pids)."""
    return ["commands", "--via", path, "--vehicles", str(args.command_vehicles), "--rate", f"{rate:g}",
            "--qos", "1", "--issuers", str(args.command_issuers), "--warmup-secs", str(args.command_warmup),
            "--duration-secs", str(args.command_seconds)]


def command_run(name, case, extra, cpu_pids, args):
    """Runs one command case. Returns the report, or None when the path is not available
    on this gateway (the REST command route answered 404); any other failure stops the suite."""
    cmd = [FLEET, *case, *extra, "--json", *[f"--cpu-pid={n}={pid}" for n, pid in cpu_pids.items()]]
    print("+", " ".join(cmd), flush=True)
    # fleet bounds every wait itself (connects, drain); this is the backstop.
    limit = args.command_vehicles / 2000 + args.command_warmup + args.command_seconds + 240
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"bench: {' '.join(case)} against {name}: no result after {limit:.0f} s")
    lines = p.stdout.strip().splitlines()
    report = json.loads(lines[-1]) if lines else {}
    if p.returncode == 3 and report.get("unavailable"):
        return None
    if p.returncode != 0:
        why = report.get("failure") or p.stderr.strip()[-2000:] or f"exit status {p.returncode}"
        raise SystemExit(f"bench: {' '.join(case)} against {name} FAILED: {why}")
    return report


def commands_phase(work, kafka, certs, brokers, paths, results, args):
    """Command latency to online vehicles: per rate and path, the brokers alternating
    (Mosquitto only for the MQTT path)."""
    rates = [float(x) for x in args.command_rates.split(",") if x]
    servers = {}
    if "gateway" in brokers:
        kafka.create_topic("vehicles.commands")
        kafka.create_topic("vehicles.command-outcomes")
        pw_hash = subprocess.run([GATEWAY, "hash-password"], input=OPERATOR_PASSWORD, capture_output=True,
                                 text=True, check=True).stdout.strip()
        servers["gateway"] = Gateway(work, kafka.bootstrap, certs, name="commands", operator_hash=pw_hash)
        # Commands issued before the consumer holds its partitions pile up while it joins
        # its group (seconds) and the Kafka path measures that backlog, not the gateway.
        deadline = time.time() + 60
        while servers["gateway"].metric("gateway_commands_partitions_assigned") < 1:
            if time.time() > deadline:
                raise SystemExit("bench: the gateway's command consumer got no partition in 60 s")
            time.sleep(0.2)
    if "mosquitto" in brokers:
        servers["mosquitto"] = Mosquitto(work, certs)
    res = results["commands"]
    res["unavailable"] = {}
    try:
        for run in range(args.runs):
            for rate in rates:
                for path in paths:
                    case = command_case(path, rate, args)
                    for name, srv in servers.items():
                        if path != "mqtt" and name != "gateway":
                            continue
                        if path in res["unavailable"]:
                            continue
                        tag = f"{path}{rate:g}r{run}"
                        extra = ["--port", str(srv.port), "--id-prefix", f"v{tag}"]
                        cpu = {"broker": srv.proc.pid}
                        if name == "gateway":
                            cpu["kafka"] = kafka.proc.pid
                            # Afterwards: the gateway's outcome record for every command.
                            extra += ["--kafka-bootstrap", kafka.bootstrap,
                                      "--outcomes-topic", "vehicles.command-outcomes"]
                        if path == "mqtt" and name == "gateway":
                            extra += ["--operator-username", OPERATOR_USER, "--operator-password", OPERATOR_PASSWORD,
                                      "--operator-prefix", f"op-{tag}"]
                        elif path == "mqtt":
                            extra += ["--operator-prefix", f"op-{tag}"]
                        elif path == "rest":
                            extra += ["--admin", f"127.0.0.1:{srv.admin}"]
                        else:
                            extra += ["--kafka-topic", "vehicles.commands",
                                      "--kafka-linger-ms", str(args.command_kafka_linger_ms)]
                        r = command_run(name, case, extra, cpu, args)
                        if r is None:
                            res["unavailable"][path] = "the gateway's REST command route answered 404"
                            print(f"bench: commands via {path}: not available on this gateway (404); "
                                  "skipping this path", flush=True)
                            continue
                        res.setdefault(f"{path}-{rate:g}", {}).setdefault(name, []).append(r)
                        rl, al = r["received_latency"], r["acked_latency"]
                        print(f"commands via {path} at {rate:g}/s {name}: {r['issued_per_sec']:,.0f} issued/s, "
                              f"complete {r['completeness']:.4f}, received p50 {rl['p50_us']} µs "
                              f"p99 {rl['p99_us']} µs p99.9 {rl['p999_us']} µs, acked p99 {al['p99_us']} µs, "
                              f"broker CPU {r['cpu_secs'].get('broker', 0):.2f} s, outcomes {r.get('outcomes')} "
                              f"of {r.get('outcomes_expected')}", flush=True)
    finally:
        for srv in servers.values():
            srv.stop()


def ingest_phase(work, kafka, certs, results, args):
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


def ingest_cpu_phase(work, kafka, certs, results, args):
    """Durable QoS 1 ingest per CPU-second: the simulator pinned to one core with taskset
    (so neither broker wins by getting the simulator's CPU), the broker unpinned; the
    broker's (and for the gateway, Kafka's) utime + stime over the whole fleet run."""
    gw = Gateway(work, kafka.bootstrap, certs, name="ingest-cpu")
    mq = Mosquitto(work, certs)
    sat = ["--vehicles", "100", "--window", "16", "--duration-secs", str(args.seconds), "--qos", "1"]
    res = results["ingest_cpu"]
    try:
        for run in range(args.runs):
            for name, srv in (("gateway", gw), ("mosquitto", mq)):
                pids = {"broker": srv.proc.pid}
                if name == "gateway":
                    pids["kafka"] = kafka.proc.pid
                before = {k: cpu_secs(p) for k, p in pids.items()}
                r = fleet(srv.port, *sat, "--id-prefix", f"cpu{run}", pin=args.fleet_cpu)
                used = {k: round(cpu_secs(p) - before[k], 2) for k, p in pids.items()}
                row = {"acked": r["acked"], "acked_per_sec": r["acked_per_sec"], "cpu": used}
                res.setdefault(name, []).append(row)
                print(f"ingest_cpu {name}: {row}", flush=True)
    finally:
        gw.stop()
        mq.stop()


def ingest_cpu_markdown(L, res, arg):
    L.append("## Durable QoS1 ingest per CPU-second (simulator pinned)\n")
    if not res.get("gateway") or not res.get("mosquitto"):
        L.append("Not measured yet: `python3 scripts/bench.py --only ingest_cpu`.\n")
        return
    L.append(f"`taskset -c {arg('fleet_cpu')} fleet run --vehicles 100 --window 16 --duration-secs "
             f"{arg('seconds')} --qos 1`, the brokers alternating: the simulator pinned to CPU "
             f"{arg('fleet_cpu')}, the broker free to use both cores. **CPU s**: the broker process's utime + "
             "stime over the whole fleet run (connects included), from `/proc/<pid>/stat`; for the gateway, "
             "the Kafka broker's JVM apart. The gateway fsyncs its journal before every PUBACK and forwards "
             "every message to the real Kafka (`acks=all`); Mosquitto acknowledges from memory and forwards "
             "nowhere.\n")
    L.append("| broker | PUBACK'd msgs/s | PUBACK'd | broker CPU s | msgs per broker CPU-s | Kafka CPU s |")
    L.append("|---|---|---|---|---|---|")
    per = {}
    for name in ("gateway", "mosquitto"):
        rows = res[name]
        per[name] = [r["acked"] / max(r["cpu"]["broker"], 1e-9) for r in rows]
        kafka_cpu = fmt([r["cpu"]["kafka"] for r in rows], "", 2) if name == "gateway" else "—"
        L.append(f"| {name} | {fmt([r['acked_per_sec'] for r in rows])} | {fmt([r['acked'] for r in rows])} | "
                 f"{fmt([r['cpu']['broker'] for r in rows], '', 2)} | {fmt(per[name])} | {kafka_cpu} |")
    ratio = statistics.median(per["gateway"]) / statistics.median(per["mosquitto"])
    verdict = "met" if ratio >= 2.0 else "not met"
    L.append(f"\n**Gateway / Mosquitto msgs per broker CPU-second: {ratio:.2f}×** (target ≥ 2.0×: {verdict}; "
             "Kafka's CPU not counted, listed apart).\n")


def build_baseline(rev):
    """The release gateway of `rev`, built in a worktree under target/ (target/release is
    hard-linked in first, so only what changed since is compiled)."""
    tree = os.path.join(ROOT, "target", "overhead-base")
    out = os.path.join(ROOT, "target", "overhead-base-target")
    sh(["git", "worktree", "remove", "--force", tree], stderr=subprocess.DEVNULL) if os.path.exists(tree) else None
    sh(["git", "worktree", "prune"])
    sh(["git", "worktree", "add", "--detach", tree, rev])
    if not os.path.exists(os.path.join(out, "release")):
        os.makedirs(out, exist_ok=True)
        sh(["cp", "-al", REL, os.path.join(out, "release")])
    sh(["cargo", "build", "--release", "-p", "gateway", "--target-dir", out], cwd=tree)
    return os.path.join(out, "release", "gateway")


def ab_arguments(ap):
    """The arguments every A/B script takes: what to compare the working tree with, runs."""
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--baseline", help="revision to compare the working tree with")
    which.add_argument("--baseline-binary", help="a gateway binary to compare the working tree with")
    ap.add_argument("--runs", type=int, default=3)


def ab_prepare(args, prefix):
    """Set-up shared by the A/B scripts (scripts/*_ab.py, scripts/ab.py): Kafka's jars,
    both release builds, a work directory with dev certificates. Returns
    (builds {"baseline", "current"}, work directory, certificate directory)."""
    raise_fd_limit()
    os.chdir(ROOT)
    sh(["./scripts/kafka.sh"])
    base = os.path.abspath(args.baseline_binary) if args.baseline_binary else build_baseline(args.baseline)
    sh(["cargo", "build", "--release", "-p", "gateway", "-p", "fleet"])
    work = tempfile.mkdtemp(prefix=prefix, dir=os.path.join(ROOT, "target"))
    certs = os.path.join(work, "certs")
    sh(["./certs/gen-dev-certs.sh", certs], stdout=subprocess.DEVNULL)
    return {"baseline": base, "current": GATEWAY}, work, certs


def overhead_phase(work, kafka, certs, results, args):
    """What metrics and tracing cost the ingest path: the working tree's gateway against
    `--baseline` (a revision before them), same Kafka, runs interleaved."""
    base = build_baseline(args.baseline)
    sat = ["--vehicles", "100", "--window", "16", "--duration-secs", str(args.seconds), "--qos", "1"]
    mod = ["--vehicles", "100", "--rate", "5000", "--duration-secs", str(args.seconds), "--qos", "1"]
    res = results["overhead"] = {"revision": args.baseline, "builds": {}}
    for run in range(args.runs):
        for name, binary in (("baseline", base), ("current", GATEWAY)):
            gw = Gateway(work, kafka.bootstrap, certs, name=f"ovh-{name}", binary=binary)
            rows = res["builds"].setdefault(name, {"ingest": [], "latency": []})
            try:
                rows["ingest"].append(fleet(gw.port, *sat, "--id-prefix", f"o{run}")["acked_per_sec"])
                rows["latency"].append(fleet(gw.port, *mod, "--id-prefix", f"p{run}")["puback_latency"])
            finally:
                gw.stop()
    print("overhead", res, flush=True)


def overhead_markdown(L, res, arg):
    builds = res.get("builds", {})
    if not builds.get("current") or not builds.get("baseline"):
        return
    L.append("## What metrics and tracing cost the ingest path\n")
    L.append(f"`python3 scripts/bench.py --only overhead --baseline {res['revision']} --runs {arg('runs')} "
             f"--seconds {arg('seconds')}`: the gateway at `{res['revision']}` (hand-written counters, no "
             "histograms, no connection span) against the working tree (the `prometheus` crate, the PUBACK, "
             "journal commit, Kafka delivery and record age histograms, the `conn` span), each on a fresh "
             "journal against the same Kafka, runs interleaved. Saturation: `fleet run --vehicles 100 "
             "--window 16 --qos 1`; latency: `--rate 5000`.\n")
    L.append("| build | PUBACK'd msgs/s | PUBACK p50 | PUBACK p99 |\n|---|---|---|---|")
    for name in ("baseline", "current"):
        rows = builds[name]
        lat = rows["latency"]
        L.append(f"| {name} | {fmt(rows['ingest'])} | {fmt([r['p50_us'] / 1000 for r in lat], ' ms', 3)} | "
                 f"{fmt([r['p99_us'] / 1000 for r in lat], ' ms', 3)} |")
    b, c = statistics.median(builds["baseline"]["ingest"]), statistics.median(builds["current"]["ingest"])
    cost = (b - c) / b * 100
    L.append(f"\n**Throughput cost of metrics and tracing: {cost:+.1f}%** of the baseline's median "
             "(target < 5%; negative: the current build was faster in this run, i.e. the difference is "
             "within the noise).\n")


# `+sub`: each vehicle also holds one subscription (`vehicles/<id>/commands/#`), which is
# how a connected vehicle idles in production (it waits for its commands).
IDLE_KINDS = ("plain", "tls", "plain+sub", "tls+sub")


def idle_phase(work, kafka, certs, ca, results, args):
    # Idle connections: plain and TLS, each broker, RSS per connection, each on a fresh
    # process (memory freed by earlier cases would otherwise hide the cost).
    for run in range(args.runs):
        for name in ("gateway", "mosquitto"):
            for kind in IDLE_KINDS:
                srv = Gateway(work, kafka.bootstrap, certs, name="idle") if name == "gateway" else Mosquitto(work, certs)
                time.sleep(2)
                tls = kind.startswith("tls")
                port = srv.tls_port if tls else srv.port
                kib, rate, connected = idle_case(srv.proc.pid, port, args.connections, ca if tls else None, 8,
                                                 subscribe=kind.endswith("+sub"))
                results["idle"].setdefault(f"{name}-{kind}", []).append(
                    {"kib_per_conn": kib, "connect_rate": rate, "connected": connected})
                srv.stop()
                time.sleep(2)
    print("idle", results["idle"], flush=True)


# Reconnect storm: what the storm's vehicles connect over.
STORM_KINDS = ("plain", "tls")
# Vehicles of the connected fleet whose PUBACK latency is watched through the storm.
STORM_FLEET = 100


def storm_case(srv, name, kind, run, ca, args):
    """One reconnect storm: N idle vehicles connected, then all cut off at once (their
    simulator SIGKILLed: every socket reset) and reconnected at once with the same client
    ids, while a connected fleet publishes QoS 1 and times its PUBACKs."""
    n = args.connections
    tls = kind == "tls"
    port = srv.tls_port if tls else srv.port
    prefix = f"storm{run}{kind}"
    first = fleet(port, "--vehicles", str(n), "--idle", "--connect-rate", "4000", "--keep-alive", "0",
                  "--duration-secs", "600", "--source-ips", "8", "--id-prefix", prefix,
                  tls_ca=ca if tls else None, background=True, nice=args.storm_nice)
    # Until all are connected, or (gateway) no more connect for 10 s: the storm then cuts
    # what did connect, and the row says how many that were.
    before = 0
    if name == "gateway":
        last, since = -1.0, time.time()
        while (now := srv.metric("gateway_connections_active")) < n:
            if now != last:
                last, since = now, time.time()
            elif time.time() - since > 10:
                break
            time.sleep(0.5)
        before = int(srv.metric("gateway_connections_active"))
    else:
        time.sleep(n / 2000 + 5)
    # Let the connect burst settle (the gateway forwards 18,000 presence events to Kafka).
    time.sleep(5)
    # The connected fleet: a quiet baseline first, then the same through the storm.
    watch = ["--vehicles", str(STORM_FLEET), "--rate", str(args.storm_fleet_rate), "--qos", "1", "--window", "16",
             "--connect-rate", "1000", "--keep-alive", "60"]
    quiet = fleet(srv.port, *watch, "--duration-secs", "5", "--id-prefix", f"{prefix}q")
    secs = 12 if not tls else 30
    during = fleet(srv.port, *watch, "--duration-secs", str(secs), "--id-prefix", f"{prefix}w", background=True)
    time.sleep(1.5)
    first.kill()
    first.wait()
    # All at once: the simulator starts every vehicle without pacing.
    storm = fleet(port, "--vehicles", str(n), "--idle", "--connect-rate", "1000000", "--keep-alive", "0",
                  "--duration-secs", str(secs + 5), "--source-ips", "8", "--id-prefix", prefix,
                  tls_ca=ca if tls else None, background=True, nice=args.storm_nice)
    out, _ = during.communicate()
    fleet_during = json.loads(out.strip().splitlines()[-1])
    out, _ = storm.communicate()
    stormed = json.loads(out.strip().splitlines()[-1])
    row = {"connected_before": before, "reconnected": stormed["connected"], "errors": stormed["errors"],
           "storm_secs": stormed["connect_secs"],
           "fleet_quiet": quiet["puback_latency"], "fleet_during": fleet_during["puback_latency"],
           "fleet_refused": fleet_during["refused"], "fleet_errors": fleet_during["errors"],
           "fleet_acked": fleet_during["acked"], "fleet_sent": fleet_during["sent"]}
    print(f"storm {kind} {name}: reconnected {row['reconnected']} of {n} in {row['storm_secs']:.2f} s, "
          f"errors {row['errors']}; fleet PUBACK p99 quiet {quiet['puback_latency']['p99_us']} µs, "
          f"during {fleet_during['puback_latency']['p99_us']} µs (max {fleet_during['puback_latency']['max_us']} µs), "
          f"fleet errors {fleet_during['errors']}", flush=True)
    return row


def storm_phase(work, kafka, certs, ca, results, args):
    for run in range(args.runs):
        for name in ("gateway", "mosquitto"):
            for kind in STORM_KINDS:
                srv = Gateway(work, kafka.bootstrap, certs, name="storm") if name == "gateway" else Mosquitto(work, certs)
                time.sleep(2)
                try:
                    row = storm_case(srv, name, kind, run, ca, args)
                finally:
                    srv.stop()
                mode = "+nice" if args.storm_nice else ""
                results["storm"].setdefault(f"{name}-{kind}{mode}", []).append(row)
                time.sleep(2)
    print("storm", results["storm"], flush=True)


def storm_markdown(L, res, arg):
    L.append("## Reconnect storm\n")
    if not res:
        L.append("Not measured yet: `python3 scripts/bench.py --only storm`.\n")
        return
    n, rate = arg("connections"), arg("storm_fleet_rate")
    L.append(f"{n:,} idle vehicles connect (`fleet run --idle --connect-rate 4000 --source-ips 8`, plain or "
             f"TLS), then their simulator is SIGKILLed (every socket reset at once, as when a NAT, a load "
             f"balancer or a cell network drops them) and the same client ids reconnect at once "
             f"(`--connect-rate 1000000`: no pacing). Meanwhile a connected fleet of {STORM_FLEET} vehicles on "
             f"plain TCP publishes QoS 1 at {rate:,} msgs/s in total (`fleet run --vehicles {STORM_FLEET} --rate "
             f"{rate} --qos 1`) from 1.5 s before the cut to 12 s (plain) or 30 s (TLS) after its start; its "
             "PUBACK latency is compared with 5 s of the same fleet before the storm. The gateway fsyncs its "
             "journal before every PUBACK and forwards to the real Kafka; Mosquitto acknowledges from memory. "
             "**Reconnected**: vehicles whose CONNACK arrived; **storm s**: from the first reconnect attempt "
             "to the last CONNACK; **errors**: failed connects as the simulator counted them; **in flight at "
             "its end**: the connected fleet's publishes still unacknowledged when it stopped (sent − PUBACK'd). "
             "Rows `+nice`: the storm's simulator (not the connected fleet) ran under `nice -n "
             f"{arg('storm_nice') or 19}` (`--storm-nice`): in production the reconnecting vehicles are remote "
             "devices, not competitors for the broker's 2 cores. Medians of the runs with (min–max); which build "
             "each set of rows measured: docs/BENCHMARKS.notes.md, \"Reconnect storm\".\n")
    L.append("| broker | storm over | reconnected | storm s | reconnects/s | errors | fleet PUBACK p99 before | "
             "p50 during | p99 during | max during | fleet in flight at its end |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|")
    verdicts = []
    for name, kind in [(b, k + m) for m in ("", "+nice") for b in ("gateway", "mosquitto") for k in STORM_KINDS]:
        if True:
            rows = res.get(f"{name}-{kind}", [])
            if not rows:
                continue
            errs = [sum(r["errors"].values()) for r in rows]
            missing = [r["fleet_sent"] - r["fleet_acked"] for r in rows]
            L.append(f"| {name} | {kind} | {fmt([r['reconnected'] for r in rows])} | "
                     f"{fmt([r['storm_secs'] for r in rows], '', 2)} | "
                     f"{fmt([r['reconnected'] / max(r['storm_secs'], 1e-9) for r in rows])} | {fmt(errs)} | "
                     f"{fmt([r['fleet_quiet']['p99_us'] / 1000 for r in rows], ' ms', 2)} | "
                     f"{fmt([r['fleet_during']['p50_us'] / 1000 for r in rows], ' ms', 2)} | "
                     f"{fmt([r['fleet_during']['p99_us'] / 1000 for r in rows], ' ms', 2)} | "
                     f"{fmt([r['fleet_during']['max_us'] / 1000 for r in rows], ' ms', 1)} | {fmt(missing)} |")
            if name == "gateway":
                p99 = statistics.median([r["fleet_during"]["p99_us"] / 1000 for r in rows])
                all_in = all(r["reconnected"] == n for r in rows)
                verdicts.append(f"{kind}: {'all' if all_in else 'not all'} reconnected in every run, fleet "
                                f"PUBACK p99 during the storm {p99:.2f} ms against ≤ 10 ms "
                                f"({'met' if all_in and p99 <= 10 else 'not met'})")
    if verdicts:
        L.append("\nGoal (gateway): " + "; ".join(verdicts) + ".\n")


def replay_phase(work, kafka, certs, results, args):
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


def journal_phase(work, results, args):
    # Journal: group sizes against plain write + fdatasync on the same disk.
    jdir = os.path.join(work, "journal-bench")
    for run in range(args.runs):
        out = subprocess.run([os.path.join(REL, "examples", "journal_bench"), jdir, "3"],
                             check=True, capture_output=True, text=True).stdout
        for line in out.splitlines():
            row = json.loads(line)
            results["journal"].setdefault(f"{row['kind']}-{row['group']}", []).append(row)


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
    meta = res.get("meta", {})

    # What an argument was before it existed, for results recorded before then.
    before = {"command_kafka_linger_ms": 0, "fleet_cpu": 1}

    def arg(scenario, name):
        """An argument as it was when the scenario last ran (results kept across --only runs)."""
        recorded = meta.get(scenario, {}).get("args", {})
        if scenario in meta and name not in recorded and name in before:
            return before[name]
        return recorded.get(name, getattr(args, name))

    def when(scenario):
        m = meta.get(scenario, {})
        return f"`{scenario}` on {m['date']} (--runs {arg(scenario, 'runs')})" if "date" in m else f"`{scenario}`"

    L = []
    L.append("# Benchmarks\n")
    L.append("Generated by `python3 scripts/bench.py` (" + f"--connections {arg('idle', 'connections')} "
             f"--replay {arg('replay', 'replay')} --seconds {arg('ingest', 'seconds')}" + "); scenarios as last run: "
             + ", ".join(when(x) for x in SCENARIOS if x in meta) + ".\n")
    L.append(f"**Machine:** {machine()}. The simulator (`fleet`), the brokers and Kafka share the "
             "machine and its 2 cores; numbers are medians of the runs with (min–max). These machines "
             "are shared and noisy: compare ratios measured in the same run, not absolute numbers "
             "across runs.\n")
    L.append("**Brokers:** the gateway (release build; journal fsync'd before every PUBACK; bridge to a real "
             "Kafka with `acks=all`, idempotent) and Mosquitto 2.x from Debian with default settings "
             "(listeners only; it persists nothing and forwards nowhere).\n")
    L.append("## Durable QoS1 ingest at saturation\n")
    L.append(f"`fleet run --vehicles 100 --window 16 --duration-secs {arg('ingest', 'seconds')} --qos 1` "
             "(100 vehicles, 16 QoS1 publishes in flight each, PUBACKs counted).\n")
    g, m = res["ingest"].get("gateway", []), res["ingest"].get("mosquitto", [])
    L.append("| broker | PUBACK'd msgs/s |\n|---|---|")
    L.append(f"| gateway | {fmt(g)} |\n| mosquitto | {fmt(m)} |")
    if g and m:
        L.append(f"\n**Ratio gateway / mosquitto: {statistics.median(g) / statistics.median(m):.2f}×** "
                 "(target ≥ 1.0×).\n")
    ingest_cpu_markdown(L, res.get("ingest_cpu", {}), lambda name: arg("ingest_cpu", name))
    L.append("## PUBACK latency at a fixed moderate rate\n")
    L.append(f"`fleet run --vehicles 100 --rate 5000 --duration-secs {arg('ingest', 'seconds')} --qos 1`.\n")
    L.append("| broker | p50 | p90 | p99 | p99.9 |\n|---|---|---|---|---|")
    for name in ("gateway", "mosquitto"):
        rows = res["latency"].get(name, [])
        cells = [fmt([r[k] / 1000 for r in rows], " ms", 3) for k in ("p50_us", "p90_us", "p99_us", "p999_us")]
        L.append(f"| {name} | " + " | ".join(cells) + " |")
    L.append("\nThe gateway's PUBACK waits for an `fdatasync` of the journal (group commit); Mosquitto "
             "acknowledges from memory.\n")
    L.append("## Idle connections\n")
    L.append(f"`fleet run --vehicles {arg('idle', 'connections')} --idle --connect-rate 4000 --keep-alive 0 "
             "--source-ips 8` (TLS: `--ca`; `+sub`: `--subscribe-commands`, each vehicle holding one "
             "subscription to `vehicles/<id>/commands/#`), server RSS (VmRSS) measured before connecting and "
             "while all are held.\n")
    L.append("| broker | transport | connected | RSS per connection | connections/s |\n|---|---|---|---|---|")
    for key in [f"{b}-{k}" for b in ("gateway", "mosquitto") for k in IDLE_KINDS]:
        rows = res["idle"].get(key, [])
        if not rows:
            continue
        name, kind = key.split("-")
        L.append(f"| {name} | {kind} | {fmt([r['connected'] for r in rows])} | "
                 f"{fmt([r['kib_per_conn'] for r in rows], ' KiB', 2)} | {fmt([r['connect_rate'] for r in rows])} |")
    def med(key):
        rows = [r["kib_per_conn"] for r in res["idle"].get(key, [])]
        return statistics.median(rows) if rows else None
    gp, gt, gps, gts = (med(f"gateway-{k}") for k in IDLE_KINDS)
    if gp and gt:
        with_sub = (f" (with one subscription: {gps:.2f} and {gts:.2f})" if gps and gts else "")
        worst = max(x for x in (gt, gts) if x)
        L.append(f"\nTargets: ≤ 2 KiB per plain connection, ≤ 8 KiB per TLS connection, a connected vehicle "
                 f"with one subscription counting as idle. Measured {gp:.2f} KiB plain and {gt:.2f} KiB TLS"
                 f"{with_sub}. A million TLS vehicles at this rate: {worst * 1e6 / 2**20:.1f} GiB.\n")
    storm_markdown(L, res.get("storm", {}), lambda name: arg("storm", name))
    L.append("## Replay after an outage\n")
    replay = arg("replay", "replay")
    L.append(f"Kafka stopped; `fleet run --vehicles 100 --messages {replay // 100}` builds a "
             f"{replay:,}-record backlog in the journal; Kafka started; drain rate measured from the first "
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
    pubsub_markdown(L, res.get("pubsub", {}), lambda name: arg("pubsub", name))
    commands_markdown(L, res.get("commands", {}), lambda name: arg("commands", name))
    overhead_markdown(L, res.get("overhead", {}), lambda name: arg("overhead", name))
    path = os.path.join(ROOT, "docs", "BENCHMARKS.md")
    notes = os.path.join(ROOT, "docs", "BENCHMARKS.notes.md")
    scaleout = os.path.join(ROOT, "docs", "BENCHMARKS.scaleout.md")
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")
        # Written by tests/examples/ha_bench.rs runs, by hand: kept across regenerations.
        if os.path.exists(scaleout):
            f.write("\n" + open(scaleout).read())
        if os.path.exists(notes):
            f.write("\n" + open(notes).read())
    print("wrote", path)


def pubsub_markdown(L, res, arg):
    clients, warm, secs = arg("pubsub_clients"), arg("pubsub_warmup"), arg("pubsub_seconds")
    fan_out, fan_in = f"{arg('fanout_rate'):g}", f"{arg('fanin_rate'):g}"
    L.append("## Delivery: fan-out and fan-in\n")
    L.append(f"`python3 scripts/bench.py --only pubsub` runs, per QoS (0 and 1; publish QoS = subscribe QoS), "
             f"the brokers alternating:\n\n"
             f"* **fan-out** `fleet fanout --subscribers {clients} --rate {fan_out} --qos <q> --warmup-secs {warm} "
             f"--duration-secs {secs}`: one publisher → {clients:,} subscribers of `bench/fanout` "
             f"({float(fan_out) * clients:,.0f} deliveries/s offered);\n"
             f"* **fan-in** `fleet fanin --publishers {clients} --rate {fan_in} --qos <q> --warmup-secs {warm} "
             f"--duration-secs {secs}`: {clients:,} publishers, each on `vehicles/<id>/telemetry` → one "
             f"subscriber of `vehicles/+/telemetry` ({float(fan_in):,.0f} deliveries/s offered).\n")
    L.append(f"All subscribers hold their SUBACK before publishing starts; {warm} s of warm-up, then a {secs} s "
             "window at the fixed offered rate. **Delivered msgs/s**: PUBLISHes the subscribers received inside "
             "the window. **Latency**: receive time − the send time the publisher wrote into the payload (same "
             "host, one clock), for those deliveries. **Complete**: deliveries of the messages sent inside the "
             "window, received by the end of the drain, over what the subscriptions call for (below 1: the broker "
             "dropped some). **CPU s**: the broker process's utime + stime over the window (`/proc/<pid>/stat`); "
             "for the gateway the Kafka broker's JVM is listed apart (`kafka`), and `fleet` is the simulator, "
             "which shares the 2 cores. The gateway runs as in the sections above (journal fsync'd, bridged to "
             "the real single-node Kafka; every publish is also journaled and forwarded, `bench/fanout` to the "
             "unmatched default topic) with `[auth] publish_acl = [\"#\"]`, `subscribe_acl = [\"#\"]` and "
             "`[mqtt] max_publish_rate = 0`; Mosquitto with its defaults (which drop QoS 1 messages beyond "
             "`max_queued_messages` = 1000 per subscriber). Medians of the runs with (min–max).\n")
    pubsub_table(L, res, "")
    L.append("### The same, with the broker and the simulator on a core each\n")
    L.append("`--pubsub-pinned 1` (the default) runs every case again on fresh brokers, each broker's threads "
             "pinned to CPU 0 (`taskset -a -p -c 0`: for the gateway its runtime workers, journal writer and "
             "librdkafka threads together) and the simulator to CPU 1 (`taskset -c 1`); the Kafka JVM is not "
             "pinned. Unpinned, a single-threaded broker leaves the other core to the simulator's 1,000 "
             "connections while the gateway's two runtime workers contend with them, so the unpinned latency "
             "is partly decided by who gets the simulator's CPU; in production the vehicles run elsewhere.\n")
    pubsub_table(L, res, "+pinned")


def pubsub_table(L, res, tag):
    """The delivery table and its ratios for the results keyed `<case><tag>`."""
    L.append("| case | broker | delivered msgs/s | complete | p50 | p99 | broker CPU s | delivered per broker CPU-s | "
             "fleet CPU s |\n|---|---|---|---|---|---|---|---|---|")
    ratios = []
    for pattern, qos in PUBSUB_CASES:
        label = f"{'fan-out' if pattern == 'fanout' else 'fan-in'} QoS {qos}"
        per = {}
        for name in ("gateway", "mosquitto"):
            rows = res.get(f"{pattern}-q{qos}{tag}", {}).get(name, [])
            if not rows:
                L.append(f"| {label} | {name} | {'not measured yet' if tag else PENDING} | | | | | | |")
                continue
            rate = [r["delivered_per_sec"] for r in rows]
            per_cpu = [r["delivered"] / max(r["cpu_secs"].get("broker", 0), 1e-9) for r in rows]
            p50 = [r["latency"]["p50_us"] / 1000 for r in rows]
            p99 = [r["latency"]["p99_us"] / 1000 for r in rows]
            per[name] = [statistics.median(x) for x in (rate, per_cpu, p50, p99)]
            cpu = fmt([r["cpu_secs"].get("broker") for r in rows], "", 2)
            if name == "gateway":
                cpu += f" + kafka {fmt([r['cpu_secs'].get('kafka') for r in rows], '', 2)}"
            L.append(f"| {label} | {name} | {fmt(rate)} | {fmt([r['completeness'] for r in rows], '', 4)} | "
                     f"{fmt(p50, ' ms', 2)} | {fmt(p99, ' ms', 2)} | {cpu} | {fmt(per_cpu)} | "
                     f"{fmt([r['cpu_secs'].get('fleet') for r in rows], '', 2)} |")
        if len(per) == 2:
            g, m = per["gateway"], per["mosquitto"]
            ratios.append(f"| {label} | {g[0] / m[0]:.2f}× | {g[1] / m[1]:.2f}× | {g[2] / m[2]:.2f}× | "
                          f"{g[3] / m[3]:.2f}× |")
        else:
            ratios.append(f"| {label} | {PENDING} | | | |")
    L.append("\n| case | gateway / mosquitto delivered msgs/s | gateway / mosquitto msgs per broker CPU-s | "
             "gateway / mosquitto p50 (below 1: faster) | p99 |\n|---|---|---|---|---|")
    L.extend(ratios)
    L.append("")


# Goals for issued → received p99, per path (issue 9).
COMMAND_GOALS_MS = {"mqtt": 1.0, "rest": 1.0, "kafka": 10.0}
COMMAND_PATH_NAMES = {"mqtt": "MQTT (operator publish)", "rest": "REST", "kafka": "Kafka"}


def commands_markdown(L, res, arg):
    vehicles, issuers = arg("command_vehicles"), arg("command_issuers")
    warm, secs = arg("command_warmup"), arg("command_seconds")
    rates = [float(x) for x in str(arg("command_rates")).split(",") if x]
    paths = [x for x in str(arg("command_paths")).split(",") if x]
    linger = arg("command_kafka_linger_ms")
    common = (f"--vehicles {vehicles} --rate <rate> --qos 1 --issuers {issuers} --warmup-secs {warm} "
              f"--duration-secs {secs}")
    L.append("## Commands: latency to online vehicles\n")
    if not [k for k in res if k != "unavailable"]:
        L.append("Not measured yet: `python3 scripts/bench.py --only commands` (`fleet commands`, see the README).\n")
        return
    L.append(f"`python3 scripts/bench.py --only commands` runs, per rate ({', '.join(f'{r:,.0f}' for r in rates)} "
             "commands/s) and path, the brokers alternating (Mosquitto for the MQTT path only):\n\n"
             f"* **MQTT** `fleet commands --via mqtt {common}` (gateway: `--operator-username {OPERATOR_USER} "
             f"--operator-password …`): {issuers} operator connections publish QoS 1 to `vehicles/<id>/commands`, "
             "at most 32 unacknowledged each;\n"
             f"* **REST** `fleet commands --via rest {common} --admin 127.0.0.1:<admin port>`: {issuers} HTTP/1.1 "
             "keep-alive connections, one `POST /api/v1/vehicles/<id>/commands` "
             "(`{\"payload\": …, \"qos\": 1}`) at a time each;\n"
             f"* **Kafka** `fleet commands --via kafka {common} --kafka-bootstrap 127.0.0.1:<kafka port> "
             f"--kafka-linger-ms {linger}`: one librdkafka producer (`linger.ms` {linger}, `acks` all) writes each "
             "command to `vehicles.commands` (key = client id, header `qos` 1); the gateway's command consumer "
             "takes it from there. The issue time is taken before the producer's linger, so the latency includes "
             "it (a back office's producer batches too: 5 ms is librdkafka's and the Java client's default; with "
             "`linger.ms` 0 every command is its own produce request and the broker's JVM alone took ~0.9 of "
             "the 2 cores at 10,000/s, p99 1.5–3.8 s, docs/BENCHMARKS.notes.md).\n")
    L.append(f"{vehicles:,} vehicles connect and subscribe to `vehicles/<id>/commands` at QoS 1 (every SUBACK "
             "held) before the first command; commands go round robin over the vehicles at the fixed rate, "
             f"{warm} s of warm-up, then a {secs} s window. Measured for the commands *issued inside the window*: "
             "**issued → received**: the vehicle's clock right after the read that brought the PUBLISH, minus the "
             "issue time the issuer wrote into the payload just before handing the command to its path (same "
             "host, one clock, ns); **issued → acknowledged**: the vehicle's clock right after its `write` of the "
             "PUBACK returned (the PUBACK handed to its kernel), minus the issue time: when the vehicle "
             "acknowledged, not when the broker learnt it. **Complete**: distinct commands received / issued. "
             "**Issue lag p99**: how late the issuer sent against its schedule (tokio's 1 ms timer accounts for "
             "1–2 ms; much more: the offered rate was not met). **CPU s**: the broker process over the window (for the gateway + the Kafka broker's JVM). "
             "The gateway runs as in the sections above (journal fsync'd; an operator's QoS 1 publish to a "
             "command topic is PUBACK'd once the command is in the vehicle's session, and, no route naming "
             "command topics, not journaled (since 2026-12-07; before, it also went to the unmatched default "
             "topic); each command's outcome record goes through the journal to `vehicles.command-outcomes`), with an operator user whose `publish_acl` is "
             "`[\"vehicles/+/commands\"]`; the vehicles keep the default ACLs. Mosquitto with its defaults. "
             "Medians of the runs with (min–max).\n")
    unavailable = res.get("unavailable", {})
    L.append("| path | commands/s | broker | issued/s | complete | received p50 | p99 | p99.9 | acked p50 | p99 | "
             "p99.9 | issue lag p99 | broker CPU s |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")

    def ms(rows, key, k):
        return fmt([r[key][k] / 1000 for r in rows], " ms", 3)

    def med_of(rows, f):
        return statistics.median([f(r) for r in rows])

    goals, ratios = [], []
    for path in paths:
        for rate in rates:
            label = COMMAND_PATH_NAMES[path]
            brokers = ("gateway", "mosquitto") if path == "mqtt" else ("gateway",)
            per = {}
            for name in brokers:
                rows = res.get(f"{path}-{rate:g}", {}).get(name, [])
                if not rows:
                    why = unavailable.get(path, "not run") if name == "gateway" else "not run"
                    L.append(f"| {label} | {rate:,.0f} | {name} | {why} | | | | | | | | | |")
                    continue
                per[name] = rows
                cpu = fmt([r["cpu_secs"].get("broker") for r in rows], "", 2)
                if name == "gateway":
                    cpu += f" + kafka {fmt([r['cpu_secs'].get('kafka') for r in rows], '', 2)}"
                L.append(f"| {label} | {rate:,.0f} | {name} | {fmt([r['issued_per_sec'] for r in rows])} | "
                         f"{fmt([r['completeness'] for r in rows], '', 4)} | "
                         f"{ms(rows, 'received_latency', 'p50_us')} | {ms(rows, 'received_latency', 'p99_us')} | "
                         f"{ms(rows, 'received_latency', 'p999_us')} | {ms(rows, 'acked_latency', 'p50_us')} | "
                         f"{ms(rows, 'acked_latency', 'p99_us')} | {ms(rows, 'acked_latency', 'p999_us')} | "
                         f"{ms(rows, 'issue_lag', 'p99_us')} | {cpu} |")
            if "gateway" in per:
                p99 = med_of(per["gateway"], lambda r: r["received_latency"]["p99_us"]) / 1000
                goal = COMMAND_GOALS_MS[path]
                goals.append(f"{label} at {rate:,.0f}/s: p99 {p99:.3f} ms against < {goal:g} ms "
                             f"({'met' if p99 < goal else 'not met'})")
            if len(per) == 2:
                g, m = per["gateway"], per["mosquitto"]
                ratio = [med_of(g, f) / max(med_of(m, f), 1e-9) for f in (
                    lambda r: r["received_latency"]["p50_us"],
                    lambda r: r["received_latency"]["p99_us"],
                    lambda r: r["cpu_secs"].get("broker", 0))]
                ratios.append(f"| {rate:,.0f} | " + " | ".join(f"{x:.2f}×" for x in ratio) + " |")
    if goals:
        L.append("\nGoals (issued → received p99, gateway, medians): " + "; ".join(goals) + ".")
    # The gateway's own account: an outcome record per command (`fleet commands --outcomes-topic`).
    accounts = []
    for path in paths:
        for rate in rates:
            for r in res.get(f"{path}-{rate:g}", {}).get("gateway", []):
                if r.get("outcomes_expected"):
                    accounts.append((r["outcomes"].get("delivered", 0) / r["outcomes_expected"], r["outcomes"]))
    if accounts:
        worst = min(a[0] for a in accounts)
        others = sorted({k for _, c in accounts for k in c if k != "delivered"})
        L.append(f"\nOutcome records (`vehicles.command-outcomes`, read after each gateway run): `delivered` for "
                 f"{worst:.4f} of the commands issued (warm-up included) in the lowest of the {len(accounts)} gateway runs"
                 + (f"; other outcomes seen: {', '.join(others)}" if others else "; no other outcome") + ".")
    if ratios:
        L.append("\nMQTT path, gateway / mosquitto in the same runs (below 1: the gateway is faster or cheaper):\n")
        L.append("| commands/s | received p50 | received p99 | broker CPU s |\n|---|---|---|---|")
        L.extend(ratios)
    L.append("")

if __name__ == "__main__":
    sys.exit(main())
