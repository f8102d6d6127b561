"""`edgeface run` (the service), `edgeface demo` (the daemon on the shipped sample faces), and
`edgeface door release|sign-unlock|totp-init|totp-uri` (systemd ExecStopPost; a signed remote unlock
command; the one-time-code secret for Home Assistant's lock)."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

import click

from edgeface.cli import CliContext, pass_ctx
from edgeface.config import EdgefaceConfig, parse_config, read_secret
from edgeface.errors import ConfigError, EdgefaceError, ModelError

log = logging.getLogger("edgeface")

#: Demo: these fixture people are enrolled from their first two photos; everyone else is a stranger. Chosen for
#: margins that hold on a Pi (arm64 and x86 distances differ by up to 0.016): with sface_int8 (blend, threshold
#: 0.49) every demo grant and every demo stranger is at least 0.22 from the threshold on x86 (paul_allen, enrolled
#: before, was granted at 0.48: 0.01 under it). tests/test_daemon.py checks a 0.03 margin on every decision.
DEMO_KNOWN = ("barack_obama", "kit_harington", "steve_wozniak")
DEMO_ENROLL_PHOTOS = 2


def setup_logging(level: str) -> None:
    """Logs go to stderr (the journal under systemd), one line each."""
    root = logging.getLogger()
    if not any(getattr(h, "_edgeface", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler._edgeface = True  # type: ignore[attr-defined]
        fmt = "%(levelname)s %(name)s: %(message)s" if os.environ.get("JOURNAL_STREAM") else \
            "%(asctime)s %(levelname)s %(name)s: %(message)s"
        handler.setFormatter(logging.Formatter(fmt))
        root.addHandler(handler)
    root.setLevel(getattr(logging, level, logging.INFO))


class Watchdog:
    """sd_notify READY/WATCHDOG/STOPPING via `sdnotify` (a no-op when NOTIFY_SOCKET is unset).

    Pings only while the pipeline shows signs of life (a frame or a camera state change within the
    watchdog interval), so a hung pipeline gets restarted by systemd."""

    def __init__(self, daemon: Any) -> None:
        self.daemon = daemon
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._notifier = None
        if self.enabled:
            import sdnotify

            self._notifier = sdnotify.SystemdNotifier()
        usec = os.environ.get("WATCHDOG_USEC")
        self.interval_s = int(usec) / 1e6 if usec and usec.isdigit() else 0.0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def notify(self, msg: str) -> None:
        if self._notifier is not None:
            self._notifier.notify(msg)

    def start(self) -> None:
        self.notify("READY=1")
        if self._notifier is not None and self.interval_s > 0:
            self._thread = threading.Thread(target=self._loop, name="watchdog", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s / 3):
            # a camera back-off wait counts as alive: health changes refresh the heartbeat
            limit = max(self.interval_s, self.daemon.cfg.camera.reconnect_max_s + self.daemon.cfg.camera.frozen_after_s)
            if self.daemon.heartbeat_age < limit:
                self.notify("WATCHDOG=1")
            else:
                log.error("pipeline stalled for %.0f s: not pinging the watchdog", self.daemon.heartbeat_age)

    def stop(self) -> None:
        self._stop.set()
        self.notify("STOPPING=1")


class SignalStopper:
    """SIGTERM/SIGINT -> daemon.stop() on a helper thread; the handler itself only records the signal.

    Why: a handler runs on the main thread between two bytecodes, possibly while that thread holds a lock
    (the audit log's, an Event's). A handler that released the relay re-entered the audit lock and hung the
    process (5 of 50 stops). Here the handler appends to a list and Python's C-level wakeup fd writes the signal's
    number to a pipe; the `signal-stop` thread reads it, releases the relay at once and unblocks the camera
    (daemon.stop(), which is safe from another thread); the shutdown itself (daemon.close()) stays on the main
    thread in run_daemon."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, daemon: Any) -> None:
        self.daemon = daemon
        self.received: list[int] = []
        self._r, self._w = os.pipe()
        os.set_blocking(self._w, False)
        self._done = False
        self._old_handlers: dict[int, Any] = {}
        self._old_fd = -1
        self._thread = threading.Thread(target=self._loop, name="signal-stop", daemon=True)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.received.append(signum)  # only a flag: no locks, no logging, no I/O

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signals reach only the main thread (an embedding program runs us elsewhere)
        self._thread.start()
        self._old_fd = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        self._old_handlers = {s: signal.signal(s, self._on_signal) for s in self.SIGNALS}

    def _loop(self) -> None:
        while True:
            try:
                data = os.read(self._r, 64)  # one byte per signal: its number (written by Python's C handler)
            except OSError:
                return
            if self._done or not data:
                return
            for signum in data:
                if signum not in self.SIGNALS:
                    continue
                log.info("received %s: stopping", signal.Signals(signum).name)
                try:
                    self.daemon.stop()  # releases the relay at once and unblocks the camera
                except Exception:  # noqa: BLE001
                    log.exception("stopping the daemon failed")

    def uninstall(self) -> None:
        for s, handler in self._old_handlers.items():
            signal.signal(s, handler)
        if self._old_handlers:
            signal.set_wakeup_fd(self._old_fd)
        self._done = True
        try:
            os.write(self._w, b"\0")
        except OSError:
            pass
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        os.close(self._r)
        os.close(self._w)


