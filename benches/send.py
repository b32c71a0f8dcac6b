#!/usr/bin/env python3
"""Send throughput: letterbox vs Postfix's smtp-source, side by side, into one smtp-sink.

Starts `smtp-sink`, then `letterbox serve --smtp` (the release binary) on a fresh data
directory, creates N subscribers, sends one ~3 KB letter through the default filter and
template at concurrency C, and times it from the send request to job completion. Then
times `smtp-source -d -s C -m N -l 3000` against the same sink. Prints both rates, their
ratio, and letterbox's peak RSS (VmHWM) over the whole run, import included. Needs:
`cargo build --release`, Debian package `postfix` (smtp-sink, smtp-source).

    python3 benches/send.py [--recipients 100000] [--concurrency 32] [--skip-source]
                            [--binary target/release/letterbox]
                            [--database URL|auto] [--nodes N] [--compare]

With `--database`, letterbox keeps its state in PostgreSQL: a fresh database on the
server URL names (a superuser's URL: it creates one), or with `auto` on a throwaway
cluster of Debian's `postgresql` started for the run (with pg_stat_statements). `--nodes
N` starts N nodes on that database; every node works the job at concurrency C. For a
PostgreSQL run it also prints what the database did per recipient: transactions,
statements (round trips; with pg_stat_statements), rows written and WAL bytes.
`--compare` runs, in one go and into one sink: redb, PostgreSQL with 1 node and with N
nodes (default 2), then smtp-source, and prints the ratios.
"""

import argparse
import atexit
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = os.path.join(ROOT, "target", "release", "letterbox")
# The API token the benchmarked servers are started with (LETTERBOX_API_TOKEN).
TOKEN = "letterbox-bench-token-0123456789"
ENV = {**os.environ, "LETTERBOX_API_TOKEN": TOKEN}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(base, method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, method=method)
    request.add_header("authorization", f"Bearer {TOKEN}")
    if data is not None:
        request.add_header("content-type", "application/json")
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def wait_healthy(base):
    for _ in range(600):
        try:
            call(base, "GET", "/healthz")
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"letterbox at {base} never answered")


def warm(binary, data, port, env=ENV):
    """Starts letterbox on `data` until it answers, then stops it (SIGTERM)."""
    server = subprocess.Popen([binary, "serve", "--listen", f"127.0.0.1:{port}", "--data", data],
                              stdout=subprocess.DEVNULL, env={**env, "LETTERBOX_LOG": "warn"})
    wait_healthy(f"http://127.0.0.1:{port}")
    server.terminate()
    server.wait()


