"""A tiny stand-in for the Hugging Face Hub's HTTP API, for testing the real `huggingface_hub` client offline.

It answers exactly the requests that `HfApi.create_repo(..., exist_ok=True)` and `HfApi.upload_folder(...)`
send in huggingface_hub 2.x (read from its source: hf_api.py, _upload_pipeline.py, _commit_api.py):

    GET  /api/agent-harnesses                      -> an empty registry (the client's User-Agent telemetry)
    POST /api/repos/create                         {"name", "organization", "visibility"?, "type"?}
         -> 200 {"url"} | 409 {"error", "url"} (exists: the client reads "url" from the 409 body too)
         | 403 when `deny_create` is set (the client then asks GET /api/models/{repo} whether it exists)
    GET  /api/models/{ns}/{name}[/revision/{rev}]  -> 200 model info {"id", "sha", "private", "siblings"}
                                                   | 404 RepoNotFound
    POST /api/models/{ns}/{name}/preupload/{rev}   {"files": [{"path", "sample", "size"}]}
         -> {"files": [{"path", "uploadMode": "regular", "shouldIgnore": false, "oid": <git sha1 or null>}]}
         | 403 for a repo added with `writable=False`
    POST /api/models/{ns}/{name}/commit/{rev}      NDJSON: {"key": "header", ...} then {"key": "file", "value":
         {"path", "content" (base64), "encoding": "base64"}} lines (upload_folder without delete_patterns)
         -> 200 {"commitUrl", "commitOid", ...} | 500 while `fail_commits` is set | 403 (not writable)

and, for downloads (`hf_hub_download`, diffusers' `from_pretrained` of a repo id):

    HEAD /{ns}/{name}/resolve/{rev}/{path}         -> 200 with X-Repo-Commit, ETag (the git blob id), Content-Length
    GET  /{ns}/{name}/resolve/{rev}/{path}         -> the file's bytes (rev: "main" or the repo's sha)
         | 404 RepoNotFound / RevisionNotFound / EntryNotFound

Every file is answered "regular", so contents travel base64-inline in the commit and the client never takes
its LFS or Xet paths (hf_xet's CAS protocol is out of scope for a stand-in). Anything else is answered 404 and
recorded in `unhandled`, so a test can assert that the client sent nothing unexpected.

    with HubStandIn() as hub:
        api = hub.api()                    # HfApi(endpoint=hub.endpoint, token=hub.token)
        ...
        hub.repos["fake-user/x"].files     # {"unet/config.json": b"...", ...}
        hub.commits[-1].files              # the files (path -> bytes) that one commit added

The server runs in a daemon thread of the calling process, bound to 127.0.0.1 on a free port, and is shut
down when the `with` block ends (or by `stop()`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


def git_blob_sha1(content: bytes) -> str:
    """The git object id of a blob: what the Hub reports as a regular file's oid (and the client compares)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Commit:
    repo_id: str
    revision: str
    summary: str
    description: str
    oid: str
    files: dict[str, bytes] = field(default_factory=dict)  # added or overwritten by this commit


@dataclass
class Repo:
    repo_id: str
    private: bool
    repo_type: str = "model"
    files: dict[str, bytes] = field(default_factory=dict)  # the state of the main branch
    sha: str = "0" * 40
    writable: bool = True  # False: the token may read it, but preupload / commit answer 403


@dataclass
class RawFile:
    """A response that is a file's bytes rather than JSON."""

    content: bytes
    headers: dict[str, str]


@dataclass
class Request:
    method: str
    path: str
    authorization: str | None


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, error_code: str | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.error_code, self.extra = status, message, error_code, extra or {}


