#!/usr/bin/env python3
"""One-off messages: how many `POST /v1/messages` one node accepts per second, how long
an accept takes (p50, p99), and how long from the accept until the SMTP server took the
message (its `message.queued` and `message.sent` events).

Starts `smtp-sink` (Debian package `postfix`) and `letterbox serve --smtp` (the release
binary) on a fresh data directory (or a fresh PostgreSQL database), imports the
subscribers, then `--clients` threads each post their share of `--messages` over one
keep-alive connection: a receipt with a subject and body of its own and data of its own
(`{{ params.order }}`), each with an Idempotency-Key.

    python3 benches/messages.py [--messages 20000] [--clients 16] [--subscribers 1000]
                                [--binary target/release/letterbox] [--database URL|auto]
"""

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from send import BINARY, ENV, TOKEN, Cluster, call, free_port, scratch_database, tool, wait_healthy, warm  # noqa: E402


def percentile(sorted_values, p):
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * p))]


def poster(port, subscribers, first, count, latencies, failures):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"authorization": f"Bearer {TOKEN}", "content-type": "application/json"}
    for i in range(first, first + count):
        body = json.dumps({
            "subscriber": subscribers[i % len(subscribers)],
            "subject": "Receipt for order {{ params.order }}",
            "text": "Hello {{ name }},\n\norder {{ params.order }} is paid.\n",
            "data": {"order": i},
        })
        started = time.perf_counter()
        connection.request("POST", "/v1/messages", body, {**headers, "idempotency-key": f"order-{i}"})
        response = connection.getresponse()
        response.read()
        latencies.append(time.perf_counter() - started)
        if response.status != 202:
            failures.append(response.status)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--binary", default=BINARY)
    parser.add_argument("--database", help="a PostgreSQL superuser URL, or auto for a throwaway cluster")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="letterbox-messages-")
    env = {**ENV, "LETTERBOX_LOG": "warn", "NO_COLOR": "1"}
    backend = "redb"
    if args.database:
        admin = Cluster().url if args.database == "auto" else args.database
        env["LETTERBOX_DATABASE_URL"], _ = scratch_database(admin, "messages")
        backend = "postgres"
    sink_port, port = free_port(), free_port()
    # The very first start compiles the built-in policies; a real server has done that
    # long before its first message.
    warm(args.binary, f"{work}/data", port, env)
    sink = subprocess.Popen([tool("smtp-sink"), "-u", "nobody", f"127.0.0.1:{sink_port}", "512"],
                            stdout=subprocess.DEVNULL)
    server = subprocess.Popen([args.binary, "serve", "--listen", f"127.0.0.1:{port}", "--data", f"{work}/data",
                               "--smtp", f"smtp://127.0.0.1:{sink_port}"],
                              stdout=open(f"{work}/server.log", "w"), stderr=subprocess.STDOUT, env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base)
        newsletter = call(base, "POST", "/v1/newsletters", {"name": "Shop", "from": "Shop <shop@example.com>"})["id"]
        call(base, "POST", f"/v1/newsletters/{newsletter}/subscribers",
             [{"email": f"c{i}@example.org", "name": f"Customer {i}"} for i in range(args.subscribers)])
        subscribers = [s["id"] for s in call(base, "GET", f"/v1/newsletters/{newsletter}/subscribers?limit=1000")
                       ["items"]]
        print(f"backend {backend}, {args.clients} clients, log {work}/server.log")

        latencies, failures, threads = [], [], []
        share = args.messages // args.clients
        started = time.perf_counter()
        for c in range(args.clients):
            t = threading.Thread(target=poster, args=(port, subscribers, c * share, share, latencies, failures))
            t.start()
            threads.append(t)
        for t in threads:
            t.join()
        accepted_s = time.perf_counter() - started
        total = share * args.clients
        if failures:
            sys.exit(f"{len(failures)} posts failed: {sorted(set(failures))}")
        latencies.sort()
        print(f"accepted {total} messages in {accepted_s:.1f} s: {total / accepted_s:.0f}/s; "
              f"accept latency p50 {percentile(latencies, 0.5) * 1000:.1f} ms, "
              f"p99 {percentile(latencies, 0.99) * 1000:.1f} ms, max {latencies[-1] * 1000:.1f} ms")

        # Accept → sent: each message's queued and sent events.
        queued, sent, after = {}, {}, 0
        deadline = time.monotonic() + 600
        while len(sent) < total:
            page = call(base, "GET", f"/v1/events?after={after}&limit=1000")
            for e in page["events"]:
                if e["type"] == "message.queued":
                    queued[e["data"]["message"]] = e["at_ms"]
                elif e["type"] == "message.sent":
                    sent[e["data"]["message"]] = e["at_ms"]
                elif e["type"] in ("message.failed", "message.skipped"):
                    sys.exit(f"a message did not go out: {e}")
            if page["next"] == after:
                if time.monotonic() > deadline:
                    sys.exit(f"{len(sent)} of {total} sent after 600 s")
                time.sleep(0.2)
            after = page["next"]
        delays = sorted(sent[m] - queued[m] for m in sent)
        last = max(sent.values()) - min(queued.values())
        print(f"accept → SMTP server: p50 {percentile(delays, 0.5)} ms, p99 {percentile(delays, 0.99)} ms, "
              f"max {delays[-1]} ms; all {total} sent {last / 1000:.1f} s after the first accept "
              f"({total / (last / 1000):.0f}/s)")
    finally:
        server.terminate()
        server.wait()
        sink.terminate()


if __name__ == "__main__":
    main()