def run_daemon(daemon: Any, *, max_frames: Optional[int] = None) -> int:
    """Run until SIGTERM/SIGINT or the end of the source; the relay is released on every way out."""
    watchdog = Watchdog(daemon)
    stopper = SignalStopper(daemon)
    stopper.install()
    try:
        daemon.start()
        watchdog.start()
        n = daemon.run(max_frames=max_frames)
        log.info("stopped after %d frames", n)
    finally:
        watchdog.stop()
        daemon.close()  # the shutdown runs here, on the main thread
        stopper.uninstall()
    return 0


def build_daemon(cfg: EdgefaceConfig, **kw: Any) -> Any:
    from edgeface.daemon.app import Daemon

    return Daemon(cfg, **kw)


# ---------------------------------------------------------------------------------------------- demo
def _demo_analyzer(cfg: EdgefaceConfig) -> Any:
    """The configured embedder; in a development checkout without the model file (models/sface_int8.tflite) fall back to
    MobileFaceNet from ../shared so the demo still runs."""
    from edgeface.vision.analyzer import FaceAnalyzer

    try:
        return cfg, FaceAnalyzer.from_config(cfg.detector, cfg.embedder, cfg.models_dir)
    except ModelError:
        alt = Path(__file__).resolve().parents[3] / "shared" / "weights" / "mobilefacenet" / "mobilefacenet.tflite"
        if not alt.is_file():
            raise
        log.warning("embedder %s is missing; the demo uses %s instead", cfg.embedder.model, alt)
        data = cfg.model_dump()
        data["embedder"].update(model=str(alt), preprocessing="arcface", template="arcface112")
        cfg = parse_config(data)
        return cfg, FaceAnalyzer.from_config(cfg.detector, cfg.embedder, cfg.models_dir)


def demo_config(state_dir: Path, *, loop: bool, mqtt_host: str, mqtt_port: int) -> EdgefaceConfig:
    return parse_config({
        "state_dir": str(state_dir),
        "camera": {"source": "demo", "loop": loop, "max_fps": 50},
        "gallery": {"path": "gallery.db"},
        "policy": {"min_frames": 3, "window_frames": 5, "window_s": 3.0, "cooldown_s": 2.0,
                   "unknown_interval_s": 2.0},
        "door": {"door_id": "demo", "pin_factory": "mock", "pulse_s": 1.0},
        "mqtt": {"host": mqtt_host, "port": mqtt_port, "outbox_path": "outbox.db", "ha_discovery": False},
        "audit": {"path": "audit.db"},
    })


