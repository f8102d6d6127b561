"""`edgeface web`: the door owner's web app, its own process (docs/web.md)."""
from __future__ import annotations

from typing import Optional

import click

from edgeface.cli import CliContext, pass_ctx


@click.command("web")
@click.option("--host", default=None, help="Listen address (default: web.host).")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="Port (default: web.port).")
@pass_ctx
def web_cmd(obj: CliContext, host: Optional[str], port: Optional[int]) -> None:
    """Serve the web app: dashboard, people, access log, remote unlock, settings."""
    import logging

    try:
        from edgeface.web.app import serve
    except ImportError as exc:
        raise click.ClickException(f"the web app needs its extra: pip install 'edgeface[web]' ({exc})") from None
    cfg = obj.config
    logging.basicConfig(level=getattr(logging, cfg.log_level), format="%(levelname)s %(name)s: %(message)s")
    scheme = "https" if cfg.web.tls else "http"
    click.echo(f"edgeface web on {scheme}://{host or cfg.web.host}:{port or cfg.web.port}/ (state {cfg.state_dir})")
    serve(cfg, config_path=obj.resolved_config_path(), host=host, port=port)


def register(cli: click.Group) -> None:
    cli.add_command(web_cmd)