class HubStandIn:
    # Asked by huggingface_hub (utils/_detect_agent.py) when it first builds its User-Agent header.
    TELEMETRY = ("/api/agent-harnesses",)

    def __init__(self, user: str = "fake-user", token: str = "hf_fake"):
        self.user = user
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.commits: list[Commit] = []
        self.requests: list[Request] = []
        self.unhandled: list[str] = []
        self.commit_attempts = 0
        # Switches a test flips: commits answer HTTP 500; create_repo answers 403 (no write access).
        self.fail_commits = False
        self.deny_create = False
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "start() the stand-in first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubStandIn:
        standin = self

        class Handler(_Handler):
            hub = standin

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-standin", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = self._thread = None

    def __enter__(self) -> HubStandIn:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def api(self):
        """A real `HfApi` client pointed at this stand-in, with its fake token."""
        from huggingface_hub import HfApi

        return HfApi(endpoint=self.endpoint, token=self.token)

    def add_repo(self, repo_id: str, private: bool = False, writable: bool = True) -> Repo:
        """Make a repo exist already (`writable=False`: one the token can read but not write)."""
        with self._lock:
            repo = self.repos[repo_id] = Repo(repo_id, private, writable=writable)
            return repo

    def calls(self) -> list[tuple[str, str]]:
        """(method, path) of the requests made, less the client's once-a-process telemetry fetch."""
        return [(r.method, r.path) for r in self.requests if r.path not in self.TELEMETRY]

    # ------------------------------------------------------------------ routes

    def handle(self, method: str, path: str, headers, body: bytes) -> tuple[int, dict | RawFile]:
        parts = [unquote(p) for p in urlsplit(path).path.strip("/").split("/")]
        with self._lock:
            self.requests.append(Request(method, urlsplit(path).path, headers.get("Authorization")))
            if not (headers.get("Authorization") or "").startswith("Bearer "):
                if method == "POST":
                    raise _HTTPError(401, "Invalid credentials in Authorization header")
            if method == "GET" and parts == ["api", "agent-harnesses"]:
                return 200, {"standardEnvVars": [], "harnesses": {}}
            if method == "POST" and parts == ["api", "validate-yaml"]:
                return 200, {"errors": [], "warnings": []}  # upload_folder checks a README.md's front matter first
            if method == "POST" and parts == ["api", "repos", "create"]:
                return self._create_repo(json.loads(body or b"{}"))
            if method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
                return self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
            if len(parts) >= 4 and parts[0] == "api" and parts[1] in ("models", "datasets", "spaces"):
                repo_id = f"{parts[2]}/{parts[3]}"
                rest = parts[4:]
                if method == "GET" and (rest == [] or (len(rest) == 2 and rest[0] == "revision")):
                    return 200, self._repo_info(repo_id)
                if method == "POST" and len(rest) == 2 and rest[0] == "preupload":
                    return 200, self._preupload(repo_id, json.loads(body))
                if method == "POST" and len(rest) == 2 and rest[0] == "commit":
                    return 200, self._commit(repo_id, rest[1], body)
            self.unhandled.append(f"{method} {path}")
            raise _HTTPError(404, f"The stand-in does not implement {method} {path}")

    def _repo(self, repo_id: str, write: bool = False) -> Repo:
        if repo_id not in self.repos:
            raise _HTTPError(404, f"Repository Not Found for url: {repo_id}", error_code="RepoNotFound")
        repo = self.repos[repo_id]
        if write and not repo.writable:
            raise _HTTPError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def _create_repo(self, payload: dict) -> tuple[int, dict]:
        namespace = payload.get("organization") or self.user
        repo_id = f"{namespace}/{payload['name']}"
        repo_type = payload.get("type") or "model"
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        url = f"{self.endpoint}/{prefix}{repo_id}"
        if self.deny_create:
            raise _HTTPError(
                403, f'You don\'t have the rights to create a {repo_type} under the namespace "{namespace}"'
            )
        if repo_id in self.repos:
            raise _HTTPError(409, f"You already created this {repo_type} repo", extra={"url": url})
        self.repos[repo_id] = Repo(repo_id, private=payload.get("visibility") == "private", repo_type=repo_type)
        return 200, {"url": url, "name": repo_id, "id": repo_id}

    def _repo_info(self, repo_id: str) -> dict:
        repo = self._repo(repo_id)
        return {
            "id": repo.repo_id,
            "sha": repo.sha,
            "private": repo.private,
            "siblings": [{"rfilename": path} for path in sorted(repo.files)],
        }

    def _resolve(self, repo_id: str, revision: str, path: str) -> tuple[int, RawFile]:
        repo = self._repo(repo_id)
        if revision not in ("main", repo.sha):
            raise _HTTPError(404, f"Invalid rev id: {revision}", error_code="RevisionNotFound")
        if path not in repo.files:
            raise _HTTPError(404, f"Entry not found: {path}", error_code="EntryNotFound")
        content = repo.files[path]
        headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{git_blob_sha1(content)}"'}
        return 200, RawFile(content, headers)

    def _preupload(self, repo_id: str, payload: dict) -> dict:
        repo = self._repo(repo_id, write=True)
        files = []
        for item in payload["files"]:
            remote = repo.files.get(item["path"])
            files.append(
                {
                    "path": item["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": git_blob_sha1(remote) if remote is not None else None,
                }
            )
        return {"files": files}

    def _commit(self, repo_id: str, revision: str, body: bytes) -> dict:
        self.commit_attempts += 1
        repo = self._repo(repo_id, write=True)
        if self.fail_commits:
            raise _HTTPError(500, "Internal Error - the stand-in was told to fail commits")
        header: dict = {}
        added: dict[str, bytes] = {}
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise _HTTPError(400, f"unsupported encoding {value.get('encoding')!r}")
                added[value["path"]] = base64.b64decode(value["content"])
            else:  # lfsFile, deletions, copies...: never asked for (regular files only, no delete_patterns)
                raise _HTTPError(422, f"The stand-in does not accept {key!r} commit operations")
        if not header:
            raise _HTTPError(400, "commit payload has no header line")
        oid = hashlib.sha1(f"{repo_id}:{len(self.commits)}:{header.get('summary')}".encode()).hexdigest()
        repo.files.update(added)
        repo.sha = oid
        self.commits.append(
            Commit(repo_id, revision, header.get("summary", ""), header.get("description", ""), oid, added)
        )
        return {
            "commitUrl": f"{self.endpoint}/{repo_id}/commit/{oid}",
            "commitOid": oid,
            "success": True,
            "pullRequestUrl": None,
        }


class _Handler(BaseHTTPRequestHandler):
    hub: HubStandIn
    protocol_version = "HTTP/1.0"  # one request per connection: nothing lingers after stop()

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _serve(self) -> None:
        body = self._body()
        headers = {}
        try:
            status, payload = self.hub.handle(self.command, self.path, self.headers, body)
        except _HTTPError as err:
            status, payload = err.status, {"error": err.message, **err.extra}
            if err.error_code:
                headers["X-Error-Code"] = err.error_code
        except Exception as err:
            status, payload = 500, {"error": f"stand-in crashed: {err!r}"}
        if isinstance(payload, RawFile):
            data, content_type = payload.content, "application/octet-stream"
            headers.update(payload.headers)
        else:
            data, content_type = json.dumps(payload).encode(), "application/json"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _serve

    def log_message(self, format, *args) -> None:  # keep the test output quiet
        pass
