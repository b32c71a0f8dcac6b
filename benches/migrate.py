#!/usr/bin/env python3
"""`letterbox migrate` at scale: a single-node installation with N subscribers and one
completed N-recipient job (so N deliveries) is copied into an empty PostgreSQL database
(a throwaway cluster of Debian's `postgresql`, or --database URL, a superuser's); prints
how long the copy took, records per second and the migrate process's peak RSS.
Needs `cargo build --release` and Debian packages `postfix`, `postgresql` and `time`.

    python3 benches/migrate.py [--recipients 200000] [--database URL]
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import send  # noqa: E402  (the send benchmark's helpers: servers, sink, cluster)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipients", type=int, default=200000)
    parser.add_argument("--database", help="postgres://… (a superuser's URL); default: a throwaway cluster")
    args = parser.parse_args()
    n = args.recipients
    admin = args.database or send.Cluster().url
    sink_port = send.free_port()
    sink = subprocess.Popen([send.tool("smtp-sink"), "-u", "nobody", f"127.0.0.1:{sink_port}", "512"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    data = tempfile.mkdtemp(prefix="letterbox-migrate-")
    port = send.free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([send.BINARY, "serve", "--listen", f"127.0.0.1:{port}", "--data", data,
                               "--smtp", f"smtp://127.0.0.1:{sink_port}"],
                              stdout=subprocess.DEVNULL, env={**send.ENV, "LETTERBOX_LOG": "warn"})
    try:
        send.wait_healthy(base)
        newsletter = send.call(base, "POST", "/v1/newsletters", {"name": "M", "from": "M <m@example.com>"})["id"]
        for start in range(0, n, 10000):
            rows = [{"email": f"r{i}@example.org", "name": f"Reader {i}", "attributes": {"plan": "pro"}}
                    for i in range(start, min(n, start + 10000))]
            send.call(base, "POST", f"/v1/newsletters/{newsletter}/subscribers", rows)
        letter = send.call(base, "POST", f"/v1/newsletters/{newsletter}/letters",
                           {"subject": "Hi {{ name }}", "text": "Hello {{ name }}\n"})["id"]
        job = send.call(base, "POST", f"/v1/letters/{letter}/send", {"concurrency": 32})["job_id"]
        while send.call(base, "GET", f"/v1/jobs/{job}")["state"] in ("queued", "running"):
            time.sleep(0.2)
    finally:
        server.terminate()
        server.wait()
        sink.kill()
    size = os.path.getsize(os.path.join(data, "letterbox.redb"))
    url, _ = send.scratch_database(admin, "migrate")
    started = time.monotonic()
    run = subprocess.run(["/usr/bin/time", "-v", send.BINARY, "migrate", "--from", data, "--to", url],
                         capture_output=True, text=True, env={**os.environ, "LETTERBOX_LOG": "warn"})
    seconds = time.monotonic() - started
    shutil.rmtree(data, ignore_errors=True)
    if run.returncode != 0:
        sys.exit(f"migrate failed:\n{run.stdout}{run.stderr}")
    peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr).group(1))
    records = 2 * n
    print(run.stdout.strip())
    print(f"redb file {size / 2**20:.0f} MiB; {records} subscribers + deliveries in {seconds:.1f} s "
          f"({records / seconds:,.0f} records/s), migrate peak RSS {peak / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
