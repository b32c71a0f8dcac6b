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


def warm(binary, data, port):
    """Starts letterbox on `data` until it answers, then stops it (SIGTERM)."""
    server = subprocess.Popen([binary, "serve", "--listen", f"127.0.0.1:{port}", "--data", data],
                              stdout=subprocess.DEVNULL, env={**ENV, "LETTERBOX_LOG": "warn"})
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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipients", type=int, default=100000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--skip-source", action="store_true", help="only run letterbox")
    parser.add_argument("--binary", default=BINARY, help="the letterbox to measure (A/B of two builds)")
    args = parser.parse_args()
    n, c, binary = args.recipients, args.concurrency, args.binary
    if not os.path.exists(binary):
        sys.exit("build first: cargo build --release")

    sink_port = free_port()
    sink = subprocess.Popen([tool("smtp-sink"), "-u", "nobody", f"127.0.0.1:{sink_port}", "512"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    atexit.register(sink.kill)
    data = tempfile.mkdtemp(prefix="letterbox-bench-")
    http_port = free_port()
    # The very first start compiles the built-in policies (and keeps the compiler's
    # memory for a while); a real server does that once. Warm the compiled cache first,
    # so the peak measured is that of sending.
    warm(binary, data, http_port)
    server = subprocess.Popen(
        [binary, "serve", "--listen", f"127.0.0.1:{http_port}", "--data", data,
         "--smtp", f"smtp://127.0.0.1:{sink_port}", "--smtp-pool", str(c)],
        stdout=open(data + ".log", "w"),
        env={**ENV, "LETTERBOX_LOG": "warn,letterbox::store=info", "NO_COLOR": "1"})
    base = f"http://127.0.0.1:{http_port}"
    try:
        wait_healthy(base)
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

        threads_before, sink_before = cpu_by_thread(server.pid), cpu_of(sink.pid)
        started = time.monotonic()
        job = call(base, "POST", f"/v1/letters/{letter}/send", {"concurrency": c})["job_id"]
        while True:
            status = call(base, "GET", f"/v1/jobs/{job}")
            if status["state"] not in ("queued", "running"):
                break
            time.sleep(0.05)
        letterbox_s = time.monotonic() - started
        threads_after, sink_after = cpu_by_thread(server.pid), cpu_of(sink.pid)
        counts = status["counts"]
        if status["state"] != "completed" or counts["delivered"] != n:
            sys.exit(f"job did not deliver everything: {status}")
        with open(f"/proc/{server.pid}/status") as f:
            peak_kib = int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1))
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(data, ignore_errors=True)
        log = data + ".log"
        with open(log) as f:
            for line in f:
                if "store writer stopped" in line:
                    print("  " + line.strip().split("INFO ", 1)[-1])
        os.remove(log)

    lb = n / letterbox_s
    print(f"recipients={n} concurrency={c}")
    print(f"letterbox:   {letterbox_s:8.2f} s  {lb:10.0f} msg/s  peak RSS {peak_kib / 1024:.0f} MiB")
    hz = os.sysconf("SC_CLK_TCK")
    used = {k: (threads_after.get(k, 0) - threads_before.get(k, 0)) / hz for k in threads_after}
    busy = ", ".join(f"{k} {v:.2f}" for k, v in sorted(used.items(), key=lambda kv: -kv[1]) if v > 0)
    print(f"  CPU seconds during the send: letterbox {sum(used.values()):.2f} ({busy}); "
          f"smtp-sink {(sink_after - sink_before) / hz:.2f}")
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
    print(f"smtp-source: {source_s:8.2f} s  {src:10.0f} msg/s")
    print(f"ratio letterbox/smtp-source: {lb / src:.3f}")


if __name__ == "__main__":
    main()
