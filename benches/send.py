#!/usr/bin/env python3
"""Send throughput: letterbox vs Postfix's smtp-source, side by side, into one smtp-sink.

Starts `smtp-sink`, then `letterbox serve --smtp` (the release binary) on a fresh data
directory, creates N subscribers, sends one ~3 KB letter through the default filter and
template at concurrency C, and times it from the send request to job completion. Then
times `smtp-source -d -s C -m N -l 3000` against the same sink. Prints both rates and
their ratio. Needs: `cargo build --release`, Debian package `postfix` (smtp-sink,
smtp-source).

    python3 benches/send.py [--recipients 20000] [--concurrency 32]
"""

import argparse
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


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(base, method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, method=method)
    if data is not None:
        request.add_header("content-type", "application/json")
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def tool(name):
    for candidate in (shutil.which(name), f"/usr/sbin/{name}"):
        if candidate and os.path.exists(candidate):
            return candidate
    sys.exit(f"{name} not found: apt-get install postfix")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipients", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    n, c = args.recipients, args.concurrency
    if not os.path.exists(BINARY):
        sys.exit("build first: cargo build --release")

    sink_port = free_port()
    sink = subprocess.Popen([tool("smtp-sink"), "-u", "nobody", f"127.0.0.1:{sink_port}", "512"])
    data = tempfile.mkdtemp(prefix="letterbox-bench-")
    http_port = free_port()
    server = subprocess.Popen(
        [BINARY, "serve", "--listen", f"127.0.0.1:{http_port}", "--data", data,
         "--smtp", f"smtp://127.0.0.1:{sink_port}", "--smtp-pool", str(c)],
        stdout=subprocess.DEVNULL, env={**os.environ, "LETTERBOX_LOG": "warn"})
    base = f"http://127.0.0.1:{http_port}"
    try:
        for _ in range(600):
            try:
                call(base, "GET", "/healthz")
                break
            except OSError:
                time.sleep(0.1)
        newsletter = call(base, "POST", "/v1/newsletters", {"name": "Bench", "from": "Bench <bench@example.com>"})["id"]
        for start in range(0, n, 10000):
            rows = [{"email": f"r{i}@example.org", "name": f"Reader {i}", "attributes": {"plan": "pro"}}
                    for i in range(start, min(n, start + 10000))]
            call(base, "POST", f"/v1/newsletters/{newsletter}/subscribers", rows)
        paragraph = "Hello {{ name }}, this is the weekly letter for the {{ attributes.plan }} plan.\n"
        text = paragraph * (3000 // len(paragraph))
        letter = call(base, "POST", f"/v1/newsletters/{newsletter}/letters",
                      {"subject": "Bench for {{ name }}", "text": text})["id"]

        started = time.monotonic()
        job = call(base, "POST", f"/v1/letters/{letter}/send", {"concurrency": c})["job_id"]
        while True:
            status = call(base, "GET", f"/v1/jobs/{job}")
            if status["state"] not in ("queued", "running"):
                break
            time.sleep(0.05)
        letterbox_s = time.monotonic() - started
        counts = status["counts"]
        if status["state"] != "completed" or counts["delivered"] != n:
            sys.exit(f"job did not deliver everything: {status}")
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(data, ignore_errors=True)

    started = time.monotonic()
    subprocess.run([tool("smtp-source"), "-d", "-s", str(c), "-m", str(n), "-l", "3000",
                    "-f", "a@example.com", "-t", "b@example.org", f"127.0.0.1:{sink_port}"], check=True)
    source_s = time.monotonic() - started
    sink.terminate()
    sink.wait()

    lb, src = n / letterbox_s, n / source_s
    print(f"recipients={n} concurrency={c}")
    print(f"letterbox:   {letterbox_s:8.2f} s  {lb:10.0f} msg/s")
    print(f"smtp-source: {source_s:8.2f} s  {src:10.0f} msg/s")
    print(f"ratio letterbox/smtp-source: {lb / src:.3f}")


if __name__ == "__main__":
    main()
