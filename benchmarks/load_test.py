"""Bounded load test of the Gradio app, on 127.0.0.1 only; it starts the server, loads it, and stops it.

    python benchmarks/load_test.py [--model DIR] [--requests 50] [--bad 20]

1. ``--requests`` concurrent ``/caption`` calls through ``gradio_client``, each with a real photo:
   every one must be answered with the caption the model gives that photo directly.
2. A burst of corrupt uploads (not images, truncated files, empty files, a decompression bomb) mixed
   with good photos: every bad one must get an error, every good one its caption.
3. The server must still answer afterwards.
Prints latency p50/p95, throughput, and the server's peak resident memory (VmHWM from /proc).
Exits non-zero if any check fails.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from synthetic import png_header  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def peak_memory_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def current_memory_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def photos(count: int) -> list[Path]:
    examples = sorted((ROOT / "assets" / "examples").glob("*.jpg"))
    return [examples[i % len(examples)] for i in range(count)]


def corrupt_files(folder: Path, good: Path) -> list[Path]:
    text = folder / "notes.jpg"
    text.write_text("not a photo at all")
    truncated = folder / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:2000])
    empty = folder / "empty.png"
    empty.write_bytes(b"")

    bomb = folder / "bomb.png"
    bomb.write_bytes(png_header(30000, 30000))
    return [text, truncated, empty, bomb]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint directory (default: the bundled model)")
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--bad", type=int, default=20, help="corrupt uploads in the mixed burst")
    args = parser.parse_args()

    from gradio_client import Client, handle_file

    from captioner import Captioner
    from captioner.serve.webapp import caption_photo

    model = Captioner.from_pretrained(args.model, device="cpu")
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_SERVER_NAME": "127.0.0.1",
           "GRADIO_SERVER_PORT": str(port)}
    command = [sys.executable, str(ROOT / "app.py")] + (["--model", args.model] if args.model else [])
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    failures: list[str] = []
    try:
        url = f"http://127.0.0.1:{port}/"
        started = time.time()
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.time() - started > 180:
                    print("server did not start", file=sys.stderr)
                    return 1
                time.sleep(0.5)
        print(f"server up in {time.time() - started:.1f} s, {current_memory_mb(server.pid):.0f} MB resident")
        images = photos(args.requests)
        expected = {p: caption_photo(model, str(p)).best for p in set(images)}

        def call(path: Path):
            client = Client(url, verbose=False)
            begin = time.perf_counter()
            try:
                result = client.predict(handle_file(str(path)), api_name="/caption")[0]
            except Exception as exc:  # the bad uploads must land here
                result = exc
            return path, result, time.perf_counter() - begin

        begin = time.perf_counter()
        with ThreadPoolExecutor(args.requests) as pool:
            results = list(pool.map(call, images))
        wall = time.perf_counter() - begin
        latencies = sorted(seconds for _, _, seconds in results)
        for path, result, _ in results:
            if result != expected[path]:
                failures.append(f"{path.name}: got {result!r}, expected {expected[path]!r}")
        p50, p95 = statistics.median(latencies), latencies[int(0.95 * (len(latencies) - 1))]
        print(f"{args.requests} concurrent requests: all answered in {wall:.1f} s ({args.requests / wall:.2f} req/s), "
              f"latency p50 {p50:.2f} s, p95 {p95:.2f} s, max {latencies[-1]:.2f} s")

        with tempfile.TemporaryDirectory() as folder:
            bad = corrupt_files(Path(folder), images[0])
            burst = [bad[i % len(bad)] for i in range(args.bad)] + photos(args.bad)
            with ThreadPoolExecutor(16) as pool:
                mixed = list(pool.map(call, burst))
            bad_answers = [r for p, r, _ in mixed if p in bad]
            good_answers = [(p, r) for p, r, _ in mixed if p not in bad]
            refused = sum(isinstance(r, Exception) for r in bad_answers)
            correct = sum(r == expected.get(p) or r == caption_photo(model, str(p)).best for p, r in good_answers)
            print(f"mixed burst: {refused}/{len(bad_answers)} corrupt uploads refused with an error, "
                  f"{correct}/{len(good_answers)} good photos captioned correctly")
            if refused != len(bad_answers) or correct != len(good_answers):
                failures.append("mixed burst had wrong answers")
            messages = sorted({str(r).splitlines()[0][:110] for r in bad_answers if isinstance(r, Exception)})
            for message in messages:
                print(f"  error shown: {message}")
        still_up = call(images[0])[1] == expected[images[0]]
        print(f"server still serving after the burst: {still_up}; peak resident memory "
              f"{peak_memory_mb(server.pid):.0f} MB")
        if not still_up:
            failures.append("server stopped answering")
    finally:
        server.terminate()
        server.wait(timeout=30)
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
