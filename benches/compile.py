#!/usr/bin/env python3
"""What a big policy's compilation costs the server: its peak memory and its answers.

Builds the Python example filter (examples/policies/python/filter.py) carrying a string
table of --table-mib MiB (7.5 gives the ~41 MB component issue 24 names; componentize-py's
snapshot adds the rest), with `letterbox plugin build`. Then, for each binary given (the
current one by default; `--binary` again to put an older build beside it in one run):
starts `letterbox serve` on a fresh data directory, waits until the built-in policies
are ready, uploads the component and polls until it is ready, probing /healthz every
20 ms. Prints the server's peak RSS (VmHWM) after its first start and after the
compile, the compile's time, /healthz latency meanwhile, and the compiling child's
peak RSS from the server's log (none when the binary compiles in process).

Needs `cargo build --release` and componentize-py on PATH:

    PATH="$(.ci/policy-tools):$PATH" python3 benches/compile.py [--table-mib 7.5]
        [--binary target/release/letterbox] [--binary /tmp/letterbox-base]
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN = "letterbox-bench-token-0123456789"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(base, path):
    request = urllib.request.Request(base + path)
    request.add_header("authorization", f"Bearer {TOKEN}")
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def vm(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # MiB
    return 0.0


def build(binary, table_mib, work):
    subprocess.run([binary, "plugin", "new", "big", "--lang", "python", "--kind", "filter"],
                   cwd=work, check=True, stdout=subprocess.DEVNULL)
    source = open(os.path.join(ROOT, "examples", "policies", "python", "filter.py")).read()
    # Distinct strings, so neither Python nor the snapshot can share them.
    count = int(table_mib * (1 << 20) / 64)
    table = "".join(f"{i:063d}\n" for i in range(count))
    source += f"\nTABLE = {table!r}.split()\n"
    with open(os.path.join(work, "big", "policy.py"), "w") as f:
        f.write(source)
    started = time.monotonic()
    subprocess.run([binary, "plugin", "build", "big"], cwd=work, check=True, stdout=subprocess.DEVNULL)
    path = os.path.join(work, "big", "policy.wasm")
    print(f"built {os.path.getsize(path) / 1e6:.1f} MB in {time.monotonic() - started:.0f} s", flush=True)
    return path


def wait_ready(base, name, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        versions = get(base, f"/v1/plugins/{name}")["versions"]
        status = versions[-1]["status"]
        if status == "ready":
            return
        if status == "failed":
            raise SystemExit(f"{name} failed: {versions[-1].get('error')}")
        time.sleep(0.02)
    raise SystemExit(f"{name} not ready after {timeout} s")


def run(binary, wasm):
    data = tempfile.mkdtemp(prefix="letterbox-compile-")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(os.path.join(data, "server.log"), "w+")
    env = {**os.environ, "LETTERBOX_API_TOKEN": TOKEN, "LETTERBOX_LOG_FORMAT": "json"}
    server = subprocess.Popen([binary, "serve", "--listen", f"127.0.0.1:{port}", "--data", data],
                              env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                get(base, "/healthz")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("the server did not start")
                time.sleep(0.05)
        for name in ("default-filter", "default-template"):
            wait_ready(base, name)
        first_start = vm(server.pid, "VmHWM")
        with open(wasm, "rb") as f:
            body = f.read()
        request = urllib.request.Request(base + "/v1/plugins?kind=filter&name=big", data=body, method="POST")
        request.add_header("authorization", f"Bearer {TOKEN}")
        request.add_header("content-type", "application/wasm")
        started = time.monotonic()
        with urllib.request.urlopen(request, timeout=120) as response:
            response.read()
        upload = time.monotonic() - started
        probes = []
        deadline = time.monotonic() + 300
        while True:
            t = time.monotonic()
            urllib.request.urlopen(base + "/healthz", timeout=30).read()
            probes.append((time.monotonic() - t) * 1000)
            versions = get(base, "/v1/plugins/big")["versions"]
            if versions[-1]["status"] != "compiling":
                status = versions[-1]["status"]
                break
            if time.monotonic() > deadline:
                raise SystemExit("still compiling after 300 s")
            time.sleep(0.02)
        ready = time.monotonic() - started
        peak = vm(server.pid, "VmHWM")
        log.flush()
        log.seek(0)
        child = None
        for line in log:
            if "compiled in a child process" in line and '"big"' in line:
                child = json.loads(line).get("fields", {}).get("child_peak_rss_mib")
        probes.sort()
        p = lambda q: probes[min(len(probes) - 1, int(q * len(probes)))]
        return {
            "status": status,
            "upload_s": upload,
            "ready_s": ready,
            "first_start_mib": first_start,
            "peak_mib": peak,
            "child_mib": child,
            "healthz_p50": p(0.5),
            "healthz_p99": p(0.99),
            "healthz_max": probes[-1],
            "probes": len(probes),
        }
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(data, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table-mib", type=float, default=7.5)
    parser.add_argument("--binary", action="append")
    args = parser.parse_args()
    binaries = args.binary or [os.path.join(ROOT, "target", "release", "letterbox")]
    work = tempfile.mkdtemp(prefix="letterbox-compile-build-")
    try:
        wasm = build(binaries[0], args.table_mib, work)
        for binary in binaries:
            r = run(binary, wasm)
            child = "in process" if r["child_mib"] is None else f"{r['child_mib']} MiB"
            print(
                f"{binary}: {r['status']}; upload {r['upload_s'] * 1000:.0f} ms, ready after {r['ready_s']:.1f} s; "
                f"server peak RSS {r['first_start_mib']:.0f} MiB after the first start, "
                f"{r['peak_mib']:.0f} MiB after the compile; compiler {child}; "
                f"/healthz p50 {r['healthz_p50']:.1f} ms, p99 {r['healthz_p99']:.1f} ms, "
                f"max {r['healthz_max']:.1f} ms over {r['probes']} probes",
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