def cpu_by_thread(pid):
    """CPU ticks (user + system) per thread name of a process."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # Thread pools name every thread alike; fold numbered names together.
        name = re.sub(r"[-_]?\d+$", "", name)
        out[name] = out.get(name, 0) + int(fields[11]) + int(fields[12])
    return out


def cpu_of(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def tool(name):
    for candidate in (shutil.which(name), f"/usr/sbin/{name}"):
        if candidate and os.path.exists(candidate):
            return candidate
    sys.exit(f"{name} not found: apt-get install postfix")


class Cluster:
    """A throwaway PostgreSQL cluster (Debian's package), as .ci/with-postgres starts one,
    with pg_stat_statements loaded."""

    def __init__(self):
        bins = sorted(d for d in os.listdir("/usr/lib/postgresql") if os.path.exists(f"/usr/lib/postgresql/{d}/bin/initdb")) \
            if os.path.isdir("/usr/lib/postgresql") else []
        if not bins:
            sys.exit("PostgreSQL is not installed: apt-get install postgresql")
        self.bin = f"/usr/lib/postgresql/{bins[-1]}/bin"
        self.dir = tempfile.mkdtemp(prefix="letterbox-bench-pg-")
        self.owner = []
        if os.getuid() == 0:
            # initdb refuses to run as root: the cluster belongs to the postgres user.
            shutil.chown(self.dir, "postgres")
            self.owner = ["runuser", "-u", "postgres", "--"]
        self.port = free_port()
        subprocess.run(self.owner + [f"{self.bin}/initdb", "-D", f"{self.dir}/data", "-A", "trust",
                                     "-U", "postgres"], check=True, stdout=subprocess.DEVNULL)
        options = (f"-h 127.0.0.1 -p {self.port} -k {self.dir} -c max_connections=200 "
                   "-c shared_preload_libraries=pg_stat_statements")
        subprocess.run(self.owner + [f"{self.bin}/pg_ctl", "-D", f"{self.dir}/data", "-l", f"{self.dir}/log",
                                     "-w", "-o", options, "start"], check=True, stdout=subprocess.DEVNULL)
        atexit.register(self.stop)
        self.url = f"postgres://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self):
        subprocess.run(self.owner + [f"{self.bin}/pg_ctl", "-D", f"{self.dir}/data", "-m", "immediate", "stop"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(self.dir, ignore_errors=True)


def psql(url, sql):
    out = subprocess.run(["psql", "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-d", url, "-c", sql],
                         check=True, capture_output=True, text=True).stdout
    return [line.split("|") for line in out.strip().splitlines() if line]


def scratch_database(admin_url, tag):
    name = f"letterbox_bench_{os.getpid()}_{tag}"
    psql(admin_url, f"DROP DATABASE IF EXISTS {name}")
    psql(admin_url, f"CREATE DATABASE {name}")
    url = admin_url.rsplit("/", 1)[0] + "/" + name
    try:
        psql(url, "CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        statements = True
    except subprocess.CalledProcessError:
        statements = False  # not preloaded on that server: no statement counts
    return url, statements


def db_counters(url, statements):
    """What the database has done so far for this database: commits, rows, WAL, statements."""
    row = psql(url, "SELECT xact_commit, tup_inserted, tup_updated, tup_deleted, "
                    "pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint "
                    "FROM pg_stat_database WHERE datname = current_database()")[0]
    out = dict(zip(["commits", "inserted", "updated", "deleted", "wal"], map(int, row)))
    if statements:
        calls = psql(url, "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements "
                          "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())")
        out["statements"] = int(calls[0][0])
        # Per statement, to show where the database's time goes (diffed over the send).
        out["by_statement"] = {
            row[0]: (int(row[1]), float(row[2]), "|".join(row[3:]))
            for row in psql(url, "SELECT queryid, calls, total_exec_time, "
                                 "regexp_replace(left(query, 90), '\\s+', ' ', 'g') FROM pg_stat_statements "
                                 "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())")
        }
    return out


def settled_counters(url, statements):
    """`db_counters` once the import's statistics are in: a backend reports its row
    counts at most 10 s after it goes idle (PostgreSQL 15), so wait that long."""
    time.sleep(11)
    return db_counters(url, statements)


def postgres_cpu():
    """CPU ticks of every postgres process now alive (the cluster the bench uses)."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() != "postgres":
                    continue
            total += cpu_of(pid)
        except OSError:
            continue
    return total


def run_letterbox(binary, n, c, sink_port, database=None, nodes=1, statements=False):
    """One send of `n` recipients at concurrency `c` into the sink; returns its figures."""
    work = tempfile.mkdtemp(prefix="letterbox-bench-")
    ports = [free_port() for _ in range(nodes)]
    env = {**ENV, "LETTERBOX_LOG": "warn,letterbox::store=info", "NO_COLOR": "1"}
    if database:
        env["LETTERBOX_DATABASE_URL"] = database
    servers = []
    try:
        for i, port in enumerate(ports):
            data = f"{work}/node{i}"
            # The very first start compiles the built-in policies (and keeps the
            # compiler's memory for a while); a real server does that once. Warm the
            # compiled cache first, so the peak measured is that of sending.
            warm(binary, data, port, env)
            servers.append(subprocess.Popen(
                [binary, "serve", "--listen", f"127.0.0.1:{port}", "--data", data,
                 "--smtp", f"smtp://127.0.0.1:{sink_port}", "--smtp-pool", str(c)],
                stdout=open(data + ".log", "w"), env=env))
        bases = [f"http://127.0.0.1:{port}" for port in ports]
        for base in bases:
            wait_healthy(base)
        base = bases[0]
        if nodes > 1:
            for _ in range(600):
                if len(call(base, "GET", "/v1/nodes")) == nodes:
                    break
                time.sleep(0.1)
        newsletter = call(base, "POST", "/v1/newsletters", {"name": "Bench", "from": "Bench <bench@example.com>"})["id"]
        for start in range(0, n, 10000):
            rows = [{"email": f"r{i}@example.org", "name": f"Reader {i}", "attributes": {"plan": "pro"}}
                    for i in range(start, min(n, start + 10000))]
            call(base, "POST", f"/v1/newsletters/{newsletter}/subscribers", rows)
        # A typical letter: ~3 KB (as smtp-source -l 3000) of mostly static text, with a
        # greeting, a per-plan line and the unsubscribe link rendered per recipient.
        # Lines wrapped at 70 columns, as plain-text mail is written (a line of 76 or
        # more makes the message quoted-printable; the unsubscribe URL gets its own).
        paragraph = ("This week in letterbox: notes on delivery, retries and the\n"
                     "people who keep a mailing list healthy. Nothing here changes\n"
                     "per reader.\n")
        text = ("Hello {{ name }},\n\nYou are on the {{ attributes.plan }} plan.\n\n"
                + paragraph * 18
                + "\nUnsubscribe:\n{{ unsubscribe_url }}\n")
        letter = call(base, "POST", f"/v1/newsletters/{newsletter}/letters",
                      {"subject": "Bench for {{ name }}", "text": text})["id"]

        db_before = settled_counters(database, statements) if database else None
        pg_before = postgres_cpu() if database else 0
        threads_before = [cpu_by_thread(s.pid) for s in servers]
        started = time.monotonic()
        job = call(base, "POST", f"/v1/letters/{letter}/send", {"concurrency": c})["job_id"]
        while True:
            status = call(base, "GET", f"/v1/jobs/{job}")
            if status["state"] not in ("queued", "running"):
                break
            time.sleep(0.05)
        seconds = time.monotonic() - started
        threads_after = [cpu_by_thread(s.pid) for s in servers]
        pg_after = postgres_cpu() if database else 0
        counts = status["counts"]
        if status["state"] != "completed" or counts["delivered"] != n:
            sys.exit(f"job did not deliver everything: {status}")
        peaks = []
        for s in servers:
            with open(f"/proc/{s.pid}/status") as f:
                peaks.append(int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)))
    finally:
        for s in servers:
            s.terminate()
        for s in servers:
            s.wait()
        logs = [f"{work}/node{i}.log" for i in range(nodes)]
        for log in logs:
            if os.path.exists(log):
                with open(log) as f:
                    for line in f:
                        if "store writer stopped" in line:
                            print("  " + line.strip().split("INFO ", 1)[-1])
        shutil.rmtree(work, ignore_errors=True)
    hz = os.sysconf("SC_CLK_TCK")
    used = {}
    for before, after in zip(threads_before, threads_after):
        for k in after:
            used[k] = used.get(k, 0) + (after[k] - before.get(k, 0)) / hz
    result = {"seconds": seconds, "rate": n / seconds, "peak_mib": max(peaks) / 1024, "cpu": used,
              "postgres_cpu": (pg_after - pg_before) / hz}
    if database:
        # The nodes have exited, so their backends have reported their statistics.
        time.sleep(1.0)
        after = db_counters(database, statements)
        result["db"] = {k: after[k] - db_before[k] for k in after if k != "by_statement"}
        if "by_statement" in after:
            spent = []
            for qid, (calls, ms, text) in after["by_statement"].items():
                c0, ms0, _ = db_before["by_statement"].get(qid, (0, 0.0, text))
                if calls > c0:
                    spent.append((ms - ms0, calls - c0, text))
            result["by_statement"] = sorted(spent, reverse=True)
    return result


