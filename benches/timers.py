#!/usr/bin/env python3
"""Durable timers at scale: what 1,000,000 waiting timers cost, and how late 100,000 that
fall due in the same second fire, on one node.

Starts `letterbox serve` (the release binary) on a fresh data directory (or a fresh
PostgreSQL database), uploads the test automation (`plugins/test-automation`, built by
`cargo build --release`), and:

1. Arms `--pending` timers due in a day: an automation on newsletter A answers each
   `subscriber.created` with a `start_timer`, and A gets that many subscribers. Prints
   the arming rate (timers started per second, through the real worker and store).
2. Measures the server's CPU over `--idle` seconds while those timers wait, and before
   any timer exists (the same server, idle), for comparison.
3. Arms `--due` more timers, all due at one second T: an automation on newsletter B,
   created with T in its config before B's subscribers are imported. Each fired timer
   emits `custom.fired`; an event's time is when its turn committed, so its lateness
   is `at_ms - T`. Prints p50, p99 and max lateness, and the time the last one took.

    python3 benches/timers.py [--pending 1000000] [--due 100000] [--idle 20]
                              [--binary target/release/letterbox] [--database URL|auto]
"""

import argparse
import glob
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from send import BINARY, ENV, ROOT, TOKEN, Cluster, call, cpu_of, free_port, scratch_database, wait_healthy  # noqa: E402


def test_automation():
    """The newest build of the test automation component."""
    found = glob.glob(os.path.join(ROOT, "target", "release", "build", "letterbox-*", "out",
                                   "plugins-target", "wasm32-wasip2", "release", "test_automation.wasm"))
    if not found:
        sys.exit("test_automation.wasm not found: cargo build --release first")
    return max(found, key=os.path.getmtime)


def upload(base, name, path):
    with open(path, "rb") as f:
        request = urllib.request.Request(f"{base}/v1/plugins?kind=automation&name={name}", data=f.read(),
                                         method="POST")
    request.add_header("authorization", f"Bearer {TOKEN}")
    request.add_header("content-type", "application/wasm")
    urllib.request.urlopen(request, timeout=300).read()


def plugins(base):
    """The latest version of every plugin (`GET /v1/plugins`)."""
    return [p["latest"] for p in call(base, "GET", "/v1/plugins")]


def import_subscribers(base, newsletter, n, tag):
    for start in range(0, n, 10000):
        rows = [{"email": f"{tag}{i}@example.org"} for i in range(start, min(n, start + 10000))]
        call(base, "POST", f"/v1/newsletters/{newsletter}/subscribers", rows)


def automation(base, name, newsletter, script):
    return call(base, "POST", "/v1/automations", {
        "name": name, "policy": "script", "events": ["subscriber.created"],
        "newsletter_id": newsletter, "config": {"script": script}})["id"]


def wait_handled(base, automation_id, n, limit_s):
    """Seconds until the automation has handled `n` events and timers."""
    started = time.monotonic()
    while True:
        a = call(base, "GET", f"/v1/automations/{automation_id}")
        if a["failed"]:
            sys.exit(f"automation {automation_id} failed: {a}")
        if a["handled"] >= n:
            return time.monotonic() - started
        if time.monotonic() - started > limit_s:
            sys.exit(f"automation {automation_id} handled {a['handled']} of {n} in {limit_s} s")
        time.sleep(0.2)


