"""Fleet sync at scale: N sync-only door processes (real FleetDoor + SQLite gallery, no camera) on one local
mosquitto, M people with synthetic 128-D embeddings (3 each).

Measures: the first distribution of M people to N online doors; revocation latency (admin publishes a disable ->
each online door has it in its gallery) p50/p99 over every (revocation, door) pair; bytes through the broker per
change (mosquitto's $SYS byte counters around the revocations, door reports included); a new door's full sync
from the retained topics alone (process start -> all M applied).

Run: python bench/bench_fleet.py [--doors 50] [--people 10000] [--revocations 20] [--out bench/results/fleet]
     (writes bench/results/fleet.json and fleet.md; the reduced run is in fleet_small.json|md)
Targets: revocation p99 <= 2 s, full sync of 10,000 people <= 60 s.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODEL = "synthetic-128"
DIM = 128
PER_PERSON = 3


# ------------------------------------------------------------------------------------------- door process
def door_child(door_id: str, port: int, state: Path, pub: Path, expect: int) -> None:
    """One sync-only door: prints `ready T`, `synced T` (all `expect` people applied), `revoked KEY T`."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    from edgeface.config import parse_config
    from edgeface.fleet.door import FleetDoor
    from edgeface.gallery import Gallery

    out_lock = threading.Lock()

    def say(line: str) -> None:
        with out_lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    class TimedDoor(FleetDoor):
        synced = False

        def _apply(self, accepted: list) -> list:
            done = super()._apply(accepted)
            now = time.time()
            for change, _topic, _env in accepted:
                if not change.deleted and not change.enabled:
                    say(f"revoked {change.person_key} {now:.6f}")
            return done

        def _handle_batch(self, batch: list) -> None:
            super()._handle_batch(batch)
            if not self.synced and len(self.state.versions) >= expect:
                self.synced = True
                say(f"synced {time.time():.6f}")

    cfg = parse_config({"state_dir": str(state), "mqtt": {"port": port}, "door": {"door_id": door_id},
                        "fleet": {"enabled": True, "public_key": str(pub), "stale_after_s": 3600,
                                  "applied_interval_s": 5}})
    gallery = Gallery.open(state / "gallery.db", model_id=MODEL, embedding_dim=DIM, max_distance=0.4)
    door = TimedDoor(cfg, gallery).start()
    door.wait_connected(60)
    say(f"ready {time.time():.6f}")
    sys.stdin.read()  # until the parent closes our stdin
    door.close()
    gallery.close()


