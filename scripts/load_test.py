"""Load test of a tops-serve server through the real `openai` client: C concurrent clients x R
requests each, streamed and not, with a share of bad requests. Prints latency percentiles, errors
by kind, the requests lost (no answer at all: must be 0) and the server's RSS before and after.

    # start the server itself (python -m tops_edge.serve DIR --port 0), then stop it
    python scripts/load_test.py --serve out/tiny --clients 8 --requests 125
    # or against a running server, whose pid gives its RSS
    python scripts/load_test.py --base-url http://127.0.0.1:8000 --pid "$(pgrep -f 'tops-serve out/tiny')"

Needs the serve extra and openai (pip install -e ".[dev]"). RSS is read from /proc/PID/status
(Linux), after a warm-up (`--warmup` requests) and after the run.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["What shapes are in the picture?", "How many objects are there?", "What colour is the largest shape?",
           "Describe the image."]
#: the bad requests sent, in turn, and the status each must get
BAD = ("corrupt_image", "two_images", "unknown_field", "wrong_type")
BAD_STATUS = {"corrupt_image": 400, "two_images": 400, "unknown_field": 422, "wrong_type": 422}


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def start_server(directory: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    """python -m tops_edge.serve DIR --port 0: its base URL from the startup line; its log drained."""
    proc = subprocess.Popen([sys.executable, "-m", "tops_edge.serve", directory, "--port", "0", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # (the access log: stdout)
    for line in proc.stderr:
        match = re.search(r"(http://[^ ]+):(\d+)/v1", line)
        if match:
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return proc, f"{match.group(1)}:{match.group(2)}"
    proc.wait()
    sys.exit(f"load_test: the server did not start (exit {proc.returncode})")


class Run:
    def __init__(self, base: str, model: str, api_key: str, image_uri: str, max_tokens: int, timeout: float,
                 pid: int | None = None):
        self.base, self.model, self.api_key, self.image_uri = base, model, api_key, image_uri
        self.max_tokens, self.timeout, self.pid = max_tokens, timeout, pid
        self.lock = threading.Lock()
        self.results: list[dict] = []
        self.total = 0  # requests this phase sends (for the RSS samples at each quarter)
        self.rss_samples: list[tuple[int, int]] = []  # (requests done, RSS KiB)

    def client(self):
        import openai

        return openai.OpenAI(base_url=self.base + "/v1", api_key=self.api_key, max_retries=0, timeout=self.timeout)

    def messages(self, prompt: str, images: int = 1, url: str | None = None) -> list:
        parts = [{"type": "image_url", "image_url": {"url": url or self.image_uri}}] * images
        return [{"role": "user", "content": parts + [{"type": "text", "text": prompt}]}]

    def one(self, c, kind: str, stream: bool, prompt: str) -> dict:
        """One request: its kind, latency, TTFT (streams), outcome ("ok", "http STATUS CODE" or "lost: WHY")."""
        import openai

        args = dict(model=self.model, messages=self.messages(prompt), max_tokens=self.max_tokens)
        if kind == "corrupt_image":
            args["messages"] = self.messages(prompt, url="data:image/png;base64," + base64.b64encode(os.urandom(256)).decode())
        elif kind == "two_images":
            args["messages"] = self.messages(prompt, images=2)
        elif kind == "unknown_field":
            args["extra_body"] = {"frobnicate": True}
        elif kind == "wrong_type":
            args["temperature"] = "warm"
        t0 = time.perf_counter()
        ttft = None
        try:
            if stream:
                finished = False
                for chunk in c.chat.completions.create(stream=True, **args):
                    if ttft is None and chunk.choices and chunk.choices[0].delta.content:
                        ttft = time.perf_counter() - t0
                    finished = finished or bool(chunk.choices and chunk.choices[0].finish_reason)
                outcome = "ok" if finished else "lost: the stream ended without a finish_reason"
            else:
                r = c.chat.completions.create(**args)
                outcome = "ok" if r.choices[0].finish_reason in ("stop", "length") else "lost: no finish_reason"
        except openai.APIStatusError as exc:
            try:
                code = exc.response.json()["error"]["code"]
            except (ValueError, KeyError, TypeError):
                code = "not an OpenAI error body"
            outcome = f"http {exc.status_code} {code}"
        except openai.APIConnectionError as exc:  # no answer at all: refused, reset, timed out
            outcome = f"lost: {type(exc).__name__}"
        except openai.APIError as exc:  # an error event inside a stream
            outcome = f"stream error {getattr(exc, 'code', None) or exc}"
        except Exception as exc:  # noqa: BLE001  (anything else: no usable answer either)
            outcome = f"lost: {type(exc).__name__}"
        return {"kind": kind, "stream": stream, "latency": time.perf_counter() - t0, "ttft": ttft, "outcome": outcome}

    def client_loop(self, index: int, n: int, bad_share: float, stream_share: float, seed: int,
                    start: threading.Barrier) -> None:
        rng = random.Random(seed * 1000 + index)
        c = self.client()
        start.wait()
        for j in range(n):
            bad = rng.random() < bad_share
            kind = BAD[(index + j) % len(BAD)] if bad else "good"
            result = self.one(c, kind, rng.random() < stream_share, rng.choice(PROMPTS))
            with self.lock:
                self.results.append(result)
                done = len(self.results)
                if self.pid and self.total and done % max(1, self.total // 4) == 0:
                    self.rss_samples.append((done, rss_kib(self.pid)))

    def phase(self, clients: int, per_client: int, bad_share: float, stream_share: float, seed: int) -> float:
        """clients x per_client requests, the clients released at once; returns the wall time."""
        self.results, self.rss_samples, self.total = [], [], clients * per_client
        start = threading.Barrier(clients)
        threads = [threading.Thread(target=self.client_loop, args=(i, per_client, bad_share, stream_share, seed, start))
                   for i in range(clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - t0


def report(results: list[dict], sent: int, wall: float, rss: tuple[int, int] | None,
           samples: list[tuple[int, int]] = ()) -> tuple[str, int, int]:
    good = [r for r in results if r["kind"] == "good"]
    good_ok = [r for r in good if r["outcome"] == "ok"]
    lost = sent - len(results) + sum(r["outcome"].startswith("lost") for r in results)
    bad = [r for r in results if r["kind"] != "good"]
    bad_wrong = [r for r in bad if not r["outcome"].startswith(f"http {BAD_STATUS[r['kind']]} ")]
    lines = [f"requests: {sent} sent, {len(results)} answered, {lost} lost, in {wall:.1f} s "
             f"({len(results) / wall:.1f} req/s)"]

    def dist(name, values):
        ms = [v * 1e3 for v in values]
        return (f"{name}: p50 {percentile(ms, 50):.0f} ms, p90 {percentile(ms, 90):.0f} ms, "
                f"p99 {percentile(ms, 99):.0f} ms, max {max(ms, default=float('nan')):.0f} ms (n={len(ms)})")

    lines.append(dist("latency, good requests", [r["latency"] for r in good_ok]))
    lines.append(dist("  not streamed", [r["latency"] for r in good_ok if not r["stream"]]))
    lines.append(dist("  streamed", [r["latency"] for r in good_ok if r["stream"]]))
    lines.append(dist("  streamed, time to first token", [r["ttft"] for r in good_ok if r["stream"] and r["ttft"]]))
    lines.append(f"good requests: {len(good_ok)} ok of {len(good)}")
    for outcome, n in sorted(Counter(r["outcome"] for r in good if r["outcome"] != "ok").items()):
        lines.append(f"  {outcome}: {n}")
    lines.append(f"bad requests: {len(bad)}, {len(bad) - len(bad_wrong)} got their status")
    for (kind, outcome), n in sorted(Counter((r["kind"], r["outcome"]) for r in bad).items()):
        lines.append(f"  {kind} -> {outcome}: {n}")
    if rss is not None:
        before, after = rss
        lines.append(f"server RSS: {before / 1024:.1f} MiB before, {after / 1024:.1f} MiB after "
                     f"({(after - before) / 1024:+.1f} MiB)")
        if samples:
            lines.append("  after " + ", ".join(f"{n} requests {kib / 1024:.1f} MiB" for n, kib in samples))
    return "\n".join(lines), lost, len(bad_wrong)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--serve", metavar="DIR", help="start python -m tops_edge.serve DIR on a free port, stop it after")
    where.add_argument("--base-url", help="a running server, e.g. http://127.0.0.1:8000")
    p.add_argument("--pid", type=int, default=None, help="with --base-url: the server's pid, for its RSS")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="with --serve: an argument for the server, repeatable (e.g. --server-arg=--max-queue=16)")
    p.add_argument("--clients", "-c", type=int, default=8, help="concurrent clients (default: 8)")
    p.add_argument("--requests", "-r", type=int, default=125, help="requests per client (default: 125)")
    p.add_argument("--bad", type=float, default=0.1, help="share of bad requests (default: 0.1)")
    p.add_argument("--stream", type=float, default=0.5, help="share of streamed requests (default: 0.5)")
    p.add_argument("--max-tokens", type=int, default=16, help="max_tokens of each request (default: 16)")
    p.add_argument("--warmup", type=int, default=200,
                   help="requests of the same mix, from the same clients, before the RSS is first read (default: 200)")
    p.add_argument("--image", default=str(ROOT / "examples" / "shapes.png"), help="the image (default: examples/shapes.png)")
    p.add_argument("--api-key", default=os.environ.get("TOPS_SERVE_API_KEY", "none"))
    p.add_argument("--timeout", type=float, default=300.0, help="client timeout per request in seconds (default: 300)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="FILE", help="also write every request's result and the summary")
    args = p.parse_args(argv)
    try:
        import openai  # noqa: F401
    except ImportError:
        sys.exit("load_test: needs the openai client: pip install openai")

    proc = None
    if args.serve:
        proc, base = start_server(args.serve, args.server_arg)
        pid = proc.pid
    else:
        base, pid = args.base_url.rstrip("/"), args.pid
    try:
        import httpx

        model = httpx.get(base + "/v1/models", headers={"Authorization": f"Bearer {args.api_key}"}, timeout=30) \
            .json()["data"][0]["id"]
        image_uri = "data:image/png;base64," + base64.b64encode(Path(args.image).read_bytes()).decode()
        run = Run(base, model, args.api_key, image_uri, args.max_tokens, args.timeout, pid)
        if args.warmup:  # the same mix from the same clients, not counted
            run.phase(args.clients, -(-args.warmup // args.clients), args.bad, args.stream, args.seed + 1)
        before = rss_kib(pid) if pid else None
        wall = run.phase(args.clients, args.requests, args.bad, args.stream, args.seed)
        after = rss_kib(pid) if pid else None
        metrics = httpx.get(base + "/metrics", timeout=30).text
    finally:
        if proc is not None:
            proc.send_signal(2)  # SIGINT: a graceful shutdown
            proc.wait(60)
    sent = args.clients * args.requests
    text, lost, wrong = report(run.results, sent, wall, (before, after) if pid else None, run.rss_samples)
    print(text)
    errors = re.findall(r'^tops_serve_errors_total\{kind="([^"]+)"\} (\S+)$', metrics, re.M)
    print("the server's errors by kind (tops_serve_errors_total):",
          ", ".join(f"{kind} {float(n):g}" for kind, n in errors) or "none")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": text, "results": run.results}, indent=1))
    return 1 if lost or wrong else 0


if __name__ == "__main__":
    sys.exit(main())
