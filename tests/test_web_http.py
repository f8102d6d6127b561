"""The web app over real HTTP (uvicorn on a free port): who may reach what, CSRF, the login limit, file routes."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("starlette", reason="the web app's extra is not installed (pip install '.[web]')")

from starlette.routing import Mount, Route  # noqa: E402

from edgeface.config import parse_config  # noqa: E402
from edgeface.web.app import COOKIE, create_app  # noqa: E402
from webutil import Client, ServerThread  # noqa: E402

PASSWORD = "correct horse battery"
PUBLIC = {"/login", "/setup"}


@pytest.fixture
def served(tmp_path):
    cfg = parse_config({"state_dir": str(tmp_path / "state"), "mqtt": {"enabled": False}})
    app = create_app(cfg, start_live=False)
    server = ServerThread(app)
    yield app, server, cfg
    server.close()


def admin_client(server) -> Client:
    c = Client(server.port)
    status, headers, _ = c.post("/setup", form={"username": "owner", "password": PASSWORD, "password2": PASSWORD})
    assert status == 303 and headers["location"] == "/"
    return c


def concrete(path: str) -> str:
    return path.replace("{pid:int}", "1").replace("{event_id}", "abc123")


def every_route(app) -> list[tuple[str, str]]:
    out = []
    for r in app.routes:
        if isinstance(r, Route) and r.path not in PUBLIC:
            for m in sorted(r.methods or []):
                if m != "HEAD":
                    out.append((m, concrete(r.path)))
    return out


def test_every_route_but_login_refuses_an_anonymous_request(served):
    app, server, _cfg = served
    routes = every_route(app)
    assert ("GET", "/") in routes and ("POST", "/unlock") in routes and ("GET", "/events") in routes
    anon = Client(server.port)
    for method, path in routes:  # before the first-run setup: sent to /setup, nothing served
        status, headers, body = anon.request(method, path)
        assert status in (303, 401), (method, path, status)
        if status == 303:
            assert headers["location"] == "/setup"
    admin_client(server)
    for method, path in routes:  # after it: anonymous is still refused everywhere
        status, headers, body = anon.request(method, path)
        assert status in (303, 401), (method, path, status)
        if status == 303:
            assert headers["location"] == "/login", (method, path)
        assert b"owner" not in body


def test_first_run_setup_happens_once_and_the_session_cookie_is_strict(served):
    _app, server, cfg = served
    c = Client(server.port)
    status, headers, _ = c.get("/")
    assert status == 303 and headers["location"] == "/setup"
    status, headers, _ = c.post("/setup", form={"username": "owner", "password": "short", "password2": "short"})
    assert status == 400  # no weak password
    status, headers, _ = c.post("/setup", form={"username": "owner", "password": PASSWORD, "password2": PASSWORD})
    cookie = headers["set-cookie"].lower()
    assert status == 303 and "httponly" in cookie and "samesite=strict" in cookie
    stored = json.loads((tmp := (cfg.state_dir + "/web-admin.json")) and open(tmp).read())
    assert stored["kdf"] == "scrypt" and PASSWORD not in json.dumps(stored)
    # a second setup cannot take the door over
    other = Client(server.port)
    status, headers, _ = other.post("/setup", form={"username": "mallory", "password": "x" * 12, "password2": "x" * 12})
    assert status == 303 and headers["location"] == "/login"
    assert json.loads(open(tmp).read())["username"] == "owner"
    status, _h, body = c.get("/")
    assert status == 200 and b"Dashboard" in body


def test_security_headers_on_every_page(served):
    _app, server, _cfg = served
    c = admin_client(server)
    for path in ("/", "/login", "/people", "/settings"):
        _s, headers, _b = c.get(path)
        assert "frame-ancestors 'none'" in headers["content-security-policy"], path
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["x-frame-options"] == "DENY"


def test_a_state_change_without_the_csrf_token_is_refused(served):
    _app, server, _cfg = served
    c = admin_client(server)
    token = c.csrf()
    status, _h, body = c.post("/people", form={"name": "mallory"})
    assert status == 403 and b"CSRF" in body
    status, _h, _b = c.post("/people", form={"name": "mallory", "csrf": "not-the-token"})
    assert status == 403
    status, _h, _b = c.post("/logout", form={})
    assert status == 403 and c.get("/")[0] == 200  # still logged in: the logout was refused too
    status, headers, _b = c.post("/logout", form={"csrf": token})
    assert status == 303 and c.get("/")[0] == 303


def test_login_is_rate_limited_and_a_wrong_password_refused(served):
    _app, server, _cfg = served
    admin_client(server)
    c = Client(server.port)
    status, _h, body = c.post("/login", form={"username": "owner", "password": "wrong password"})
    assert status == 401 and b"wrong user name or password" in body and COOKIE not in c.cookies
    for _ in range(4):
        assert c.post("/login", form={"username": "owner", "password": "still wrong"})[0] == 401
    status, _h, body = c.post("/login", form={"username": "owner", "password": PASSWORD})
    assert status == 429 and b"too many failed logins" in body  # even the right password waits now
    assert COOKIE not in c.cookies


def test_the_audit_log_records_admin_actions(served):
    _app, server, cfg = served
    c = admin_client(server)
    Client(server.port).post("/login", form={"username": "owner", "password": "nope nope nope"})
    c.post("/logout", form={"csrf": c.csrf()})
    from edgeface.events.audit import AuditLog

    audit = AuditLog(f"{cfg.state_dir}/audit.db")
    try:
        actions = [r["result"] for r in audit.rows("web")]
    finally:
        audit.close()
    assert actions == ["admin_created", "login_failed", "logout"]


@pytest.mark.parametrize("path", ["/thumb/..%2F..%2Fweb-admin.json.jpg", "/thumb/%2e%2e%2fgallery.db.jpg",
                                  "/static/../web-admin.json", "/static/%2e%2e/app.py", "/static/..%2Fapp.py",
                                  "/static/%2e%2e%2f%2e%2e%2fweb-admin.json", "/people/..%2F1/chip.jpg"])
def test_no_path_traversal_in_file_routes(served, path):
    _app, server, _cfg = served
    c = admin_client(server)
    status, _h, body = c.get(path)
    assert status == 404, (path, status)
    assert b"scrypt" not in body and b"import" not in body


def test_static_files_are_served_from_the_package(served):
    _app, server, _cfg = served
    status, headers, body = Client(server.port).get("/static/app.js")
    assert status == 200 and b"EventSource" in body and headers["x-content-type-options"] == "nosniff"


def test_an_upload_over_the_size_cap_is_refused_before_it_is_read(tmp_path):
    cfg = parse_config({"state_dir": str(tmp_path / "state"), "mqtt": {"enabled": False},
                        "web": {"max_upload_mb": 0.1}})
    server = ServerThread(create_app(cfg, start_live=False))
    try:
        c = admin_client(server)
        token = c.csrf()
        status, _h, body = c.post("/people", form={"csrf": token, "name": "big"},
                                  files=[("photos", "big.jpg", b"\xff" * 200_000)])
        assert status == 413 and b"web.max_upload_mb" in body
    finally:
        server.close()


def test_remote_unlock_says_why_it_is_unavailable_and_records_the_try(served):
    _app, server, cfg = served
    c = admin_client(server)
    status, _h, body = c.get("/unlock")
    assert status == 200 and b"MQTT is off" in body
    status, _h, body = c.post("/unlock", form={"csrf": c.csrf(), "password": PASSWORD})
    assert status == 409


def test_tls_serves_with_a_generated_self_signed_certificate(tmp_path):
    import ssl
    import threading
    import time

    import uvicorn

    from edgeface.testing import free_port
    from edgeface.web.tls import ensure_certificate

    cert, key = ensure_certificate(tmp_path / "web-tls")
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    assert ensure_certificate(tmp_path / "web-tls") == (cert, key)  # made once, then reused
    cfg = parse_config({"state_dir": str(tmp_path / "state"), "mqtt": {"enabled": False}, "web": {"tls": True}})
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(cfg, start_live=False), host="127.0.0.1", port=port,
                                           log_level="warning", ssl_certfile=str(cert), ssl_keyfile=str(key)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        ctx = ssl.create_default_context(cafile=str(cert))
        import http.client

        conn = http.client.HTTPSConnection("localhost", port, context=ctx, timeout=10)
        conn.request("POST", "/setup", body="username=owner&password=correct+horse+battery&password2=correct+horse+battery",
                     headers={"Content-Type": "application/x-www-form-urlencoded"})
        r = conn.getresponse()
        assert r.status == 303 and "secure" in r.getheader("set-cookie").lower()
        assert "max-age" in r.getheader("strict-transport-security")
        conn.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_a_person_that_does_not_exist_is_a_clear_answer_not_a_crash(served):
    _app, server, _cfg = served
    c = admin_client(server)
    token = c.csrf("/unlock")
    status, _h, body = c.post("/people/999", form={"csrf": token, "action": "disable"})
    assert status == 400 and b"no person with id 999" in body
    status, _h, body = c.post("/log/abc123", form={"csrf": token, "name": "alice"})
    assert status == 303 and "not%20done" in _h["location"]


def test_enroll_by_upload_then_schedule_disable_and_delete_with_confirmation(served):
    from pathlib import Path

    from edgeface.testing import jpeg_header_bomb

    _app, server, cfg = served
    faces = Path(__file__).resolve().parent / "fixtures" / "faces" / "barack_obama"
    c = admin_client(server)
    token = c.csrf()
    files = [("photos", p.name, p.read_bytes()) for p in sorted(faces.glob("*.jpg"))[:2]]
    files.append(("photos", "bomb.jpg", jpeg_header_bomb(60000, 60000)))
    status, _h, body = c.post("/people", form={"csrf": token, "name": "alice"}, files=files)
    assert status == 200 and b"2 photos added." in body
    assert b"bomb.jpg</b>: rejected: " in body and b"pixels" in body  # refused from its header, never decoded
    people = c.get("/people")[2].decode()
    pid = int(people.split('href="/people/')[1].split('"')[0])
    assert c.get(f"/people/{pid}/chip.jpg")[1]["content-type"] == "image/jpeg"
    form = {"csrf": token, "action": "schedule", "day_mon": "on", "day_tue": "on", "start": "08:00", "end": "18:00"}
    assert c.post(f"/people/{pid}", form=form)[0] == 303
    assert c.post(f"/people/{pid}", form={"csrf": token, "action": "disable"})[0] == 303
    page = c.get(f"/people/{pid}")[2]
    assert b"disabled" in page and b'name="day_mon" checked' in page and b'value="08:00"' in page
    status, _h, body = c.post(f"/people/{pid}", form={"csrf": token, "action": "delete", "confirm_name": "alicia"})
    assert status == 400 and b"to confirm the deletion" in body
    status, headers, _b = c.post(f"/people/{pid}", form={"csrf": token, "action": "delete", "confirm_name": "alice"})
    assert status == 303 and headers["location"] == "/people"
    assert b"Nobody is enrolled yet" in c.get("/people")[2]
    _s, headers, _b = c.get(f"/people/{pid}/chip.jpg")
    assert headers.get("x-placeholder") == "1"  # the face chip went with the person
    from edgeface.events.audit import AuditLog

    audit = AuditLog(f"{cfg.state_dir}/audit.db")
    try:
        actions = [r["result"] for r in audit.rows("web")]
    finally:
        audit.close()
    assert actions[-4:] == ["enroll", "schedule", "disable", "delete"]
