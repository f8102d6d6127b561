"""Helpers for the web app's tests: a real uvicorn server on a free port and a tiny cookie-keeping HTTP client."""
from __future__ import annotations

import http.client
import re
import threading
import time
import urllib.parse
import uuid
from typing import Any, Optional

from edgeface.testing import free_port


class ServerThread:
    """The app under uvicorn in a thread (the same server `edgeface web` runs), stopped on close()."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on", timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the web app did not start")
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


class Client:
    """HTTP/1.1 requests with a cookie jar of one cookie; redirects are returned, not followed."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.cookies: dict[str, str] = {}

    def request(self, method: str, path: str, *, form: Optional[dict] = None,
                files: Optional[list[tuple[str, str, bytes]]] = None, headers: Optional[dict] = None,
                body: Optional[bytes] = None) -> tuple[int, dict, bytes]:
        h = dict(headers or {})
        if self.cookies:
            h["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        if files is not None:
            boundary = uuid.uuid4().hex
            parts = []
            for k, v in (form or {}).items():
                parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
            for field, name, data in files:
                parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
                             f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
            body = b"".join(parts) + f"--{boundary}--\r\n".encode()
            h["Content-Type"] = f"multipart/form-data; boundary={boundary}"
        elif form is not None:
            body = urllib.parse.urlencode(form).encode()
            h["Content-Type"] = "application/x-www-form-urlencoded"
        if method == "POST" and body is None:
            body = b""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=h)
            r = conn.getresponse()
            data = r.read() if path != "/events" or r.status != 200 else b""
            headers_out = {k.lower(): v for k, v in r.getheaders()}
            for raw in r.headers.get_all("set-cookie") or []:
                name, _, rest = raw.partition("=")
                value = rest.split(";", 1)[0]
                if "max-age=0" in raw.lower() or 'expires=thu, 01 jan 1970' in raw.lower() or value in ('""', ""):
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = value
            return r.status, headers_out, data
        finally:
            conn.close()

    def get(self, path: str, **kw: Any) -> tuple[int, dict, bytes]:
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> tuple[int, dict, bytes]:
        return self.request("POST", path, **kw)

    def csrf(self, path: str = "/people") -> str:
        status, _h, body = self.get(path)
        assert status == 200, (path, status)
        m = re.search(rb'name="csrf" value="([^"]+)"', body)
        assert m, "no CSRF token on the page"
        return m.group(1).decode()
