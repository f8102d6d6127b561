"""Does the web app cost the door anything? Recognition frame time with and without 20 requests/s on the web app,
and the web app's page response times.

Run by hand (never a test): timings depend on the machine and on what else runs on it.

    PYTHONPATH=$PWD .venv/bin/python bench/bench_web.py --seconds 30

The daemon (this process: the real Daemon.process_frame on the committed fixture photos, one person enrolled,
mock relay, MQTT off) processes frames back to back for --seconds with the web app idle, then again for --seconds
while a client thread sends --rate requests/s (logged in: dashboard, people, access log, status, settings, live picture
in turn; the live page being watched makes the daemon write its snapshot every web.live_interval_s) to `edgeface web` running as its own process on the same state files at nice 10, as its systemd unit runs it. Writes
bench/results/web.json and web.md.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
FACES = REPO / "tests" / "fixtures" / "faces"
PAGES = ["/", "/people", "/log", "/status.json", "/settings", "/live.jpg"]
PASSWORD = "bench password 123"


def stats(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, np.float64) * 1000.0
    return {"median_ms": round(float(np.median(a)), 2), "p95_ms": round(float(np.percentile(a, 95)), 2),
            "max_ms": round(float(a.max()), 2), "n": int(len(a))}


class Client:
    def __init__(self, port: int) -> None:
        self.port, self.cookie = port, ""

    def request(self, method: str, path: str, form: dict | None = None) -> tuple[int, bytes, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        headers = {"Cookie": self.cookie} if self.cookie else {}
        body = None
        if form is not None:
            body = urllib.parse.urlencode(form).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        conn.request(method, path, body=body, headers=headers)
        r = conn.getresponse()
        data = r.read()
        cookie = r.getheader("set-cookie")
        if cookie:
            self.cookie = cookie.split(";", 1)[0]
        conn.close()
        return r.status, data, dict(r.getheaders())


def start_web(config: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "edgeface", "--config", str(config), "web", "--host", "127.0.0.1",
                             "--port", str(port)], env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=lambda: os.nice(10))  # as systemd/edgeface-web.service (Nice=10)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            Client(port).request("GET", "/login")
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("edgeface web did not start: " + proc.stderr.read().decode(errors="replace")[-2000:])


def frame_times(daemon: Any, frames: list[Any], seconds: float) -> list[float]:
    """process_frame back to back; frame timestamps 0.2 s apart so the policy decides as on a 5 fps camera."""
    from edgeface.types import Frame

    out = []
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        f = frames[i % len(frames)]
        frame = Frame(f.image, frames[0].timestamp + 0.2 * (len(out) + frame_times.offset), f.index, f.source)
        t0 = time.perf_counter()
        daemon.process_frame(frame)
        out.append(time.perf_counter() - t0)
        i += 1
    frame_times.offset += len(out)  # type: ignore[attr-defined]
    return out


frame_times.offset = 0  # type: ignore[attr-defined]


def load(client: Client, rate: float, stop: threading.Event, times: dict[str, list[float]], errors: list[str]) -> None:
    """Requests at a fixed rate (open loop: a slow answer does not lower the rate below what one client can do)."""
    period, i = 1.0 / rate, 0
    next_t = time.monotonic()
    while not stop.is_set():
        path = PAGES[i % len(PAGES)]
        t0 = time.perf_counter()
        try:
            status, _b, _h = client.request("GET", path)
            if status != 200 and not (path == "/live.jpg" and status == 404):  # 404 until the first picture
                errors.append(f"{path}: {status}")
        except OSError as exc:
            errors.append(f"{path}: {exc}")
        times.setdefault(path, []).append(time.perf_counter() - t0)
        i += 1
        next_t += period
        time.sleep(max(0.0, next_t - time.monotonic()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=30.0, help="each phase (idle web app, loaded web app)")
    ap.add_argument("--rate", type=float, default=20.0, help="requests per second on the web app")
    ap.add_argument("--port", type=int, default=18765)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "web")
    ap.add_argument("--client", metavar="COOKIE", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client is not None:  # the load generator (a child process of the benchmark)
        client = Client(args.port)
        client.cookie = args.client
        times: dict[str, list[float]] = {}
        errors: list[str] = []
        stop = threading.Event()
        threading.Timer(args.seconds, stop.set).start()
        t0 = time.monotonic()
        load(client, args.rate, stop, times, errors)
        print(json.dumps({"times": times, "errors": errors, "elapsed": time.monotonic() - t0}))
        return 0

    from gpiozero.pins.mock import MockFactory

    from edgeface.config import parse_config
    from edgeface.daemon.app import Daemon
    from edgeface.enroll import enroll_images
    from edgeface.frames import FolderSource
    from edgeface.gallery import Gallery, resolve_max_distance
    from edgeface.types import Frame
    from edgeface.vision.analyzer import FaceAnalyzer
    from edgeface.vision.images import load_image

    tmp = Path(tempfile.mkdtemp(prefix="edgeface-bench-web-"))
    state = tmp / "state"
    data = {"state_dir": str(state), "mqtt": {"enabled": False}, "door": {"pin_factory": "mock", "pulse_s": 0.1},
            "policy": {"cooldown_s": 1.0, "unknown_interval_s": 1.0}}
    cfg = parse_config(data)
    config = tmp / "config.yaml"
    config.write_text(json.dumps(data), encoding="utf-8")  # JSON is YAML
    analyzer = FaceAnalyzer.from_config(cfg.detector, cfg.embedder, cfg.models_dir)
    state.mkdir(mode=0o700)
    gallery = Gallery.open(state / "gallery.db", model_id=analyzer.embedder.model_id,
                           embedding_dim=analyzer.embedder.spec.embedding_dim,
                           max_distance=resolve_max_distance(cfg.gallery, cfg.embedder, cfg.models_dir),
                           match_mode=cfg.gallery.match_mode, top_k=cfg.gallery.top_k)
    gallery.enroll("barack_obama", enroll_images(analyzer, sorted((FACES / "barack_obama").glob("*.jpg"))[:3]))
    photos = sorted(FACES.rglob("*.jpg"))
    t = time.time()
    frames = [Frame(load_image(p), t, i, str(p)) for i, p in enumerate(photos)]
    daemon = Daemon(cfg, analyzer=analyzer, gallery=gallery, source=FolderSource(FACES), pin_factory=MockFactory())

    frame_times(daemon, frames, 2.0)  # warm-up
    proc = start_web(config, args.port)
    try:
        client = Client(args.port)
        client.request("POST", "/setup", {"username": "owner", "password": PASSWORD, "password2": PASSWORD})
        assert client.request("GET", "/")[0] == 200, "login failed"
        for p in PAGES:  # first requests load the web app's own models and gallery
            client.request("GET", p)
        idle = frame_times(daemon, frames, args.seconds)
        # the phone's side in its own process: a client thread here would take the GIL from the daemon
        loader = subprocess.Popen([sys.executable, __file__, "--client", client.cookie, "--port", str(args.port),
                                   "--rate", str(args.rate), "--seconds", str(args.seconds)],
                                  stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
        time.sleep(0.5)
        t0 = time.monotonic()
        loaded = frame_times(daemon, frames, args.seconds)
        out, _ = loader.communicate(timeout=args.seconds + 60)
        elapsed = time.monotonic() - t0
        report = json.loads(out)
        times, errors, elapsed = report["times"], report["errors"], report["elapsed"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        daemon.close()
        gallery.close()
        analyzer.close()

    n_req = sum(len(v) for v in times.values())
    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "cpus": os.cpu_count(),
        "python": platform.python_version(), "seconds_per_phase": args.seconds, "rate_requested": args.rate,
        "rate_achieved": round(n_req / elapsed, 1), "request_errors": errors[:10], "n_errors": len(errors),
        "frame_idle": stats(idle), "frame_loaded": stats(loaded),
        "frame_median_change_pct": round(100.0 * (np.median(loaded) / np.median(idle) - 1.0), 1),
        "pages": {p: stats(v) for p, v in times.items()},
        "command": f"bench/bench_web.py --seconds {args.seconds:g} --rate {args.rate:g}",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    lines = [f"# Web app load vs recognition ({result['machine']}, {result['cpus']} CPUs)", "",
             f"Produced by `{result['command']}`: the daemon's process_frame on the fixture photos for "
             f"{args.seconds:g} s with the web app idle, then {args.seconds:g} s with "
             f"{result['rate_achieved']} requests/s on it (its own process, same state files).", "",
             "| recognition frame | median ms | p95 ms | max ms | frames |", "|---|---|---|---|---|"]
    for k in ("frame_idle", "frame_loaded"):
        s = result[k]
        lines.append(f"| {k.split('_')[1]} | {s['median_ms']} | {s['p95_ms']} | {s['max_ms']} | {s['n']} |")
    lines += ["", f"Median frame time change under load: {result['frame_median_change_pct']:+.1f} % "
                  f"({result['n_errors']} request errors). On a host shared with other work the two phases differ "
                  "by noise too: compare several runs, and run it on the Pi for the door's own figure.", "",
              "| page | median ms | p95 ms | max ms | requests |", "|---|---|---|---|---|"]
    for p, s in result["pages"].items():
        lines.append(f"| `{p}` | {s['median_ms']} | {s['p95_ms']} | {s['max_ms']} | {s['n']} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

