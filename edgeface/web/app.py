"""The web app's routes (Starlette + Jinja2). Every page but /login, /setup and /static needs a session; every POST
needs the session's CSRF token; slow work (models, SQLite) runs in worker threads, never on the event loop."""
from __future__ import annotations

import asyncio
import datetime as dt
import functools
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from edgeface.config import EdgefaceConfig, read_secret
from edgeface.daemon.app import state_path
from edgeface.errors import EdgefaceError
from edgeface.web.auth import AdminStore, LoginLimiter, Session, Sessions
from edgeface.web.backend import RESULTS, Backend, parse_day_time, thumbnail_path_ok
from edgeface.web.live import LiveState

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
COOKIE = "edgeface_session"
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
PLACEHOLDER_SVG = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 64 64"><rect width="64" height="64" '
                   'fill="#dde3ea"/><circle cx="32" cy="25" r="12" fill="#aab4c0"/><path d="M10 60c2-14 12-20 22-20s20 '
                   '6 22 20z" fill="#aab4c0"/></svg>')
#: The settings page re-checks the model files' sha256 at most this often.
MODEL_CHECK_S = 300.0

SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
                               "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'; "
                               "object-src 'none'",
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
    "permissions-policy": "geolocation=(), microphone=()",
}


class SecurityHeaders:
    """Pure ASGI middleware (no buffering: the SSE stream passes straight through)."""

    def __init__(self, app: Any, tls: bool) -> None:
        self.app = app
        self.headers = [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
        if tls:
            self.headers.append((b"strict-transport-security", b"max-age=31536000"))

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [h for h in self.headers if h[0] not in names]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class WebApp:
    """State shared by the routes: config, admin, sessions, limiter, backend, live MQTT view."""

    def __init__(self, cfg: EdgefaceConfig, *, config_path: Optional[Path] = None) -> None:
        self.cfg = cfg
        self.config_path = config_path
        state = Path(cfg.state_dir).expanduser()
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.admin = AdminStore(state / "web-admin.json")
        self.sessions = Sessions(cfg.web.session_hours * 3600.0)
        self.limiter = LoginLimiter()
        self.backend = Backend(cfg)
        self.live = LiveState(cfg)
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))
        self.templates.env.globals["fmt_time"] = self.fmt_time
        self.max_upload = int(cfg.web.max_upload_mb * 1024 * 1024)

    def fmt_time(self, ts: Optional[float]) -> str:
        if ts is None:
            return ""
        from zoneinfo import ZoneInfo

        return dt.datetime.fromtimestamp(float(ts), ZoneInfo(self.cfg.policy.timezone)).strftime("%Y-%m-%d %H:%M:%S")

    # ------------------------------------------------------------------ helpers
    def session(self, request: Request) -> Optional[Session]:
        return self.sessions.get(request.cookies.get(COOKIE))

    def render(self, request: Request, name: str, status: int = 200, **ctx: Any) -> Response:
        s = self.session(request)
        ctx.update(request=request, session=s, csrf=s.csrf if s else "", door_id=self.cfg.door.door_id)
        return self.templates.TemplateResponse(request, name, ctx, status_code=status)

    async def form(self, request: Request) -> Any:
        """The request's form, size-capped before it is read (a body without Content-Length is refused)."""
        length = request.headers.get("content-length")
        if length is None or not length.isdigit():
            raise _Refused(411, "Content-Length required")
        if int(length) > self.max_upload:
            raise _Refused(413, f"upload too large ({int(length) // 1024} KiB > {self.max_upload // 1024} KiB; "
                                "web.max_upload_mb)")
        return await request.form(max_files=self.cfg.web.max_photos, max_fields=50, max_part_size=self.max_upload)

    def client(self, request: Request) -> str:
        return request.client.host if request.client else "?"