def run_demo(*, loop: bool = False, mqtt_host: str = "127.0.0.1", mqtt_port: int = 1883,
             out: Any = None, state_dir: Optional[Path] = None, web: Optional[str] = None) -> int:
    """The daemon on the sample faces: a few people enrolled from 2 photos each, the rest are strangers;
    each remaining photo is shown for 4 frames; events are printed as JSON lines."""
    from edgeface.enroll import enroll_images
    from edgeface.frames import DEMO_FACES, FolderSource
    from edgeface.gallery import analyzer_model, open_gallery

    out = out or sys.stdout
    if not DEMO_FACES.is_dir():
        raise EdgefaceError(f"the demo needs the sample faces in {DEMO_FACES} (installed with the package; "
                            "reinstall edgeface)")
    tmp = Path(tempfile.mkdtemp(prefix="edgeface-demo-")) if state_dir is None else state_dir
    try:
        cfg = demo_config(tmp, loop=loop, mqtt_host=mqtt_host, mqtt_port=mqtt_port)
        cfg, analyzer = _demo_analyzer(cfg)
        # Matched as the service matches: the config's mode with the threshold calibrated for that mode.
        gallery = open_gallery(cfg, model=analyzer_model(analyzer), create=True)  # state_dir/gallery.db
        frames_dir = tmp / "frames"
        for person in sorted(p for p in DEMO_FACES.iterdir() if p.is_dir()):
            photos = sorted(person.glob("*.jpg"))
            shown = photos
            if person.name in DEMO_KNOWN:
                enrolled, shown = photos[:DEMO_ENROLL_PHOTOS], photos[DEMO_ENROLL_PHOTOS:]
                report = gallery.enroll(person.name, enroll_images(analyzer, enrolled))
                click.echo(f"enrolled {person.name} from {len(report.added)} photos", err=True)
            (frames_dir / person.name).mkdir(parents=True, exist_ok=True)
            for photo in shown:  # photos used for enrollment are never shown to the camera
                shutil.copyfile(photo, frames_dir / person.name / photo.name)
        clock = _DemoClock()
        source = FolderSource(frames_dir, loop=loop, repeat=4, max_fps=cfg.camera.max_fps, clock=clock)

        def sink(event: dict) -> None:
            out.write(json.dumps(event, sort_keys=True) + "\n")
            out.flush()

        click.echo(f"demo state in {tmp}; strangers: "
                   f"{', '.join(p.name for p in sorted(DEMO_FACES.iterdir()) if p.is_dir() and p.name not in DEMO_KNOWN)}",
                   err=True)
        daemon = build_daemon(cfg, analyzer=analyzer, gallery=gallery, source=source, event_sink=sink)
        for line in daemon.summary():
            log.info("%s", line)
        web_proc = None
        if web:  # the web app as its own process on the demo's state (edgeface.web.demo)
            from edgeface.web.demo import start_demo_web

            web_proc = start_demo_web(cfg, tmp, web)
        try:
            run_daemon(daemon)
        finally:
            gallery.close()
            analyzer.close()
            if web_proc is not None:
                web_proc.terminate()
                web_proc.wait(timeout=10)
        return 0
    finally:
        if state_dir is None:
            shutil.rmtree(tmp, ignore_errors=True)


class _DemoClock:
    """Frame times of a 5 fps camera (so the demo's decisions do not depend on this machine's speed)."""

    def __init__(self, fps: float = 5.0) -> None:
        self.t = time.time()
        self.step = 1.0 / fps

    def __call__(self) -> float:
        self.t += self.step
        return self.t


