"""A local stand-in for the Hugging Face Hub: just the endpoints `create_repo` + `create_commit` use.

Point huggingface_hub at it with `HF_ENDPOINT=<FakeHub.url>` (read at import time, so use a subprocess).
Endpoints served (huggingface_hub 2.4):

- POST /api/repos/create                                 create_repo
- GET  /api/models/{repo}[/revision/{rev}]               repo_info (create_repo's fallback after 401/403)
- POST /api/models/{repo}/branch/{branch}                create_branch
- POST /api/validate-yaml                                README.md front-matter check in create_commit
- POST /api/models/{repo}/preupload/{rev}                upload mode per file ("regular", or "lfs" by suffix)
- POST /{repo}.git/info/lfs/objects/batch                LFS batch (basic transfer), only for "lfs" files
- PUT  /_lfs/{oid}                                       the presigned-style LFS upload URL the batch hands out
- POST /api/models/{repo}/commit/{rev}                   the ndjson commit

Every request is recorded (method, path, query, lower-cased headers, body); commits keep their file bytes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

_REPO_ACTION = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<action>preupload|commit|branch)/(?P<rev>[^/]+)$")
_REPO_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")
_LFS_BATCH = re.compile(r"^/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch$")
_LFS_PUT = re.compile(r"^/_lfs/(?P<oid>[0-9a-f]{64})$")


@dataclass
class Request:
    """One HTTP request as the fake saw it."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    endpoint: str


@dataclass
class Commit:
    """One commit the fake accepted."""

    repo_id: str
    revision: str
    summary: str
    description: str
    files: dict[str, bytes]
    oid: str


@dataclass
class Repo:
    """A repo the fake knows: its creation payload and branch heads."""

    repo_id: str
    payload: dict[str, Any]
    branches: dict[str, str] = field(default_factory=lambda: {"main": "0" * 40})


