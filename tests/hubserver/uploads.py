"""TEST DOUBLE of the Hugging Face Hub's upload routes, writing real git commits that olah serves back.

Nothing installable implements the Hub's upload API, so this small Starlette app stands in for it:
``whoami-v2``, ``repos/create``, ``validate-yaml`` (a subset of the Hub's metadata rules, see
``card_metadata_errors``), ``preupload``, the git-lfs batch API and the PUT of LFS content, ``commit`` (NDJSON
body, ``create_pr``), ``branch`` and ``tag``. Each commit is a real git
commit in the mirror folder that olah reads, so every upload is checked by reading it back through the
real download path.

Real behaviours it does NOT cover: Xet storage (tests set ``HF_HUB_DISABLE_XET=1``), organisations and
fine-grained permissions beyond "this token may write to these namespaces", rate limits, multipart LFS
uploads, LFS verify, the Hub's metadata rules beyond ``card_metadata_errors`` (and the full license
list), repo visibility (``private`` is recorded, not enforced),
gitignore handling and the no-op detection of unchanged files.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
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


# A subset of https://huggingface.co/docs/hub/repositories-licenses: the ids tests and common models use.
KNOWN_LICENSES = frozenset(
    {
        "apache-2.0", "mit", "openrail", "openrail++", "creativeml-openrail-m", "bigscience-openrail-m",
        "bigscience-bloom-rail-1.0", "bigcode-openrail-m", "afl-3.0", "artistic-2.0", "bsl-1.0", "bsd",
        "bsd-2-clause", "bsd-3-clause", "bsd-3-clause-clear", "cc", "cc0-1.0", "cc-by-2.0", "cc-by-3.0",
        "cc-by-4.0", "cc-by-sa-3.0", "cc-by-sa-4.0", "cc-by-nc-2.0", "cc-by-nc-3.0", "cc-by-nc-4.0",
        "cc-by-nd-4.0", "cc-by-nc-nd-4.0", "cc-by-nc-sa-4.0", "wtfpl", "ecl-2.0", "epl-2.0", "eupl-1.1",
        "agpl-3.0", "gfdl", "gpl", "gpl-2.0", "gpl-3.0", "lgpl", "lgpl-2.1", "lgpl-3.0", "isc", "ms-pl",
        "mpl-2.0", "odc-by", "odbl", "osl-3.0", "postgresql", "ofl-1.1", "ncsa", "unlicense", "zlib", "pddl",
        "llama2", "llama3", "llama3.1", "llama3.2", "llama3.3", "gemma", "unknown", "other",
    }
)  # fmt: skip
BASE_MODEL_RELATIONS = ("adapter", "merge", "quantized", "finetune")
_REPO_ID = re.compile(r"^(?:[\w.-]+/)?[\w.-]+$")


def card_metadata_errors(content: str) -> list[str]:
    """What the Hub's validate-yaml route refuses in a model card's YAML front matter (a subset).

    Rules, from the Hub docs (modelcard.md, repositories-licenses, model-cards#specifying-a-base-model) and
    huggingface_hub's ``EvalResult``: the front matter is a YAML mapping; ``license`` a known id or
    ``other``; ``base_model`` a repo id or a list of them; ``base_model_relation`` one of the documented
    values and only with a ``base_model``; ``tags``/``datasets``/``language`` strings or lists of strings;
    each ``model-index`` entry has a ``name`` and ``results``, each result a ``task.type``, ``dataset.type``
    and ``dataset.name`` and a non-empty ``metrics`` list whose items have ``type`` and ``value``.
    """
    if not content.startswith("---"):
        return []  # no metadata block: nothing to validate
    parts = content.split("---", 2)
    if len(parts) < 3:
        return ["the YAML front matter is not closed by a '---' line"]
    try:
        data = yaml.safe_load(parts[1])
    except yaml.YAMLError as exc:
        return [f"the YAML front matter does not parse: {exc}"]
    if data is None:
        return []
    if not isinstance(data, dict):
        return ["the YAML front matter must be a mapping"]
    errors = []

    def strings(value) -> bool:
        items = value if isinstance(value, list) else [value]
        return bool(items) and all(isinstance(v, str) and v for v in items)

    if "license" in data and (not isinstance(data["license"], str) or data["license"] not in KNOWN_LICENSES):
        errors.append(f'"license" must be one of the Hub\'s license ids or "other", got {data["license"]!r}')
    if "base_model" in data:
        value = data["base_model"]
        if not strings(value) or not all(
            _REPO_ID.match(v) for v in (value if isinstance(value, list) else [value])
        ):
            errors.append(f'"base_model" must be a model id or a list of model ids, got {value!r}')
    if "base_model_relation" in data:
        if data["base_model_relation"] not in BASE_MODEL_RELATIONS:
            errors.append(f'"base_model_relation" must be one of {", ".join(BASE_MODEL_RELATIONS)}')
        if "base_model" not in data:
            errors.append('"base_model_relation" needs a "base_model"')
    for key in ("tags", "datasets", "language"):
        if key in data and not strings(data[key]):
            errors.append(f'"{key}" must be a string or a list of strings')
    if "model-index" in data:
        errors += _model_index_errors(data["model-index"])
    return errors


def _model_index_errors(index) -> list[str]:
    if not isinstance(index, list) or not index:
        return ['"model-index" must be a non-empty list']
    errors = []
    for i, entry in enumerate(index):
        where = f'"model-index[{i}]"'
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
            errors.append(f"{where}.name is required")
            continue
        results = entry.get("results")
        if not isinstance(results, list):
            errors.append(f"{where}.results must be a list")
            continue
        for j, result in enumerate(results):
            at = f"{where}.results[{j}]"
            task, dataset = (result.get(k) if isinstance(result, dict) else None for k in ("task", "dataset"))
            if not isinstance(task, dict) or not isinstance(task.get("type"), str):
                errors.append(f"{at}.task.type is required")
            if not isinstance(dataset, dict) or not all(
                isinstance(dataset.get(k), str) for k in ("type", "name")
            ):
                errors.append(f"{at}.dataset.type and {at}.dataset.name are required")
            metrics = result.get("metrics") if isinstance(result, dict) else None
            if not isinstance(metrics, list) or not metrics:
                errors.append(f"{at}.metrics must be a non-empty list")
                continue
            for k, metric in enumerate(metrics):
                if not isinstance(metric, dict) or not isinstance(metric.get("type"), str):
                    errors.append(f"{at}.metrics[{k}].type is required")
                elif metric.get("value") is None:
                    errors.append(f"{at}.metrics[{k}].value is required")
    return errors


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
        state.log.append(("POST", "validate-yaml"))
        body = await request.json()
        errors = card_metadata_errors(body.get("content", ""))
        if errors:  # the Hub answers 400 with the reasons as text; huggingface_hub raises ValueError(text)
            return PlainTextResponse(
                "Invalid metadata in README.md.\n" + "\n".join(f"- {e}" for e in errors), 400
            )
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