# ---------------------------------------------------------------------------------------------- commands
def register(group: click.Group) -> None:
    @group.command("run")
    @click.option("--demo", is_flag=True, help="Same as `edgeface demo`.")
    @click.option("--max-frames", type=int, default=None, hidden=True)
    @pass_ctx
    def run_cmd(obj: CliContext, demo: bool, max_frames: Optional[int]) -> None:
        """Run the access daemon (the systemd service)."""
        if demo:
            setup_logging("INFO")
            raise click.exceptions.Exit(run_demo())
        path = obj.resolved_config_path()
        cfg = obj.config
        setup_logging(cfg.log_level)
        from edgeface.security import install_redaction

        # a last line of defence: these values are masked in every log record, whatever formats them
        install_redaction([read_secret(cfg.mqtt.password_env), read_secret(cfg.mqtt.remote_unlock_secret_env),
                           read_secret(cfg.mqtt.totp_secret_env)])
        log.info("edgeface %s starting (config: %s)", _version(), path or "built-in defaults")
        daemon = build_daemon(cfg)
        for line in daemon.summary():
            log.info("%s", line)
        raise click.exceptions.Exit(run_daemon(daemon, max_frames=max_frames))

    @group.command("demo")
    @click.option("--loop", is_flag=True, help="Replay the sample faces until Ctrl-C (default: one pass).")
    @click.option("--broker", default="127.0.0.1:1883", show_default=True,
                  help="Also publish to this MQTT broker when one is running (never required).")
    @click.option("--web", "web", metavar="HOST:PORT", default=None,
                  help="Also serve the web app here (e.g. 0.0.0.0:8080; needs the [web] extra).")
    def demo_cmd(loop: bool, broker: str, web: Optional[str]) -> None:
        """Run the daemon on the shipped sample faces: mock relay, events as JSON lines on stdout."""
        setup_logging("INFO")
        host, _, port = broker.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"--broker {broker!r}: expected HOST:PORT")
        raise click.exceptions.Exit(run_demo(loop=loop, mqtt_host=host, mqtt_port=int(port), web=web))

    from edgeface.daemon.release import door_group  # `door release` lives there: it must work with a broken config

    group.add_command(door_group)

    @door_group.command("sign-unlock")
    @pass_ctx
    def door_sign(obj: CliContext) -> None:
        """Print a signed, single-use remote unlock command (JSON) for mqtt.remote_unlock."""
        from edgeface.events.remote import make_command

        cfg = obj.config
        secret = read_secret(cfg.mqtt.remote_unlock_secret_env)
        if not secret:
            raise ConfigError(f"${cfg.mqtt.remote_unlock_secret_env} is not set (the remote unlock secret)")
        click.echo(json.dumps(make_command(secret, cfg.door.door_id)))


    @door_group.command("totp-init")
    @click.option("--out", "out_path", type=click.Path(dir_okay=False), default="/etc/edgeface/unlock-totp",
                  show_default=True, help="Secret file to create (0600; the systemd credential EDGEFACE_UNLOCK_TOTP).")
    @click.option("--door-id", default=None,
                  help="The account name in the authenticator app (default: door.door_id of the config).")
    @click.option("--force", is_flag=True, help="Replace an existing secret (codes from the old one stop working).")
    @pass_ctx
    def door_totp_init(obj: CliContext, out_path: str, door_id: Optional[str], force: bool) -> None:
        """Create the one-time-code secret and print the otpauth:// URI for the owner's authenticator app.

        Needs only the door id and the output file: every check comes before the secret is written, and an
        error elsewhere in the config is a warning, not a stop."""
        from edgeface.events.totp import new_secret, otpauth_uri
        from edgeface.events.totp_setup import plan_totp_init
        from edgeface.security import ensure_private_dir, write_private_atomic

        plan = plan_totp_init(obj.resolved_config_path(), door_id=door_id, out=Path(out_path), force=force)
        if plan.note:
            click.echo(f"warning: {plan.note}", err=True)
        out = plan.out
        secret = new_secret()
        try:
            if not out.parent.exists():
                ensure_private_dir(out.parent)
            write_private_atomic(out, (secret + "\n").encode("utf-8"))
        except OSError as exc:
            raise ConfigError(f"{out}: cannot write the secret: {exc.strerror or exc}") from None
        click.echo(f"wrote the TOTP secret to {out} (0600); add it to the service as a credential:", err=True)
        click.echo(f"  LoadCredential={plan.secret_env}:{out}   (systemd/edgeface.service)", err=True)
        click.echo("and set mqtt.remote_unlock: true and mqtt.remote_unlock_totp: true. Scan this URI as a QR code "
                   "(e.g. `qrencode -t ansiutf8 URI`) or type the secret into the app:", err=True)
        click.echo(otpauth_uri(secret, account=plan.door_id))

    @door_group.command("totp-uri")
    @click.option("--secret-file", type=click.Path(dir_okay=False, exists=True), default=None,
                  help="Read the secret from this file (default: the credential/variable named by mqtt.totp_secret_env).")
    @pass_ctx
    def door_totp_uri(obj: CliContext, secret_file: Optional[str]) -> None:
        """Print the otpauth:// URI of the configured one-time-code secret (to add another phone)."""
        from edgeface.events.totp import TotpSecretError, decode_secret, normalize_secret, otpauth_uri

        env = obj.config.mqtt.totp_secret_env
        secret = Path(secret_file).read_text(encoding="utf-8").strip() if secret_file else read_secret(env)
        if not secret:
            raise ConfigError(f"${env} is not set (the TOTP secret; make one with `edgeface door totp-init`)")
        try:
            decode_secret(secret)
        except TotpSecretError as exc:
            raise ConfigError(f"{secret_file or '$' + env} (the TOTP secret): {exc}") from None
        click.echo(otpauth_uri(normalize_secret(secret), account=obj.config.door.door_id))


def _version() -> str:
    from edgeface import __version__

    return __version__