def percentile(sorted_values, p):
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * p))]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pending", type=int, default=1_000_000)
    parser.add_argument("--due", type=int, default=100_000)
    parser.add_argument("--idle", type=int, default=20, help="seconds of CPU measured while timers wait")
    parser.add_argument("--binary", default=BINARY)
    parser.add_argument("--database", help="a PostgreSQL superuser URL, or auto for a throwaway cluster")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="letterbox-timers-")
    env = {**ENV, "LETTERBOX_LOG": "warn", "NO_COLOR": "1"}
    backend = "redb"
    if args.database:
        admin = Cluster().url if args.database == "auto" else args.database
        env["LETTERBOX_DATABASE_URL"], _ = scratch_database(admin, "timers")
        backend = "postgres"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([args.binary, "serve", "--listen", f"127.0.0.1:{port}", "--data", f"{work}/data"],
                              stdout=open(f"{work}/server.log", "w"), stderr=subprocess.STDOUT, env=env)
    try:
        wait_healthy(base)
        upload(base, "script", test_automation())
        a = call(base, "POST", "/v1/newsletters", {"name": "Waiting", "from": "A <a@example.com>"})["id"]
        b = call(base, "POST", "/v1/newsletters", {"name": "Due", "from": "B <b@example.com>"})["id"]
        print(f"backend {backend}, log {work}/server.log")

        hz = os.sysconf("SC_CLK_TCK")

        def idle_cpu():
            before, t0 = cpu_of(server.pid), time.monotonic()
            time.sleep(args.idle)
            return (cpu_of(server.pid) - before) / hz, time.monotonic() - t0

        # The same server idle with no timers at all, for comparison; once every policy
        # (the built-ins of a first start, the uploaded one) has compiled, which is not idle.
        deadline = time.monotonic() + 300
        while any(p.get("status") == "compiling" for p in plugins(base)):
            if time.monotonic() > deadline:
                sys.exit("the policies never finished compiling")
            time.sleep(0.2)
        cpu, seconds = idle_cpu()
        print(f"idle with no timers: {cpu:.2f} s CPU over {seconds:.0f} s ({100 * cpu / seconds:.1f} % of one core)")

        if args.pending:
            far = automation(base, "far", a, {"state": None, "actions": [
                {"start_timer": {"name": "later", "after_seconds": 86400}}]})
            started = time.monotonic()
            import_subscribers(base, a, args.pending, "w")
            imported = time.monotonic() - started
            armed = wait_handled(base, far, args.pending, 3600) + imported
            print(f"armed {args.pending} pending timers in {armed:.1f} s "
                  f"({args.pending / armed:.0f}/s, import included: {imported:.1f} s)")
            cpu, seconds = idle_cpu()
            print(f"idle with {args.pending} pending timers: {cpu:.2f} s CPU over {seconds:.0f} s "
                  f"({100 * cpu / seconds:.1f} % of one core)")

        if args.due:
            # Armed by the worker at about the import's rate; T leaves room for twice that.
            lead = 15 + 2 * args.due / 5000
            due_s = int(time.time() + lead) + 1
            fired = {"state": None, "actions": [{"emit": ["custom.fired", {}]}]}
            soon = automation(base, "soon", b, {"state": None, "actions": [
                {"start_timer": {"name": "now", "at": due_s, "data": fired}}]})
            import_subscribers(base, b, args.due, "d")
            armed = wait_handled(base, soon, args.due, 3600)
            left = due_s - time.time()
            if left < 1:
                sys.exit(f"arming {args.due} timers took past their due time; lower --due")
            print(f"armed {args.due} timers due at T (in {left:.1f} s)")
            wait_handled(base, soon, 2 * args.due, 3600)
            lateness, after = [], 0
            while True:
                page = call(base, "GET", f"/v1/events?type=custom.fired&after={after}&limit=1000")
                lateness += [e["at_ms"] - due_s * 1000 for e in page["events"]]
                if page["next"] == after:
                    break
                after = page["next"]
            if len(lateness) != args.due:
                sys.exit(f"{len(lateness)} custom.fired events for {args.due} timers")
            lateness.sort()
            print(f"{args.due} timers due at one second fired: lateness p50 {percentile(lateness, 0.5)} ms, "
                  f"p99 {percentile(lateness, 0.99)} ms, max {lateness[-1]} ms "
                  f"({args.due / max(lateness[-1], 1) * 1000:.0f} timers/s)")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