class Door:
    def __init__(self, door_id: str, port: int, root: Path, pub: Path, expect: int) -> None:
        self.id = door_id
        self.events: dict[str, float] = {}
        self.revoked: dict[str, float] = {}
        state = root / door_id
        state.mkdir(parents=True)
        self.started = time.time()
        self.proc = subprocess.Popen([sys.executable, __file__, "--door-child", door_id, "--port", str(port),
                                      "--state", str(state), "--pub", str(pub), "--expect", str(expect)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONPATH": str(REPO)})
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            parts = line.split()
            if parts[:1] == ["revoked"]:
                self.revoked[parts[1]] = float(parts[2])
            elif len(parts) == 2:
                self.events[parts[0]] = float(parts[1])

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def wait_for(cond: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return bool(cond())


class SysBytes:
    """mosquitto's $SYS/broker/bytes/{received,sent} (published every sys_interval)."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt

        self.values: dict[str, int] = {}
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-sys")
        self.c.on_connect = lambda c, *a: c.subscribe([("$SYS/broker/bytes/received", 0),
                                                       ("$SYS/broker/bytes/sent", 0)])
        self.c.on_message = lambda c, u, m: self.values.__setitem__(m.topic.rsplit("/", 1)[1], int(m.payload))
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()

    def total(self) -> int:
        time.sleep(2.2)  # past one more sys_interval, so the counters include what just happened
        return self.values.get("received", 0) + self.values.get("sent", 0)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--doors", type=int, default=50)
    ap.add_argument("--people", type=int, default=10_000)
    ap.add_argument("--revocations", type=int, default=20)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "fleet")
    ap.add_argument("--door-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--state", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--pub", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--expect", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.door_child:
        door_child(args.door_child, args.port, args.state, args.pub, args.expect)
        return

    from edgeface.config import parse_config
    from edgeface.fleet.admin import FleetAdmin
    from edgeface.fleet.changes import PERSON_KIND
    from edgeface.fleet.signing import Signer, generate_keypair
    from edgeface.testing import MosquittoBroker

    root = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    generate_keypair(root / "admin.key", root / "admin.pub")
    broker = MosquittoBroker()
    with broker.config.open("a") as f:  # see docs/fleet.md: a full sync needs the queue to hold every person
        f.write("max_queued_messages 0\nmax_inflight_messages 100\nsys_interval 1\n")
    broker.start()
    cfg = parse_config({"mqtt": {"port": broker.port}})
    rng = np.random.default_rng(0)
    result: dict[str, Any] = {"doors": args.doors, "people": args.people, "embeddings_per_person": PER_PERSON,
                              "dim": DIM, "revocations": args.revocations, "machine": platform.machine(),
                              "cpus": os.cpu_count(), "command": " ".join(["python", "bench/bench_fleet.py",
                                                                           *sys.argv[1:]])}
    doors: list[Door] = []
    admin = FleetAdmin(cfg.mqtt, Signer.load(root / "admin.key"), node="bench").start()
    sysbytes = SysBytes(broker.port)
    try:
        t0 = time.time()
        doors = [Door(f"door{i:03d}", broker.port, root, root / "admin.pub", args.people) for i in range(args.doors)]
        if not wait_for(lambda: all("ready" in d.events for d in doors), 600):
            raise SystemExit("not every door connected within 600 s")
        result["doors_start_s"] = round(time.time() - t0, 1)
        print(f"{args.doors} doors connected in {result['doors_start_s']} s", flush=True)

        t0 = time.time()
        keys = []
        for i in range(args.people):
            vecs = rng.standard_normal((PER_PERSON, DIM)).astype(np.float32)
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
            keys.append(admin.put(f"person_{i:05d}", vecs, model_id=MODEL, wait=False).person_key)
        admin.flush()
        published = time.time() - t0
        ok = wait_for(lambda: all("synced" in d.events for d in doors), 1800)
        last = max((d.events.get("synced", time.time()) for d in doors), default=time.time())
        result["first_distribution"] = {"publish_s": round(published, 2), "all_doors_synced_s": round(last - t0, 2),
                                        "complete": ok}
        print(f"{args.people} people to {args.doors} doors: {last - t0:.1f} s (published in {published:.1f} s)",
              flush=True)
        sample = admin.people[keys[0]]
        result["envelope_bytes_person"] = len(admin.signer.envelope(PERSON_KIND, sample.body()))

        before = sysbytes.total()
        latencies, to_all = [], []
        picks = rng.choice(len(keys), size=min(args.revocations, len(keys)), replace=False)
        for idx in picks:
            key = keys[int(idx)]
            t_rev = time.time()
            admin.set_enabled(key, False)
            got = wait_for(lambda: all(key in d.revoked for d in doors), 60)
            per_door = [d.revoked[key] - t_rev for d in doors if key in d.revoked]
            latencies += per_door
            to_all.append(max(per_door) if got else float("inf"))
            time.sleep(0.2)
        after = sysbytes.total()
        result["revocation_s"] = {"p50": round(pct(latencies, 50), 4), "p99": round(pct(latencies, 99), 4),
                                  "max": round(max(latencies), 4), "to_all_doors_p50": round(pct(to_all, 50), 4),
                                  "to_all_doors_max": round(max(to_all), 4), "pairs": len(latencies)}
        result["broker_bytes_per_change"] = round((after - before) / max(1, len(picks)))
        print(f"revocation p50 {result['revocation_s']['p50'] * 1000:.0f} ms, p99 "
              f"{result['revocation_s']['p99'] * 1000:.0f} ms; broker bytes per change "
              f"{result['broker_bytes_per_change']}", flush=True)

        new = Door("newdoor", broker.port, root, root / "admin.pub", args.people)
        doors.append(new)
        ok = wait_for(lambda: "synced" in new.events, 600)
        result["new_door_full_sync_s"] = {
            "from_process_start": round(new.events.get("synced", float("nan")) - new.started, 2),
            "from_connected": round(new.events.get("synced", float("nan")) - new.events.get("ready", float("nan")), 2),
            "complete": ok}
        print(f"new door full sync: {result['new_door_full_sync_s']}", flush=True)
    finally:
        for d in doors:
            d.stop()
        admin.close()
        broker.close()
        shutil.rmtree(root, ignore_errors=True)
    result["targets"] = {"revocation_p99_le_2s": result["revocation_s"]["p99"] <= 2.0,
                         "full_sync_le_60s": result["new_door_full_sync_s"]["from_process_start"] <= 60.0}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    r = result
    md = [f"# Fleet sync: {r['doors']} doors, {r['people']} people", "",
          f"Command: `{r['command']}` ({r['machine']}, {r['cpus']} CPUs, one local mosquitto, machine shared)", "",
          "| measure | value |", "|---|---|",
          f"| {r['doors']} door processes connected | {r['doors_start_s']} s |",
          f"| first distribution of {r['people']} people to every door | "
          f"{r['first_distribution']['all_doors_synced_s']} s |",
          f"| revocation latency p50 / p99 / max ({r['revocation_s']['pairs']} revocation-door pairs) | "
          f"{r['revocation_s']['p50'] * 1000:.0f} / {r['revocation_s']['p99'] * 1000:.0f} / "
          f"{r['revocation_s']['max'] * 1000:.0f} ms |",
          f"| revocation to ALL doors, median / worst | {r['revocation_s']['to_all_doors_p50'] * 1000:.0f} / "
          f"{r['revocation_s']['to_all_doors_max'] * 1000:.0f} ms |",
          f"| signed person change ({PER_PERSON} x {DIM}-D) | {r['envelope_bytes_person']} bytes |",
          f"| broker bytes (in + out) per change | {r['broker_bytes_per_change']} |",
          f"| new door full sync (process start / from connect) | {r['new_door_full_sync_s']['from_process_start']} "
          f"/ {r['new_door_full_sync_s']['from_connected']} s |",
          "", f"Targets: revocation p99 <= 2 s: {r['targets']['revocation_p99_le_2s']}; full sync <= 60 s: "
          f"{r['targets']['full_sync_le_60s']}", ""]
    args.out.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
