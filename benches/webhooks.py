#!/usr/bin/env python3
"""Webhooks out: how many signed requests a second one node delivers, and how long an
event takes from the log to the receiver.

Starts `letterbox serve --webhook-allow-private` (the release binary) on a fresh data
directory (or a fresh PostgreSQL database), and a receiver in this process (a threaded
HTTP server on 127.0.0.1 that answers 204 and notes when each `webhook-id` came).
Subscribes the receiver to `subscriber.created`, imports N subscribers (N events), and
prints the requests per second from the first event to the last one received, and the
p50/p99 of event time (its commit) to arrival. The receiver shares the machine's cores
with the server: on 2 cores it is part of what is measured.

    python3 benches/webhooks.py [--events 20000] [--binary target/release/letterbox]
                                [--database URL|auto]
"""

import argparse
import http.server
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from send import BINARY, ENV, Cluster, call, free_port, scratch_database, wait_healthy  # noqa: E402

arrived = {}
lock = threading.Lock()


class Receiver(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        now = time.time() * 1000
        message = self.headers.get("webhook-id")
        event = json.loads(body)["data"]
        with lock:
            arrived.setdefault(message, (now, event["at_ms"]))
        self.send_response(204)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--binary", default=BINARY)
    parser.add_argument("--database", help="a PostgreSQL superuser URL, or auto for a throwaway cluster")
    args = parser.parse_args()
    n = args.events

    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    receiver.daemon_threads = True
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    hook_url = f"http://127.0.0.1:{receiver.server_address[1]}/hook"

    work = tempfile.mkdtemp(prefix="letterbox-webhooks-")
    env = {**ENV, "LETTERBOX_LOG": "warn", "NO_COLOR": "1"}
    backend = "redb"
    if args.database:
        admin = Cluster().url if args.database == "auto" else args.database
        env["LETTERBOX_DATABASE_URL"], _ = scratch_database(admin, "webhooks")
        backend = "postgres"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([args.binary, "serve", "--listen", f"127.0.0.1:{port}", "--data", f"{work}/data",
                               "--webhook-allow-private"],
                              stdout=open(f"{work}/server.log", "w"), stderr=subprocess.STDOUT, env=env)
    try:
        wait_healthy(base)
        newsletter = call(base, "POST", "/v1/newsletters", {"name": "Hooks", "from": "H <h@example.com>"})["id"]
        call(base, "POST", "/v1/webhooks", {"url": hook_url, "events": ["subscriber.created"]})
        print(f"backend {backend}, {n} events, log {work}/server.log")
        for start in range(0, n, 10000):
            rows = [{"email": f"h{i}@example.org"} for i in range(start, min(n, start + 10000))]
            call(base, "POST", f"/v1/newsletters/{newsletter}/subscribers", rows)
        deadline = time.time() + 600
        while len(arrived) < n:
            if time.time() > deadline:
                sys.exit(f"only {len(arrived)} of {n} arrived")
            time.sleep(0.05)
        with lock:
            times = sorted(arrived.values())
        first_event = min(at for _, at in times)
        last_arrival = max(t for t, _ in times)
        lag = sorted(t - at for t, at in times)
        seconds = (last_arrival - first_event) / 1000
        print(f"{n} events delivered in {seconds:.1f} s: {n / seconds:.0f} requests/s; "
              f"event to receiver p50 {lag[len(lag) // 2]:.0f} ms, p99 {lag[int(len(lag) * 0.99)]:.0f} ms")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
