#!/usr/bin/env python3
"""The web console's page times over a big list: every page a newcomer opens, timed as a
browser asks for it (signed in, with the session cookie), over a newsletter of
`--subscribers` (default 1,000,000), on redb and with `--database` on PostgreSQL.

Starts `letterbox serve` (the release binary) on a fresh data directory (or a fresh
PostgreSQL database), imports the subscribers as one streamed CSV file, signs in through
the console's form, then asks for each page `--repeat` times and prints the median and
the slowest time of each, and the slowest page of all. The issue's target: no page
slower than 200 ms at 1,000,000 subscribers.

    python3 benches/console.py [--subscribers 1000000] [--repeat 5]
                               [--binary target/release/letterbox] [--database URL|auto] [--vacuum]
"""

import argparse
import http.client
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from send import BINARY, ENV, TOKEN, Cluster, call, free_port, psql, scratch_database, wait_healthy, warm  # noqa: E402


def csv_rows(n):
    """The import's body, in chunks: a rare name every 250,000 rows, a plan attribute."""
    yield b"email,name,plan\n"
    chunk = []
    for i in range(n):
        name = f"Rare Zebra {i}" if i % 250_000 == 123 else f"Reader {i}"
        plan = "pro" if i % 10 == 0 else "free"
        chunk.append(f"r{i}@example.org,{name},{plan}\n")
        if len(chunk) == 10_000:
            yield "".join(chunk).encode()
            chunk = []
    if chunk:
        yield "".join(chunk).encode()