class FakeHub:
    """Threaded HTTP server on 127.0.0.1 (ephemeral port) playing the Hub; use as a context manager.

    token: when set, every API call must carry `Authorization: Bearer <token>` or gets 401 (LFS PUTs are
    presigned on the real Hub, so they are exempt). fail: endpoint name ("create_repo", "repo_info", "branch",
    "validate_yaml", "preupload", "lfs_batch", "lfs_put", "commit", or "*") -> HTTP status to answer instead.
    lfs_suffixes: files whose names end so are answered "lfs" by preupload (needs HF_HUB_DISABLE_XET=1 in the
    client, since the fake speaks the legacy LFS protocol, not Xet). max_seconds: the server shuts itself down.
    """

    def __init__(
        self,
        *,
        token: str | None = None,
        fail: dict[str, int] | None = None,
        lfs_suffixes: tuple[str, ...] = (),
        max_seconds: float = 60.0,
    ) -> None:
        self.token = token
        self.fail = dict(fail or {})
        self.lfs_suffixes = lfs_suffixes
        self.requests: list[Request] = []
        self.repos: dict[str, Repo] = {}
        self.commits: list[Commit] = []
        self.lfs_objects: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        # A watchdog so a hung test can never leave the server running forever.
        self._watchdog = threading.Timer(max_seconds, self._server.shutdown)
        self._watchdog.daemon = True

    def __enter__(self) -> FakeHub:
        self._thread.start()
        self._watchdog.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop serving and free the port."""
        self._watchdog.cancel()
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()

    def endpoints(self) -> list[str]:
        """Endpoint names of the recorded requests, in order."""
        return [r.endpoint for r in self.requests]

    # -- request handling -------------------------------------------------------------------------------------

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 10  # socket timeout: a stalled client cannot pin a server thread

            def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
                pass

            def do_GET(self) -> None:
                hub._handle(self)

            def do_POST(self) -> None:
                hub._handle(self)

            def do_PUT(self) -> None:
                hub._handle(self)

        return Handler

    @staticmethod
    def _read_body(h: BaseHTTPRequestHandler) -> bytes:
        # httpx streams file uploads chunked; http.server does not decode that for us.
        if "chunked" in h.headers.get("Transfer-Encoding", "").lower():
            out = b""
            while True:
                size = int(h.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while h.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return out
                out += h.rfile.read(size)
                h.rfile.readline()
        length = int(h.headers.get("Content-Length") or 0)
        return h.rfile.read(length) if length else b""

    @staticmethod
    def _route(method: str, path: str) -> tuple[str, dict[str, str]]:
        if method == "POST" and path == "/api/repos/create":
            return "create_repo", {}
        if method == "POST" and path == "/api/validate-yaml":
            return "validate_yaml", {}
        if method == "POST" and (m := _REPO_ACTION.match(path)):
            return m["action"], {"repo": m["repo"], "rev": unquote(m["rev"])}
        if method == "GET" and (m := _REPO_INFO.match(path)):
            return "repo_info", {"repo": m["repo"], "rev": unquote(m["rev"] or "main")}
        if method == "POST" and (m := _LFS_BATCH.match(path)):
            return "lfs_batch", {"repo": m["repo"]}
        if method == "PUT" and (m := _LFS_PUT.match(path)):
            return "lfs_put", {"oid": m["oid"]}
        return "unknown", {}

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        body = self._read_body(h)  # always drain the body first, or an early error reply resets the connection
        split = urlsplit(h.path)
        endpoint, params = self._route(h.command, split.path)
        with self._lock:
            self.requests.append(
                Request(
                    h.command, split.path, split.query, {k.lower(): v for k, v in h.headers.items()}, body, endpoint
                )
            )
        status, payload = self._dispatch(h, endpoint, params, body)
        data = json.dumps(payload).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        if status >= 400 and isinstance(payload, dict) and "error" in payload:
            h.send_header("X-Error-Message", str(payload["error"]))
        h.end_headers()
        h.wfile.write(data)

    def _dispatch(
        self, h: BaseHTTPRequestHandler, endpoint: str, params: dict[str, str], body: bytes
    ) -> tuple[int, Any]:
        status = self.fail.get(endpoint) or self.fail.get("*")
        if status:
            return status, {"error": f"fake hub: injected {status} on {endpoint}"}
        if endpoint == "unknown":
            return 404, {"error": f"fake hub: no such endpoint {h.command} {h.path}"}
        if endpoint != "lfs_put" and self.token is not None:
            if h.headers.get("Authorization") != f"Bearer {self.token}":
                return 401, {"error": "Invalid credentials in Authorization header"}
        return getattr(self, f"_{endpoint}")(params, body)

    def _create_repo(self, params: dict[str, str], body: bytes) -> tuple[int, Any]:
        payload = json.loads(body)
        repo_id = f"{payload.get('organization') or 'fake-user'}/{payload['name']}"
        with self._lock:
            if repo_id in self.repos:
                return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
            self.repos[repo_id] = Repo(repo_id, payload)
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id}

    def _repo_info(self, params: dict[str, str], body: bytes) -> tuple[int, Any]:
        repo = self.repos.get(params["repo"])
        if repo is None or params["rev"] not in repo.branches:
            return 404, {"error": "Repository not found"}
        return 200, {"id": repo.repo_id, "sha": repo.branches[params["rev"]], "private": False, "siblings": []}

    def _branch(self, params: dict[str, str], body: bytes) -> tuple[int, Any]:
        repo = self.repos.get(params["repo"])
        if repo is None:
            return 404, {"error": "Repository not found"}
        if params["rev"] in repo.branches:
            return 409, {"error": "Reference already exists"}
        repo.branches[params["rev"]] = repo.branches["main"]
        return 200, {}

    def _validate_yaml(self, params: dict[str, str], body: bytes) -> tuple[int, Any]:
        return 200, {"errors": [], "warnings": []}

    def _preupload(self, params: dict[str, str], body: bytes) -> tuple[int, Any]:
        if params["repo"] not in self.repos:
            return 404, {"error": "Repository not found"}
        files = json.loads(body)["files"]
        modes = [
            {
                "path": f["path"],
                "uploadMode": "lfs" if f["path"].endswith(self.lfs_suffixes) and f["size"] else "regular",
                "shouldIgnore": False,
            }
            for f in files
        ]
        return 200, {"files": modes}

    def _lfs_batch(self, params: dict[str, str], body: bytes) -> tuple[int, Any]:
        objects = json.loads(body)["objects"]
        return 200, {
            "transfer": "basic",
            "objects": [
                {"oid": o["oid"], "size": o["size"], "actions": {"upload": {"href": f"{self.url}/_lfs/{o['oid']}"}}}
                for o in objects
            ],
        }

    def _lfs_put(self, params: dict[str, str], body: bytes) -> tuple[int, Any]:
        if hashlib.sha256(body).hexdigest() != params["oid"]:
            return 400, {"error": "sha256 mismatch"}
        with self._lock:
            self.lfs_objects[params["oid"]] = body
        return 200, {}

    def _commit(self, params: dict[str, str], body: bytes) -> tuple[int, Any]:
        repo = self.repos.get(params["repo"])
        if repo is None:
            return 404, {"error": "Repository not found"}
        if params["rev"] not in repo.branches:
            return 404, {"error": "Invalid rev id"}
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = lines[0]["value"]
        files: dict[str, bytes] = {}
        for item in lines[1:]:
            value = item["value"]
            if item["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "lfsFile":
                if value["oid"] not in self.lfs_objects:
                    return 400, {"error": f"LFS object {value['oid']} was never uploaded"}
                files[value["path"]] = self.lfs_objects[value["oid"]]
            else:
                return 400, {"error": f"fake hub: unsupported commit op {item['key']}"}
        oid = hashlib.sha1(body).hexdigest()
        with self._lock:
            self.commits.append(
                Commit(repo.repo_id, params["rev"], header["summary"], header.get("description", ""), files, oid)
            )
            repo.branches[params["rev"]] = oid
        return 200, {"commitUrl": f"{self.url}/{repo.repo_id}/commit/{oid}", "commitOid": oid, "success": True}