class _Refused(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status, self.text = status, text


Handler = Callable[..., Awaitable[Response]]


def page(web: WebApp, *, post: bool = False) -> Callable[[Handler], Callable[[Request], Awaitable[Response]]]:
    """Wrap a route: no admin yet -> /setup; no session -> /login (401 for non-GET); POST: CSRF token checked
    (form field `csrf` or header X-CSRF-Token) before the handler sees anything."""

    def wrap(fn: Handler) -> Callable[[Request], Awaitable[Response]]:
        @functools.wraps(fn)
        async def handler(request: Request) -> Response:
            if not web.admin.exists():
                if request.method != "GET":
                    return PlainTextResponse("set up the admin account first", status_code=401)
                return RedirectResponse("/setup", status_code=303)
            s = web.session(request)
            if s is None:
                if request.method != "GET" or request.url.path == "/events":
                    return PlainTextResponse("login required", status_code=401)
                return RedirectResponse("/login", status_code=303)
            try:
                form = None
                if request.method == "POST":
                    form = await web.form(request)
                    token = form.get("csrf") or request.headers.get("x-csrf-token") or ""
                    import hmac

                    if not hmac.compare_digest(str(token).encode(), s.csrf.encode()):
                        return PlainTextResponse("CSRF token missing or wrong: reload the page", status_code=403)
                return await fn(request, s, form) if post else await fn(request, s)
            except _Refused as exc:
                return PlainTextResponse(exc.text, status_code=exc.status)
            except EdgefaceError as exc:  # a bad id or name, a gallery that refuses: one line, not a traceback
                return PlainTextResponse(str(exc), status_code=400)

        return handler

    return wrap


def create_app(cfg: EdgefaceConfig, *, config_path: Optional[Path] = None, start_live: bool = True) -> Starlette:
    web = WebApp(cfg, config_path=config_path)
    b = web.backend

    # ------------------------------------------------------------------ first run and login
    async def setup(request: Request) -> Response:
        if web.admin.exists():
            return RedirectResponse("/login", status_code=303)
        if request.method == "GET":
            return web.render(request, "setup.html")
        try:
            form = await web.form(request)
        except _Refused as exc:
            return PlainTextResponse(exc.text, status_code=exc.status)
        user, pw, pw2 = str(form.get("username", "")).strip(), str(form.get("password", "")), str(form.get("password2", ""))
        error = "the two passwords differ" if pw != pw2 else ""
        if not error:
            try:
                await run_in_threadpool(web.admin.create, user, pw)
            except ValueError as exc:
                error = str(exc)
        if error:
            return web.render(request, "setup.html", status=400, error=error, username=user)
        b.record("admin_created", user, client=web.client(request))
        return _login_response(web.sessions.create(user))

    def _login_response(token: str) -> Response:
        r = RedirectResponse("/", status_code=303)
        r.set_cookie(COOKIE, token, httponly=True, samesite="strict", secure=cfg.web.tls,
                     max_age=int(cfg.web.session_hours * 3600), path="/")
        return r

    async def login(request: Request) -> Response:
        if not web.admin.exists():
            return RedirectResponse("/setup", status_code=303)
        if request.method == "GET":
            return web.render(request, "login.html")
        client = web.client(request)
        wait = web.limiter.blocked_for(client)
        if wait > 0:
            b.record("login_refused", "", client=client, reason="rate limited")
            return web.render(request, "login.html", status=429,
                              error=f"too many failed logins: try again in {wait:.0f} s")
        try:
            form = await web.form(request)
        except _Refused as exc:
            return PlainTextResponse(exc.text, status_code=exc.status)
        user, pw = str(form.get("username", "")), str(form.get("password", ""))
        if not await run_in_threadpool(web.admin.verify, user, pw):
            web.limiter.failed(client)
            b.record("login_failed", user[:64], client=client)
            return web.render(request, "login.html", status=401, error="wrong user name or password", username=user)
        web.limiter.succeeded(client)
        b.record("login", user, client=client)
        return _login_response(web.sessions.create(user))

    @page(web, post=True)
    async def logout(request: Request, s: Session, form: Any) -> Response:
        web.sessions.drop(request.cookies.get(COOKIE))
        b.record("logout", s.user)
        r = RedirectResponse("/login", status_code=303)
        r.delete_cookie(COOKIE, path="/")
        return r

    # ------------------------------------------------------------------ dashboard and live events
    @page(web)
    async def dashboard(request: Request, s: Session) -> Response:
        return web.render(request, "dashboard.html", live=web.live.snapshot(), mqtt=cfg.mqtt.enabled)

    @page(web)
    async def status(request: Request, s: Session) -> Response:
        return Response(json.dumps(web.live.snapshot()), media_type="application/json")

    @page(web)
    async def events(request: Request, s: Session) -> Response:
        q = web.live.subscribe()

        async def stream() -> Any:
            try:
                yield "retry: 3000\n\n"
                while True:
                    try:
                        msg = await asyncio.wait_for(q.get(), timeout=15.0)
                    except asyncio.TimeoutError:
                        yield ": keep-alive\n\n"
                        continue
                    yield f"data: {json.dumps(msg)}\n\n"
            finally:
                web.live.unsubscribe(q)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"x-accel-buffering": "no"})

    # ------------------------------------------------------------------ people
    @page(web)
    async def people(request: Request, s: Session) -> Response:
        return web.render(request, "people.html", people=await run_in_threadpool(b.people))

    @page(web, post=True)
    async def people_add(request: Request, s: Session, form: Any) -> Response:
        name = str(form.get("name", "")).strip()
        uploads = await _uploads(form)
        if not uploads:
            return web.render(request, "people.html", status=400, people=await run_in_threadpool(b.people),
                              error="choose at least one photo", name=name)
        outcome = await run_in_threadpool(b.enroll_uploads, name, uploads, s.user)
        return web.render(request, "enrolled.html", status=200 if not outcome.error else 400, outcome=outcome)

    async def _uploads(form: Any) -> list[tuple[str, bytes]]:
        out = []
        for f in form.getlist("photos"):
            if hasattr(f, "read"):
                data = await f.read()
                if data:
                    out.append((Path(f.filename or "photo").name[:80], data))
        return out

    def _pid(request: Request) -> int:
        try:
            return int(request.path_params["pid"])
        except (KeyError, ValueError):
            raise _Refused(404, "no such person") from None

    @page(web)
    async def person(request: Request, s: Session) -> Response:
        try:
            p = await run_in_threadpool(b.person, _pid(request))
        except EdgefaceError:
            return PlainTextResponse("no such person", status_code=404)
        return web.render(request, "person.html", p=p, days=DAYS)

    @page(web, post=True)
    async def person_photos(request: Request, s: Session, form: Any) -> Response:
        p = await run_in_threadpool(b.person, _pid(request))
        outcome = await run_in_threadpool(b.enroll_uploads, p.name, await _uploads(form), s.user)
        return web.render(request, "enrolled.html", status=200 if not outcome.error else 400, outcome=outcome)

    @page(web, post=True)
    async def person_update(request: Request, s: Session, form: Any) -> Response:
        pid = _pid(request)
        action = str(form.get("action", ""))
        try:
            if action in ("enable", "disable"):
                await run_in_threadpool(b.set_enabled, pid, action == "enable", s.user)
            elif action == "schedule":
                days = [d for d in DAYS if form.get(f"day_{d}")]
                await run_in_threadpool(b.set_schedule, pid, days, str(form.get("start", "")),
                                        str(form.get("end", "")), s.user)
            elif action == "delete":
                p = await run_in_threadpool(b.person, pid)
                if str(form.get("confirm_name", "")).strip() != p.name:
                    return web.render(request, "person.html", status=400, p=p, days=DAYS,
                                      error=f"type the name {p.name!r} to confirm the deletion")
                await run_in_threadpool(b.remove, pid, s.user)
                return RedirectResponse("/people", status_code=303)
            else:
                return PlainTextResponse(f"unknown action {action[:32]!r}", status_code=400)
        except EdgefaceError as exc:
            p = await run_in_threadpool(b.person, pid)
            return web.render(request, "person.html", status=400, p=p, days=DAYS, error=str(exc))
        return RedirectResponse(f"/people/{pid}", status_code=303)

    # ------------------------------------------------------------------ access log
    @page(web)
    async def access_log(request: Request, s: Session) -> Response:
        qp = request.query_params
        error = ""
        try:
            since = parse_day_time(qp.get("since", ""))
            until = parse_day_time(qp.get("until", ""), end=True)
        except EdgefaceError as exc:
            since = until = None
            error = str(exc)
        rows = await run_in_threadpool(functools.partial(b.decisions, person=qp.get("person", ""),
                                                         result=qp.get("result", ""), since=since, until=until))
        names = [p.name for p in await run_in_threadpool(b.people)]
        return web.render(request, "log.html", rows=rows, names=names, results=RESULTS, q=qp, error=error,
                          message=qp.get("msg", ""))

    @page(web, post=True)
    async def log_label(request: Request, s: Session, form: Any) -> Response:
        event_id = request.path_params["event_id"]
        if not thumbnail_path_ok(event_id):
            return PlainTextResponse("no such decision", status_code=404)
        name = str(form.get("new_name") or form.get("name") or "").strip()
        try:
            if form.get("action") == "not":
                who = await run_in_threadpool(b.not_person, event_id, s.user)
                msg = f"removed the {who} photo that matched this face"
            else:
                who = await run_in_threadpool(b.label, event_id, name, s.user)
                msg = f"this face is now enrolled for {who}"
        except EdgefaceError as exc:
            msg = f"not done: {exc}"
        from urllib.parse import quote

        return RedirectResponse(f"/log?msg={quote(msg)}", status_code=303)

    @page(web)
    async def thumbnail(request: Request, s: Session) -> Response:
        event_id = request.path_params["event_id"]
        if not thumbnail_path_ok(event_id):
            return PlainTextResponse("not found", status_code=404)
        t = await run_in_threadpool(b.thumbs.get, event_id)
        if t is None:
            return PlainTextResponse("not found", status_code=404)
        return Response(t.jpeg, media_type="image/jpeg")

    @page(web)
    async def chip(request: Request, s: Session) -> Response:
        """The face from the web enrollment, else the person's latest decision, else a grey placeholder (people
        enrolled with the CLI have no stored picture: the gallery keeps embeddings only)."""
        pid = _pid(request)
        t = await run_in_threadpool(b.thumbs.get, f"enroll-{pid}")
        if t is None:
            t = await run_in_threadpool(b.thumbs.latest_of, pid)
        if t is None:
            return Response(PLACEHOLDER_SVG, media_type="image/svg+xml", headers={"x-placeholder": "1"})
        return Response(t.jpeg, media_type="image/jpeg")

    # ------------------------------------------------------------------ live view
    @page(web)
    async def live_page(request: Request, s: Session) -> Response:
        await run_in_threadpool(_want_live)
        return web.render(request, "live.html", interval=cfg.web.live_interval_s)

    def _want_live() -> None:
        """Tell the daemon someone is watching (it writes live.jpg only then: edgeface.daemon.snapshot)."""
        from edgeface.daemon.snapshot import REQUEST_NAME

        path = state_path(cfg, REQUEST_NAME)
        path.touch(mode=0o600, exist_ok=True)
        os.utime(path)

    @page(web)
    async def live_jpeg(request: Request, s: Session) -> Response:
        from edgeface.daemon.snapshot import LIVE_NAME, WATCH_S

        await run_in_threadpool(_want_live)
        path = state_path(cfg, LIVE_NAME)
        try:
            data = await run_in_threadpool(path.read_bytes)
            age = time.time() - path.stat().st_mtime
        except OSError:
            return PlainTextResponse("no live picture yet (is the daemon running? web.live_interval_s > 0?)",
                                     status_code=404)
        if age > WATCH_S:
            return PlainTextResponse(f"the last live picture is {age:.0f} s old: is the daemon running?",
                                     status_code=404)
        return Response(data, media_type="image/jpeg", headers={"x-snapshot-age-s": f"{age:.1f}"})

    # ------------------------------------------------------------------ remote unlock
    @page(web)
    async def unlock_page(request: Request, s: Session) -> Response:
        return web.render(request, "unlock.html", available=_unlock_problem())

    def _unlock_problem() -> str:
        m = cfg.mqtt
        if not m.enabled:
            return "MQTT is off (mqtt.enabled): the web app reaches the door only through the broker"
        if not m.remote_unlock:
            return "remote unlock is off in the config (mqtt.remote_unlock: false)"
        if not read_secret(m.remote_unlock_secret_env):
            return f"the signing secret ${m.remote_unlock_secret_env} is not set for edgeface-web"
        return ""

    @page(web, post=True)
    async def unlock(request: Request, s: Session, form: Any) -> Response:
        client = web.client(request)
        problem = _unlock_problem()
        if problem:
            b.record("remote_unlock", s.user, client=client, reason=problem, outcome="unavailable")
            return web.render(request, "unlock.html", status=409, available=problem)
        wait = web.limiter.blocked_for(client)
        if wait > 0:
            return web.render(request, "unlock.html", status=429, available="",
                              error=f"too many wrong passwords: try again in {wait:.0f} s")
        if not await run_in_threadpool(web.admin.verify, s.user, str(form.get("password", ""))):
            web.limiter.failed(client)
            b.record("remote_unlock", s.user, client=client, outcome="refused", reason="wrong password")
            return web.render(request, "unlock.html", status=401, available="", error="wrong password")
        from edgeface.events.remote import make_command

        command = make_command(read_secret(cfg.mqtt.remote_unlock_secret_env) or "", cfg.door.door_id)
        # the daemon verifies and audits it as `remote_unlock` (method signed), like any other signed command
        b.record("remote_unlock", s.user, client=client, outcome="sent", nonce=command["nonce"])
        sent = web.live.publish(web.live.topics.unlock_command, json.dumps(command))
        if not sent:
            b.record("remote_unlock", s.user, client=client, outcome="not_sent", nonce=command["nonce"],
                     reason="broker not connected")
        return web.render(request, "unlock.html", available="", sent=sent, nonce=command["nonce"])

    # ------------------------------------------------------------------ settings
    @page(web)
    async def settings(request: Request, s: Session) -> Response:
        data = await run_in_threadpool(_settings_data)
        return web.render(request, "settings.html", **data)

    def _settings_data() -> dict:
        from edgeface.config import load_config

        effective = cfg.model_dump(mode="json")  # secrets live in the environment; only their variable names here
        check = "config OK (built-in defaults)"
        if config_path is not None:
            try:
                load_config(config_path)
                check = f"config OK ({config_path})"
            except EdgefaceError as exc:
                check = str(exc)
        models = _model_checks()
        secrets = {k: ("set" if read_secret(v) else "not set") for k, v in (
            ("mqtt password", cfg.mqtt.password_env), ("remote unlock secret", cfg.mqtt.remote_unlock_secret_env),
            ("TOTP secret", cfg.mqtt.totp_secret_env))}
        return {"effective": json.dumps(effective, indent=2, sort_keys=True), "check": check, "models": models,
                "secrets": secrets}

    model_cache: dict[str, Any] = {}

    def _model_checks() -> list[dict]:
        """Size and sha256 of every shipped model, checked once per MODEL_CHECK_S (hashing them costs CPU the door
        may need)."""
        from edgeface.models import default_models_dir, load_manifest, verify_model_file

        if model_cache and time.monotonic() - model_cache["at"] < MODEL_CHECK_S:
            return model_cache["rows"]
        models = []
        models_dir = Path(cfg.models_dir) if cfg.models_dir else default_models_dir()
        try:
            for info in load_manifest(models_dir).values():
                try:
                    verify_model_file(models_dir / info.file, info)
                    st = "ok"
                except EdgefaceError as exc:
                    st = str(exc)
                models.append({"name": info.name, "kind": info.kind, "status": st})
        except EdgefaceError as exc:
            models.append({"name": "manifest", "kind": "", "status": str(exc)})
        model_cache.update(at=time.monotonic(), rows=models)
        return models

    async def on_startup() -> None:
        if start_live:
            web.live.start()

    async def on_shutdown() -> None:
        web.live.stop()
        b.close()

    routes = [
        Route("/setup", setup, methods=["GET", "POST"]),
        Route("/login", login, methods=["GET", "POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/", dashboard),
        Route("/status.json", status),
        Route("/events", events),
        Route("/people", people),
        Route("/people", people_add, methods=["POST"]),
        Route("/people/{pid:int}", person),
        Route("/people/{pid:int}", person_update, methods=["POST"]),
        Route("/people/{pid:int}/photos", person_photos, methods=["POST"]),
        Route("/people/{pid:int}/chip.jpg", chip),
        Route("/log", access_log),
        Route("/log/{event_id}", log_label, methods=["POST"]),
        Route("/thumb/{event_id}.jpg", thumbnail),
        Route("/live", live_page),
        Route("/live.jpg", live_jpeg),
        Route("/unlock", unlock_page),
        Route("/unlock", unlock, methods=["POST"]),
        Route("/settings", settings),
        Mount("/static", app=StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: Any) -> Any:
        await on_startup()
        try:
            yield
        finally:
            await on_shutdown()

    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.web = web
    app.add_middleware(SecurityHeaders, tls=cfg.web.tls)
    return app


def serve(cfg: EdgefaceConfig, *, config_path: Optional[Path] = None, host: Optional[str] = None,
          port: Optional[int] = None) -> None:
    """Run the app under uvicorn (one process, one worker), with TLS when web.tls is on."""
    import uvicorn

    kw: dict[str, Any] = {}
    if cfg.web.tls:
        from edgeface.web.tls import ensure_certificate

        cert, key = ensure_certificate(state_path(cfg, "web-tls"))
        kw = {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
    uvicorn.run(create_app(cfg, config_path=config_path), host=host or cfg.web.host, port=port or cfg.web.port,
                log_level="warning", access_log=False, proxy_headers=False, server_header=False,
                timeout_graceful_shutdown=2, **kw)


__all__ = ["create_app", "serve", "SECURITY_HEADERS", "COOKIE"]
