"""How long a valid remote-unlock command waits behind a flood of refused ones, with and without the rate limit.

A real mosquitto on 127.0.0.1 and the real Daemon (audit log and outbox on this disk, synchronous=FULL): N
commands with a bad signature are published, then one valid command; we measure the time from publishing
the valid command until the relay pin goes high, and count the audit rows the flood left. "unlimited" is the
recording before refusals were rate-limited (every refusal written one by one: an audit row and a door event, i.e. fsyncs),
obtained by giving the same code a limiter whose burst never ends.

    python bench/refused_flood.py [N]      # prints a table, writes bench/results/refused_flood.json
"""
from __future__ import annotations

import json
import os
import platform
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "results" / "refused_flood.json"
SECRET = "bench-flood-secret-0123456789"


class _NoAnalyzer:
    class embedder:
        model_id = "bench_model"

    def close(self) -> None:
        pass


def run(n: int, limited: bool) -> dict:
    from gpiozero.pins.mock import MockFactory

    from edgeface.config import parse_config
    from edgeface.daemon.app import Daemon
    from edgeface.events.remote import RefusalLimiter, make_command
    from edgeface.testing import Collector, MosquittoBroker, wait_until

    os.environ["EDGEFACE_UNLOCK_SECRET"] = SECRET
    broker = MosquittoBroker().start()
    pins = MockFactory()
    with tempfile.TemporaryDirectory(dir=REPO / "bench") as tmp:  # the real disk, not tmpfs
        cfg = parse_config({
            "state_dir": str(Path(tmp) / "state"), "camera": {"source": str(REPO / "tests/fixtures/faces/paul_allen")},
            "door": {"door_id": "front", "pulse_s": 0.2, "pin_factory": "mock"}, "embedder": {"model": "bench_model"},
            "mqtt": {"host": broker.host, "port": broker.port, "remote_unlock": True, "ha_discovery": False}})
        with Collector(broker.host, broker.port, "edgeface/front/none") as pub:
            daemon = Daemon(cfg, analyzer=_NoAnalyzer(), pin_factory=pins)
            if not limited:
                daemon.commands.refusals = RefusalLimiter(burst=10 ** 9)
            daemon.start()
            assert daemon.mqtt.wait_connected(10)
            time.sleep(0.3)
            now = int(time.time())
            for i in range(n):
                pub.client.publish("edgeface/front/unlock/set",
                                   json.dumps({"nonce": f"flood-{i:08d}", "ts": now, "sig": "0" * 64}), qos=0)
            t0 = time.monotonic()
            pub.client.publish("edgeface/front/unlock/set", json.dumps(make_command(SECRET, "front")), qos=1)
            opened = wait_until(lambda: pins.pin(17).state is True or len(pins.pin(17).states) > 2, 600, 0.005)
            wait_s = time.monotonic() - t0
            audit = daemon.audit.path
            daemon.close()
        rows = sqlite3.connect(audit).execute("SELECT count(*) FROM audit WHERE kind = 'remote_unlock' AND "
                                              "result = 'refused'").fetchone()[0]
    broker.close()
    pins.close()
    return {"refused": n, "limited": limited, "opened": opened, "valid_command_wait_s": round(wait_s, 3),
            "refused_audit_rows": rows}


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    rows = [run(n, True), run(n, False)]
    print(f"{'recording':<12} {'refused':>8} {'valid command waits':>20} {'refused audit rows':>19}")
    for r in rows:
        print(f"{'limited' if r['limited'] else 'unlimited':<12} {r['refused']:>8} {r['valid_command_wait_s']:>18.3f} s"
              f" {r['refused_audit_rows']:>19}")
    RESULTS.write_text(json.dumps({"machine": platform.platform(), "when": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                         time.gmtime()),
                                   "rows": rows}, indent=1) + "\n")
    print(f"wrote {RESULTS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
