"""A local Hugging Face Hub for tests: olah (offline mode) for downloads plus the upload test double.

One uvicorn server in a thread of the test process, on 127.0.0.1 and a free port. Requests go, in order,
to: the gate (a TEST DOUBLE answering 401 ``GatedRepo`` for repos marked gated, because olah has no
gated repos), the upload routes (``uploads.py``, a TEST DOUBLE), then the real olah app, which serves
the same git repositories from its ``mirrors-path`` in offline mode. olah's upstream points at a closed
local port so nothing can leave the machine.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from pathlib import Path

from starlette.responses import JSONResponse
from starlette.routing import Mount, Router

from . import gitrepos
from .uploads import UploadState, build_routes

_REPO_IN_PATH = re.compile(r"^/(?:api/models/)?([^/]+)/([^/]+?)(?:\.git)?(?:/|$)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _olah_config(root: Path, port: int) -> Path:
    closed = free_port()  # nothing listens there: olah's upstream is unreachable by construction
    path = root / "olah.toml"
    path.write_text(
        "[basic]\n"
        'host = "127.0.0.1"\n'
        f"port = {port}\n"
        f'repos-path = "{root / "olah-cache"}"\n'
        f'mirrors-path = ["{root / "mirrors"}"]\n'
        'hf-scheme = "http"\n'
        f'hf-netloc = "127.0.0.1:{closed}"\n'
        f'hf-lfs-netloc = "127.0.0.1:{closed}"\n'
        'mirror-scheme = "http"\n'
        f'mirror-netloc = "127.0.0.1:{port}"\n'
        f'mirror-lfs-netloc = "127.0.0.1:{port}"\n'
        "[accessibility]\n"
        "offline = true\n"
    )
    return path


async def _break_connection(send) -> None:
    """TEST DOUBLE of a network failure: promise a body, send none, and end (the client sees a broken read)."""
    headers = [(b"content-length", b"100000"), (b"content-type", b"application/octet-stream")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


class LocalHub:
    """The running server: ``url``, the mirror ``root``, repo helpers, gating, tokens and fault injection."""

    def __init__(self, root: Path) -> None:
        import uvicorn
        from olah.configs import OlahConfig
        from olah.server import AppSettings
        from olah.server import app as olah_app

        self.root = Path(root)
        (self.root / "mirrors" / "models").mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        olah_app.state.app_settings = AppSettings(config=OlahConfig(str(_olah_config(self.root, self.port))))
        olah_app.state.logger = logging.getLogger("olah")
        self.uploads = UploadState(self.root / "mirrors")
        self.gated: set[str] = set()
        self.broken_downloads: set[str] = set()
        self.requests: list[tuple[str, str]] = []
        self.router = Router(routes=[*build_routes(self.uploads, lambda: self.url), Mount("/", app=olah_app)])
        config = uvicorn.Config(self, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="local-hub", daemon=True)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            self.requests.append((scope["method"], scope["path"]))
            if scope["method"] == "GET" and scope["path"].rsplit("/", 1)[-1] in self.broken_downloads:
                await _break_connection(send)
                return
            match = _REPO_IN_PATH.match(scope["path"])
            if match and f"{match.group(1)}/{match.group(2)}" in self.gated:
                repo_id = f"{match.group(1)}/{match.group(2)}"
                message = f"Access to model {repo_id} is restricted. You must have access to it and be authenticated."
                response = JSONResponse(
                    {"error": message},
                    status_code=401,
                    headers={"X-Error-Code": "GatedRepo", "X-Error-Message": message},
                )
                await response(scope, receive, send)
                return
        await self.router(scope, receive, send)

    def start(self) -> LocalHub:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the local hub did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    # --- repositories -------------------------------------------------------------------------------
    def repo_path(self, repo_id: str) -> Path:
        return self.uploads.repo_path(repo_id)

    def add_repo(
        self, repo_id: str, folder: Path | None = None, files: dict[str, bytes] | None = None
    ) -> str:
        """Create ``repo_id`` holding the files of ``folder`` (LFS for weights) and ``files``; returns the sha."""
        path = self.repo_path(repo_id)
        parent = gitrepos.init_repo(path)
        content = {**(gitrepos.folder_files(folder) if folder else {}), **(files or {})}
        return gitrepos.commit(path, content, message="add model", parent=parent)

    def add_commit(self, repo_id: str, files: dict[str, bytes], message: str = "update") -> str:
        path = self.repo_path(repo_id)
        return gitrepos.commit(path, files, message=message, parent=gitrepos.head(path))

    def head(self, repo_id: str, ref: str = "main") -> str | None:
        return gitrepos.head(self.repo_path(repo_id), ref)

    def commit_count(self, repo_id: str, ref: str = "main") -> int:
        return gitrepos.commit_count(self.repo_path(repo_id), ref)

    def add_token(self, token: str, user: str, namespaces: set[str] | None = None) -> None:
        """Accept ``token`` for ``user``, allowed to write to its own namespace and ``namespaces``."""
        self.uploads.tokens[token] = (user, {user, *(namespaces or set())})
