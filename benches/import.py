#!/usr/bin/env python3
"""Subscriber import: rows/s and peak memory for one CSV file streamed to letterbox.

Writes a CSV of N rows (email, name and two attribute columns, ~60 bytes a row) to a
temporary file, starts `letterbox serve` (the release binary) on a fresh data directory,
and POSTs the file as `text/csv` to /v1/newsletters/{id}/subscribers, streamed from disk.
Prints rows/s over the upload and letterbox's peak RSS (VmHWM) over the whole run, and
its RSS before the upload. Needs `cargo build --release`.

    python3 benches/import.py [--rows 1000000] [--binary target/release/letterbox]
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from send import BINARY, ENV, TOKEN, call, free_port, wait_healthy, warm  # noqa: E402


def rss_kib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(field + r":\s+(\d+) kB", f.read()).group(1))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1000000)
    parser.add_argument("--binary", default=BINARY)
    args = parser.parse_args()
    if not os.path.exists(args.binary):
        sys.exit("build first: cargo build --release")

    data = tempfile.mkdtemp(prefix="letterbox-import-")
    csv_path = data + ".csv"
    with open(csv_path, "w") as f:
        f.write("email,name,plan,city\n")
        for i in range(args.rows):
            f.write(f"reader{i}@example.org,Reader {i},{('free', 'pro', 'team')[i % 3]},Town {i % 97}\n")
    size = os.path.getsize(csv_path)

    port = free_port()
    warm(args.binary, data, port)
    server = subprocess.Popen([args.binary, "serve", "--listen", f"127.0.0.1:{port}", "--data", data],
                              stdout=subprocess.DEVNULL, env={**ENV, "LETTERBOX_LOG": "warn"})
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base)
        newsletter = call(base, "POST", "/v1/newsletters", {"name": "Import", "from": "news@example.com"})["id"]
        before_kib = rss_kib(server.pid, "VmRSS")
        with open(csv_path, "rb") as body:
            request = urllib.request.Request(f"{base}/v1/newsletters/{newsletter}/subscribers", data=body,
                                             method="POST")
            request.add_header("content-type", "text/csv")
            request.add_header("authorization", f"Bearer {TOKEN}")
            request.add_header("content-length", str(size))
            started = time.monotonic()
            with urllib.request.urlopen(request, timeout=3600) as response:
                summary = json.loads(response.read())
            seconds = time.monotonic() - started
        peak_kib = rss_kib(server.pid, "VmHWM")
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(data, ignore_errors=True)
        os.remove(csv_path)

    if summary["inserted"] != args.rows:
        sys.exit(f"not every row was imported: {summary}")
    print(f"rows={args.rows} file={size / 1e6:.1f} MB")
    print(f"import: {seconds:.2f} s  {args.rows / seconds:,.0f} rows/s")
    print(f"RSS before the upload {before_kib / 1024:.0f} MiB, peak over the run {peak_kib / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
