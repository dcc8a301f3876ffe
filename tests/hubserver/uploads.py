"""TEST DOUBLE of the Hugging Face Hub's upload routes, writing real git commits that olah serves back.

Nothing installable implements the Hub's upload API, so this small Starlette app stands in for it:
``whoami-v2``, ``repos/create``, ``validate-yaml``, ``preupload``, the git-lfs batch API and the PUT of
LFS content, ``commit`` (NDJSON body, ``create_pr``), ``branch`` and ``tag``. Each commit is a real git
commit in the mirror folder that olah reads, so every upload is checked by reading it back through the
real download path.

Real behaviours it does NOT cover: Xet storage (tests set ``HF_HUB_DISABLE_XET=1``), organisations and
fine-grained permissions beyond "this token may write to these namespaces", rate limits, multipart LFS
uploads, LFS verify, server-side YAML validation, repo visibility (``private`` is recorded, not enforced),
gitignore handling and the no-op detection of unchanged files.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import gitrepos


def _error(status: int, message: str, code: str | None = None) -> Response:
    headers = {"X-Error-Message": message}
    if code:
        headers["X-Error-Code"] = code
    return JSONResponse({"error": message}, status_code=status, headers=headers)


@dataclass
class UploadState:
    """What the double knows: repos root, valid tokens and their namespaces, faults to inject, a log."""

    root: Path
    tokens: dict[str, tuple[str, set[str]]] = field(default_factory=dict)
    created: dict[str, dict] = field(default_factory=dict)
    faults: dict[str, list[int]] = field(default_factory=dict)
    log: list[tuple[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def repo_path(self, repo_id: str) -> Path:
        return self.root / "models" / repo_id

    def fail_next(self, route: str, status: int = 500, times: int = 1) -> None:
        """Make the next ``times`` requests to ``route`` (e.g. ``"commit"``) fail with ``status``."""
        self.faults.setdefault(route, []).extend([status] * times)

    def take_fault(self, route: str) -> int | None:
        pending = self.faults.get(route)
        return pending.pop(0) if pending else None


def build_routes(state: UploadState, base_url: callable) -> list[Route]:
    """Routes of the double; ``base_url()`` is the server's own URL (for LFS upload hrefs)."""

    def user(request: Request) -> tuple[str, set[str]] | None:
        auth = request.headers.get("authorization", "")
        token = auth.removeprefix("Bearer ").strip()
        return state.tokens.get(token)

    def check_write(request: Request, repo_id: str) -> Response | None:
        who = user(request)
        if who is None:
            return _error(401, "Invalid credentials in Authorization header")
        namespace = repo_id.split("/")[0]
        if namespace not in who[1]:
            return _error(403, f"You don't have the rights to create or write to {repo_id}", "Forbidden")
        return None

    async def whoami(request: Request) -> Response:
        state.log.append(("GET", "whoami"))
        who = user(request)
        if who is None:
            return _error(401, "Invalid credentials in Authorization header")
        orgs = [{"name": ns, "type": "org"} for ns in sorted(who[1]) if ns != who[0]]
        return JSONResponse({"type": "user", "name": who[0], "orgs": orgs, "auth": {"type": "access_token"}})

    async def validate_yaml(request: Request) -> Response:
        return JSONResponse({"errors": [], "warnings": []})

    async def create_repo(request: Request) -> Response:
        state.log.append(("POST", "repos/create"))
        body = await request.json()
        who = user(request)
        repo_id = f"{body.get('organization') or (who[0] if who else 'anonymous')}/{body['name']}"
        denied = check_write(request, repo_id)
        if denied:
            return denied
        url = f"{base_url()}/{repo_id}"
        with state.lock:
            path = state.repo_path(repo_id)
            if path.exists():
                return JSONResponse({"error": "You already created this model repo", "url": url}, 409)
            gitrepos.init_repo(path)
            state.created[repo_id] = {"visibility": body.get("visibility", "public")}
        return JSONResponse({"url": url, "name": repo_id, "id": repo_id})

    def repo_from(request: Request) -> str:
        return f"{request.path_params['org']}/{request.path_params['name']}"

    async def preupload(request: Request) -> Response:
        repo_id = repo_from(request)
        state.log.append(("POST", f"preupload {repo_id}"))
        denied = check_write(request, repo_id)
        if denied:
            return denied
        if not state.repo_path(repo_id).exists():
            return _error(404, f"Repository {repo_id} not found", "RepoNotFound")
        body = await request.json()
        files = [
            {
                "path": f["path"],
                "uploadMode": "lfs"
                if gitrepos.is_lfs_path(f["path"]) or f["size"] > 10_000_000
                else "regular",
                "shouldIgnore": False,
            }
            for f in body["files"]
        ]
        return JSONResponse({"files": files, "commitOid": gitrepos.head(state.repo_path(repo_id))})

    async def lfs_batch(request: Request) -> Response:
        repo_id = f"{request.path_params['org']}/{request.path_params['name'].removesuffix('.git')}"
        state.log.append(("POST", f"lfs-batch {repo_id}"))
        denied = check_write(request, repo_id)
        if denied:
            return denied
        body = await request.json()
        objects = []
        for obj in body["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if not gitrepos.lfs_object_path(state.repo_path(repo_id), obj["oid"]).exists():
                href = f"{base_url()}/__lfs_upload/{repo_id}/{obj['oid']}"
                entry["actions"] = {"upload": {"href": href}}
            objects.append(entry)
        return JSONResponse({"transfer": "basic", "objects": objects})

    async def lfs_put(request: Request) -> Response:
        repo_id, oid = repo_from(request), request.path_params["oid"]
        state.log.append(("PUT", f"lfs {repo_id} {oid[:12]}"))
        status = state.take_fault("lfs-put")
        if status:
            return _error(status, "injected failure of an LFS upload")
        content = await request.body()
        if hashlib.sha256(content).hexdigest() != oid:
            return _error(400, "LFS content does not match its oid")
        gitrepos.store_lfs_object(state.repo_path(repo_id), content)
        return Response(status_code=200)

    async def commit(request: Request) -> Response:
        repo_id, revision = repo_from(request), request.path_params["revision"]
        state.log.append(("POST", f"commit {repo_id}"))
        denied = check_write(request, repo_id)
        if denied:
            return denied
        status = state.take_fault("commit")
        if status:
            return _error(status, "injected failure of the commit request")
        repo = state.repo_path(repo_id)
        lines = [json.loads(line) for line in (await request.body()).splitlines() if line.strip()]
        header = next(item["value"] for item in lines if item["key"] == "header")
        files, lfs, deletions = {}, {}, []
        for item in lines:
            value = item["value"]
            if item["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "lfsFile":
                if not gitrepos.lfs_object_path(repo, value["oid"]).exists():
                    return _error(400, f"LFS object of {value['path']} was never uploaded")
                lfs[value["path"]] = (value["oid"], value["size"])
            elif item["key"] in ("deletedFile", "deletedFolder"):
                deletions.append(value["path"])
        create_pr = request.query_params.get("create_pr") == "1"
        with state.lock:
            parent = gitrepos.head(repo, revision)
            if parent is None:
                return _error(404, f"Revision {revision} not found", "RevisionNotFound")
            if header.get("parentCommit") and header["parentCommit"] != parent:
                return _error(412, "A commit has happened since. Please refresh and try again.")
            message = header["summary"] + (
                "\n\n" + header["description"] if header.get("description") else ""
            )
            if create_pr:
                number = 1 + sum(1 for r in gitrepos.git(repo, "for-each-ref", "refs/pr/").splitlines() if r)
                ref = f"refs/pr/{number}"
            else:
                ref = f"refs/heads/{revision}"
            sha = gitrepos.commit(
                repo, files, message=message, parent=parent, deletions=tuple(deletions), lfs_oids=lfs, ref=ref
            )
        result = {"commitUrl": f"{base_url()}/{repo_id}/commit/{sha}", "commitOid": sha}
        result["pullRequestUrl"] = f"{base_url()}/{repo_id}/discussions/{number}" if create_pr else None
        return JSONResponse(result)

    async def branch(request: Request) -> Response:
        repo_id = repo_from(request)
        denied = check_write(request, repo_id)
        if denied:
            return denied
        body = await request.json() if (await request.body()) else {}
        repo = state.repo_path(repo_id)
        start = gitrepos.head(repo, body.get("startingPoint") or "main")
        gitrepos.git(repo, "update-ref", f"refs/heads/{request.path_params['branch']}", start)
        return JSONResponse({})

    async def tag(request: Request) -> Response:
        repo_id = repo_from(request)
        denied = check_write(request, repo_id)
        if denied:
            return denied
        body = await request.json()
        repo = state.repo_path(repo_id)
        target = gitrepos.head(repo, request.path_params["revision"])
        gitrepos.git(repo, "update-ref", f"refs/tags/{body['tag']}", target)
        return JSONResponse({})

    return [
        Route("/api/whoami-v2", whoami, methods=["GET"]),
        Route("/api/validate-yaml", validate_yaml, methods=["POST"]),
        Route("/api/repos/create", create_repo, methods=["POST"]),
        Route("/api/models/{org}/{name}/preupload/{revision:path}", preupload, methods=["POST"]),
        Route("/api/models/{org}/{name}/commit/{revision:path}", commit, methods=["POST"]),
        Route("/api/models/{org}/{name}/branch/{branch:path}", branch, methods=["POST"]),
        Route("/api/models/{org}/{name}/tag/{revision:path}", tag, methods=["POST"]),
        Route("/{org}/{name}/info/lfs/objects/batch", lfs_batch, methods=["POST"]),
        Route("/__lfs_upload/{org}/{name}/{oid}", lfs_put, methods=["PUT"]),
    ]
