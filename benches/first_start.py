#!/usr/bin/env python3
"""The first requests on a fresh data directory, as a new user makes them.

Starts `letterbox serve` on an empty data directory (so the built-in policies have never
been compiled), and times, in order: the first /healthz that answers (from the process's
start), GET /v1/newsletters, POST a newsletter, POST a letter with the built-in filter
and template, a letter preview (which runs them, so it waits for their compilation),
and a second POST letter. Prints each, and the server's peak RSS (VmHWM). With several
`--binary`, each runs in turn in one go (`--rounds` times), for a side-by-side view.

    python3 benches/first_start.py [--binary target/release/letterbox] [--binary OTHER]
                                   [--rounds 3]
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN = "letterbox-bench-token-0123456789"


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
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read() or "null")
    except urllib.error.HTTPError as e:
        raise SystemExit(f"{method} {path}: {e.code} {e.read().decode()}")
    return answer, (time.monotonic() - started) * 1000


def hwm(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def once(binary):
    data = tempfile.mkdtemp(prefix="letterbox-first-")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "LETTERBOX_API_TOKEN": TOKEN}
    started = time.monotonic()
    server = subprocess.Popen([binary, "serve", "--listen", f"127.0.0.1:{port}", "--data", data],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                urllib.request.urlopen(base + "/healthz", timeout=30).read()
                break
            except (OSError, urllib.error.URLError):
                if time.monotonic() - started > 60:
                    raise SystemExit("the server did not start")
                time.sleep(0.005)
        times = {"healthz": (time.monotonic() - started) * 1000}
        _, times["list"] = call(base, "GET", "/v1/newsletters")
        newsletter, times["newsletter"] = call(base, "POST", "/v1/newsletters",
                                               {"name": "News", "from": "news@example.org"})
        letter = {"subject": "Hello {{ name }}", "text": "Hi {{ name }}, {{ unsubscribe_url }}"}
        path = f"/v1/newsletters/{newsletter['id']}/letters"
        first, times["letter"] = call(base, "POST", path, letter)
        _, times["preview"] = call(base, "POST", f"/v1/letters/{first['id']}/preview",
                                  {"recipient": {"email": "reader@example.org", "name": "Reader"}})
        _, times["letter2"] = call(base, "POST", path, letter)
        times["rss"] = hwm(server.pid)
        return times
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(data, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--binary", action="append")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    binaries = args.binary or [os.path.join(ROOT, "target", "release", "letterbox")]
    print("binary: first /healthz from spawn | GET newsletters | POST newsletter | "
          "first POST letter | first preview | second POST letter (ms) | peak RSS")
    for _ in range(args.rounds):
        for binary in binaries:
            t = once(binary)
            print(f"{binary}: {t['healthz']:.0f} | {t['list']:.1f} | {t['newsletter']:.1f} | "
                  f"{t['letter']:.1f} | {t['preview']:.0f} | {t['letter2']:.1f} | {t['rss']:.0f} MiB",
                  flush=True)


if __name__ == "__main__":
    main()
