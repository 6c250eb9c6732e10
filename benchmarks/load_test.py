"""Load test of the servers on 127.0.0.1: the HTTP API (``captioner serve``) and the Gradio demo, each started
here, loaded, checked and stopped.

    python benchmarks/load_test.py [--model DIR] [--images DIR] [--levels 1,10,50] [--rounds 4] [--bad 20]
    python benchmarks/load_test.py --smoke          # a few requests: does it all work?

For each target, ``/v1/caption`` of ``captioner serve`` (plain HTTP, one keep-alive connection per client),
``/caption`` of the demo (``gradio_client``, one ``Client`` per client) and ``/v1/caption`` of the demo's own
process, and each concurrency level: the clients are made, connected and warmed by one request
before timing, then each sends ``--rounds`` requests one after another, all clients at once. Every answer is checked against the in-process
caption (``Captioner.caption`` for ``/v1``, ``caption_photo`` for ``/caption``, same engine). Then a burst of
corrupt uploads mixed with photos (each bad one must get its own error, each photo its caption) and one more
request (the server must still serve). Prints p50/p95 latency, throughput and each server's peak resident
memory (VmHWM), and whether the issue's targets were met; exits non-zero if any answer was wrong.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from synthetic import png_header  # noqa: E402

TARGETS = {"p95 at 50 clients": "<= 2 s", "throughput at 50 clients": ">= 30 requests/s", "one request alone": "<= 60 ms"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def memory_mb(pid: int, field: str) -> float:
    """``VmHWM`` (peak) or ``VmRSS`` (now) of a process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def corrupt_files(folder: Path, good: Path) -> list[Path]:
    """Not an image, a truncated photo, an empty file and a decompression bomb."""
    files = {"notes.jpg": b"not a photo at all", "truncated.jpg": good.read_bytes()[:2000], "empty.png": b"",
             "bomb.png": png_header(30000, 30000)}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return [folder / name for name in files]


class Server:
    """A server process on a free port of 127.0.0.1, up once ``/v1/health`` answers."""

    def __init__(self, command: list[str], env: dict[str, str], port: int):
        self.port, self.url = port, f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        started = time.time()
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/v1/health", timeout=2)
                break
            except OSError:
                if self.process.poll() is not None or time.time() - started > 300:
                    raise SystemExit(f"server did not start: {' '.join(command)}") from None
                time.sleep(0.5)
        print(f"  up in {time.time() - started:.1f} s, {memory_mb(self.process.pid, 'VmRSS'):.0f} MB resident")

    def stop(self) -> float:
        """Stop it; its peak resident memory in MB."""
        peak = memory_mb(self.process.pid, "VmHWM")
        self.process.terminate()
        self.process.wait(timeout=30)
        return peak


# ---------------------------------------------------------------------------------------- clients
class ApiClient:
    """One keep-alive connection to ``/v1/caption``; ``call`` returns the best caption or the error's detail."""

    def __init__(self, url: str):
        self.connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=120)
        self.connection.connect()

    def call(self, path: Path) -> tuple[bool, str]:
        self.connection.request("POST", "/v1/caption", body=path.read_bytes(),
                                headers={"Content-Type": "application/octet-stream"})
        response = self.connection.getresponse()
        answer = json.loads(response.read())
        return (True, answer["captions"][0]["text"]) if response.status == 200 else (False, answer["detail"])


class DemoClient:
    """One ``gradio_client.Client`` of the demo's ``/caption``."""

    def __init__(self, url: str):
        from gradio_client import Client

        self.client = Client(url + "/", verbose=False)

    def call(self, path: Path) -> tuple[bool, str]:
        from gradio_client import handle_file

        try:
            return True, self.client.predict(handle_file(str(path)), api_name="/caption")[0]
        except Exception as exc:  # the bad uploads must land here
            return False, str(exc).splitlines()[0]


def load(make_client: Callable[[str], ApiClient | DemoClient], url: str, clients: int, rounds: int,
         photos: list[Path], expected: dict[Path, str], failures: list[str]) -> dict[str, float]:
    """``clients`` clients, made and warmed by one untimed request each, then each sending ``rounds`` photos in turn,
    all at once (a first call's one-off costs, in the client or the server, are not load figures)."""

    def warmed(_) -> ApiClient | DemoClient:
        client = make_client(url)
        client.call(photos[0])
        return client

    with ThreadPoolExecutor(clients) as pool:
        made = list(pool.map(warmed, range(clients)))
        start = threading.Barrier(clients + 1)

        def run(number: int) -> list[float]:
            start.wait()
            seconds = []
            for turn in range(rounds):
                path = photos[(number * rounds + turn) % len(photos)]
                begin = time.perf_counter()
                ok, text = made[number].call(path)
                seconds.append(time.perf_counter() - begin)
                if not ok or text != expected[path]:
                    failures.append(f"{url} {path.name}: got {text!r}, expected {expected[path]!r}")
            return seconds

        runs = [pool.submit(run, number) for number in range(clients)]
        start.wait()
        begin = time.perf_counter()
        latencies = sorted(s for future in runs for s in future.result())
        wall = time.perf_counter() - begin
    return {"clients": clients, "requests": len(latencies), "p50": statistics.median(latencies),
            "p95": latencies[math.ceil(0.95 * len(latencies)) - 1], "throughput": len(latencies) / wall}