TOP_STATEMENTS = 0


def report(label, n, r):
    cpu = sum(r["cpu"].values())
    busy = ", ".join(f"{k} {v:.2f}" for k, v in sorted(r["cpu"].items(), key=lambda kv: -kv[1]) if v > 0.05)
    print(f"{label:<22} {r['seconds']:8.2f} s  {r['rate']:10.0f} msg/s  peak RSS {r['peak_mib']:.0f} MiB  "
          f"CPU letterbox {cpu:.2f} s ({busy})" + (f", postgres {r['postgres_cpu']:.2f} s" if "db" in r else ""))
    if "db" in r:
        d = r["db"]
        per = {k: v / n for k, v in d.items()}
        line = (f"{'':<22} per recipient: {per['commits']:.3f} commits, "
                + (f"{per['statements']:.2f} statements, " if "statements" in per else "")
                + f"{per['inserted']:.2f} rows inserted, {per['updated']:.2f} updated, "
                  f"{per['deleted']:.2f} deleted, {per['wal']:.0f} WAL bytes; "
                  f"{r['postgres_cpu'] * 1e6 / n:.0f} us postgres CPU")
        print(line)
        for ms, calls, text in r.get("by_statement", [])[:TOP_STATEMENTS]:
            print(f"{'':<24}{ms:9.0f} ms {calls:8d} calls  {text}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipients", type=int, default=100000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--skip-source", action="store_true", help="only run letterbox")
    parser.add_argument("--binary", default=BINARY, help="the letterbox to measure (A/B of two builds)")
    parser.add_argument("--database", help="postgres://… (a superuser's URL) or 'auto' (a throwaway cluster)")
    parser.add_argument("--nodes", type=int, default=None, help="letterbox nodes on the database")
    parser.add_argument("--compare", action="store_true",
                        help="redb, PostgreSQL 1 node and N nodes, smtp-source, in one run")
    parser.add_argument("--statements", type=int, default=0,
                        help="print the N statements PostgreSQL spent most time on during the send")
    args = parser.parse_args()
    global TOP_STATEMENTS
    TOP_STATEMENTS = args.statements
    n, c, binary = args.recipients, args.concurrency, args.binary
    if not os.path.exists(binary):
        sys.exit("build first: cargo build --release")
    admin = args.database
    if args.compare and not admin:
        admin = "auto"
    if admin == "auto":
        admin = Cluster().url

    sink_port = free_port()
    sink = subprocess.Popen([tool("smtp-sink"), "-u", "nobody", f"127.0.0.1:{sink_port}", "512"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    atexit.register(sink.kill)
    sink_cpu = cpu_of(sink.pid)
    print(f"recipients={n} concurrency={c}")
    results = {}
    if args.compare:
        many = args.nodes or 2
        plan = [("redb", None, 1), ("postgres, 1 node", "pg1", 1), (f"postgres, {many} nodes", f"pg{many}", many)]
    elif admin:
        plan = [(f"postgres, {args.nodes or 1} node(s)", "pg", args.nodes or 1)]
    else:
        plan = [("redb", None, 1)]
    for label, tag, nodes in plan:
        database, statements = scratch_database(admin, tag) if tag else (None, False)
        results[label] = run_letterbox(binary, n, c, sink_port, database, nodes, statements)
        report(label, n, results[label])
    hz = os.sysconf("SC_CLK_TCK")
    print(f"  smtp-sink CPU over the letterbox runs: {(cpu_of(sink.pid) - sink_cpu) / hz:.2f} s")
    if args.skip_source:
        sink.terminate()
        sink.wait()
        return
    started = time.monotonic()
    subprocess.run([tool("smtp-source"), "-d", "-s", str(c), "-m", str(n), "-l", "3000",
                    "-f", "a@example.com", "-t", "b@example.org", f"127.0.0.1:{sink_port}"], check=True)
    source_s = time.monotonic() - started
    sink.terminate()
    sink.wait()

    src = n / source_s
    print(f"{'smtp-source':<22} {source_s:8.2f} s  {src:10.0f} msg/s")
    for label, r in results.items():
        print(f"ratio {label} / smtp-source: {r['rate'] / src:.3f}")
    if args.compare:
        labels = list(results)
        print(f"ratio {labels[1]} / redb: {results[labels[1]]['rate'] / results[labels[0]]['rate']:.3f}")
        print(f"ratio {labels[2]} / {labels[1]}: {results[labels[2]]['rate'] / results[labels[1]]['rate']:.3f}")


if __name__ == "__main__":
    main()