class Browser:
    """One keep-alive connection with the session cookie, as a browser would hold."""

    def __init__(self, port):
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        self.cookie = None

    def request(self, method, path, body=None, headers=None):
        headers = dict(headers or {})
        if self.cookie:
            headers["cookie"] = self.cookie
        started = time.perf_counter()
        self.connection.request(method, path, body, headers)
        response = self.connection.getresponse()
        data = response.read()
        elapsed = time.perf_counter() - started
        return response, data, elapsed

    def sign_in(self):
        body = urllib.parse.urlencode({"token": TOKEN, "next": "/console"})
        response, _, _ = self.request("POST", "/console/sign-in", body,
                                      {"content-type": "application/x-www-form-urlencoded"})
        if response.status != 303:
            sys.exit(f"sign-in answered {response.status}")
        self.cookie = response.getheader("set-cookie").split(";")[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subscribers", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--binary", default=BINARY)
    parser.add_argument("--database", help="a PostgreSQL superuser URL, or auto for a throwaway cluster")
    parser.add_argument("--vacuum", action="store_true",
                        help="PostgreSQL: VACUUM ANALYZE after the import (what autovacuum does soon after), "
                             "instead of timing the pages at once")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="letterbox-console-")
    env = {**ENV, "LETTERBOX_LOG": "warn", "NO_COLOR": "1"}
    backend = "redb"
    if args.database:
        admin = Cluster().url if args.database == "auto" else args.database
        env["LETTERBOX_DATABASE_URL"], _ = scratch_database(admin, "console")
        backend = "postgres"
    port = free_port()
    warm(args.binary, f"{work}/data", port, env)
    server = subprocess.Popen([args.binary, "serve", "--listen", f"127.0.0.1:{port}", "--data", f"{work}/data"],
                              stdout=open(f"{work}/server.log", "w"), stderr=subprocess.STDOUT, env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base)
        newsletter = call(base, "POST", "/v1/newsletters", {"name": "Big", "from": "Big <big@example.com>"})["id"]
        started = time.perf_counter()
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
        connection.request("POST", f"/v1/newsletters/{newsletter}/subscribers", csv_rows(args.subscribers),
                           {"authorization": f"Bearer {TOKEN}", "content-type": "text/csv",
                            "transfer-encoding": "chunked"}, encode_chunked=True)
        response = connection.getresponse()
        summary = response.read().decode()
        if response.status != 201:
            sys.exit(f"import answered {response.status}: {summary}")
        print(f"backend {backend}: imported {args.subscribers} subscribers in "
              f"{time.perf_counter() - started:.0f} s; log {work}/server.log")
        if args.vacuum and backend == "postgres":
            psql(env["LETTERBOX_DATABASE_URL"], "VACUUM ANALYZE subscribers")
            print("vacuumed and analysed the subscribers table")
        # A small newsletter with a finished job, for the letter and job pages.
        small = call(base, "POST", "/v1/newsletters", {"name": "Small", "from": "Small <s@example.com>"})["id"]
        call(base, "POST", f"/v1/newsletters/{small}/subscribers",
             [{"email": f"s{i}@example.org"} for i in range(100)])
        letter = call(base, "POST", f"/v1/newsletters/{small}/letters", {"subject": "Hi {{ name }}", "text": "Hi"})["id"]
        big_letter = call(base, "POST", f"/v1/newsletters/{newsletter}/letters",
                          {"subject": "Hi {{ name }}", "text": "Hi {{ name }}"})["id"]
        job = call(base, "POST", f"/v1/letters/{letter}/send", {})["job_id"]
        for _ in range(600):
            if call(base, "GET", f"/v1/jobs/{job}")["state"] == "completed":
                break
            time.sleep(0.1)
        middle = call(base, "GET", f"/v1/newsletters/{newsletter}/subscribers?limit=1&cursor="
                      f"{args.subscribers // 2}")["items"][0]["id"]
        last = call(base, "GET", f"/v1/newsletters/{newsletter}/subscribers?email=r{args.subscribers - 1}"
                    "%40example.org")["items"][0]["id"]

        browser = Browser(port)
        browser.sign_in()
        _, page, _ = browser.request("GET", f"/console/letters/{big_letter}")
        csrf = re.search(rb'name="_csrf" value="([0-9a-f]+)"', page).group(1).decode()
        draft = urllib.parse.urlencode({"_csrf": csrf, "subject": "Hi {{ name }}", "text": "Hi {{ name }}",
                                        "html": "", "filter": "default-filter", "template": "default-template",
                                        "params": "", "preview_as": str(middle)})
        form = {"content-type": "application/x-www-form-urlencoded"}
        subscribers = f"/console/newsletters/{newsletter}/subscribers"
        pages = [
            ("newsletters", "GET", "/console/newsletters", None),
            ("newsletter", "GET", f"/console/newsletters/{newsletter}", None),
            ("subscribers, first page", "GET", subscribers, None),
            ("subscribers, middle page", "GET", f"{subscribers}?after={middle}", None),
            ("subscribers, last page", "GET", f"{subscribers}?after={last - 10}", None),
            ("search: common text", "GET", f"{subscribers}?q=reader", None),
            ("search: rare text (one look)", "GET", f"{subscribers}?q=zebra", None),
            ("search: rare text, far on", "GET", f"{subscribers}?q=zebra&after={middle}", None),
            ("search: status with no match", "GET", f"{subscribers}?status=bounced", None),
            ("search: attribute", "GET", f"{subscribers}?attribute=plan%3Dpro", None),
            ("subscriber", "GET", f"/console/subscribers/{middle}", None),
            ("letter editor", "GET", f"/console/letters/{big_letter}", None),
            ("draft check", "POST", f"/console/newsletters/{newsletter}/draft/check", draft),
            ("draft preview", "POST", f"/console/newsletters/{newsletter}/draft/preview", draft),
            ("jobs", "GET", "/console/jobs", None),
            ("job", "GET", f"/console/jobs/{job}", None),
            ("job, failed deliveries", "GET", f"/console/jobs/{job}?state=failed", None),
        ]
        slowest = ("", 0.0)
        print(f"{'page':34} {'median':>9} {'slowest':>9}")
        for label, method, path, body in pages:
            times = []
            for _ in range(args.repeat):
                response, data, elapsed = browser.request(method, path, body, form if body else None)
                if response.status != 200:
                    sys.exit(f"{label}: {method} {path} answered {response.status}: {data[:300]!r}")
                times.append(elapsed)
            times.sort()
            median, worst = times[len(times) // 2], times[-1]
            print(f"{label:34} {median * 1000:7.1f} ms {worst * 1000:7.1f} ms")
            if worst > slowest[1]:
                slowest = (label, worst)
        print(f"slowest page: {slowest[0]}, {slowest[1] * 1000:.1f} ms (target: 200 ms)")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
