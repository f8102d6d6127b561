"""`edgeface run` (the service), `edgeface demo` (the daemon on the shipped sample faces), and
`edgeface door release|sign-unlock|totp-init|totp-uri` (systemd ExecStopPost; a signed remote unlock
command; the one-time-code secret for Home Assistant's lock)."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import click

from edgeface.cli import CliContext, pass_ctx
from edgeface.config import read_secret
from edgeface.daemon.service import run_daemon, setup_logging
from edgeface.errors import ConfigError

log = logging.getLogger("edgeface")


# ---------------------------------------------------------------------------------------------- commands
def register(group: click.Group) -> None:
    @group.command("run")
    @click.option("--demo", is_flag=True, help="Same as `edgeface demo`.")
    @click.option("--max-frames", type=int, default=None, hidden=True)
    @pass_ctx
    def run_cmd(obj: CliContext, demo: bool, max_frames: Optional[int]) -> None:
        """Run the access daemon (the systemd service)."""
        if demo:
            from edgeface.daemon.demo import run_demo

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
        from edgeface.daemon.app import Daemon

        daemon = Daemon(cfg)
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
        from edgeface.daemon.demo import run_demo

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