def burst(make_client: Callable[[str], ApiClient | DemoClient], url: str, photos: list[Path], bad: list[Path],
          count: int, expected: dict[Path, str], failures: list[str]) -> None:
    """``count`` corrupt uploads mixed with as many photos, 16 at a time; then one more photo."""
    mixed = [bad[i % len(bad)] for i in range(count)] + [photos[i % len(photos)] for i in range(count)]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda path: (path, make_client(url).call(path)), mixed))
    refused = sum(not ok for path, (ok, _) in answers if path in bad)
    right = sum(ok and text == expected[path] for path, (ok, text) in answers if path not in bad)
    print(f"  mixed burst: {refused}/{count} corrupt uploads refused with an error, {right}/{count} photos right")
    for message in sorted({text[:110] for path, (ok, text) in answers if path in bad}):
        print(f"    error: {message}")
    if refused != count or right != count:
        failures.append(f"{url}: the mixed burst had wrong answers")
    ok, text = make_client(url).call(photos[0])
    print(f"  still serving after the burst: {ok and text == expected[photos[0]]}")
    if not (ok and text == expected[photos[0]]):
        failures.append(f"{url}: stopped answering after the burst")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint directory (default: the bundled model)")
    parser.add_argument("--images", help="folder of photos to send (default: assets/examples); at most 200 used")
    parser.add_argument("--levels", default="1,10,50", help="concurrent clients, comma-separated (default: 1,10,50)")
    parser.add_argument("--rounds", type=int, default=4, help="requests each client sends in turn (default: 4)")
    parser.add_argument("--bad", type=int, default=20, help="corrupt uploads in the mixed burst (default: 20)")
    parser.add_argument("--server-args", default="", help="more options for both servers, e.g. '--max-batch 1'")
    parser.add_argument("--targets", default="serve,demo", help="serve (captioner serve), demo, or both")
    parser.add_argument("--smoke", action="store_true", help="levels 1,2, one round, 4 bad uploads: a quick check")
    args = parser.parse_args()
    if args.smoke:
        args.levels, args.rounds, args.bad = "1,2", 1, 4
    levels = [int(level) for level in args.levels.split(",")]

    from captioner import Captioner
    from captioner.serve.webapp import caption_photo

    folder = Path(args.images) if args.images else ROOT / "assets" / "examples"
    photos = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:200]
    model = Captioner.from_pretrained(args.model)
    expected_api = {p: model.caption(str(p)) for p in photos}
    expected_demo = {p: caption_photo(model, str(p)).best for p in photos}
    model_args = (["--model", args.model] if args.model else []) + args.server_args.split()
    failures: list[str] = []
    rows: list[tuple[str, dict[str, float]]] = []
    peaks: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as scratch:
        bad = corrupt_files(Path(scratch), photos[0])
        if "serve" in args.targets:
            port = free_port()
            print("captioner serve:")
            server = Server([sys.executable, "-m", "captioner", "serve", "--port", str(port), *model_args], {}, port)
            try:
                rows += [("serve /v1/caption", load(ApiClient, server.url, n, args.rounds, photos, expected_api,
                                                    failures)) for n in levels]
                burst(ApiClient, server.url, photos, bad, args.bad, expected_api, failures)
            finally:
                peaks["captioner serve"] = server.stop()
        if "demo" in args.targets:
            port = free_port()
            print("demo (app.py):")
            server = Server([sys.executable, "app.py", *model_args],
                            {"GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_SERVER_NAME": "127.0.0.1",
                             "GRADIO_SERVER_PORT": str(port)}, port)
            try:
                rows += [("demo /caption (gradio_client)", load(DemoClient, server.url, n, args.rounds, photos,
                                                               expected_demo, failures)) for n in levels]
                rows += [("demo /v1/caption", load(ApiClient, server.url, n, args.rounds, photos, expected_api,
                                                   failures)) for n in levels]
                burst(DemoClient, server.url, photos, bad, args.bad, expected_demo, failures)
            finally:
                peaks["demo"] = server.stop()

    print(f"\n| endpoint | clients | requests | p50 | p95 | throughput |\n|---|---|---|---|---|---|")
    for name, row in rows:
        print(f"| {name} | {row['clients']} | {row['requests']} | {row['p50'] * 1000:.0f} ms | "
              f"{row['p95'] * 1000:.0f} ms | {row['throughput']:.1f} req/s |")
    for name, peak in peaks.items():
        print(f"peak resident memory, {name}: {peak:.0f} MB")
    serve = {row["clients"]: row for name, row in rows if name == "serve /v1/caption"}
    if 50 in serve and 1 in serve:
        met = [serve[50]["p95"] <= 2, serve[50]["throughput"] >= 30, serve[1]["p50"] <= 0.060]
        for (target, bound), ok in zip(TARGETS.items(), met):
            print(f"target {target} {bound}: {'met' if ok else 'NOT met'}")
    for failure in failures[:20]:
        print(f"FAILED: {failure}", file=sys.stderr)
    print("all answers right" if not failures else f"{len(failures)} wrong answers")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
