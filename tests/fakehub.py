"""fakehub: a fake Hugging Face Hub for tests, sitting at the network boundary.

This is a *test double* of the Hub's HTTP API, not a mock of ``huggingface_hub``: a real HTTP
server (stdlib ``http.server``, no dependencies) on 127.0.0.1 that an unmodified
``huggingface_hub`` client (0.23 to 2.x, requests- or httpx-based) reaches through its normal HTTP
stack once ``HF_ENDPOINT=http://127.0.0.1:PORT`` is set *before huggingface_hub is first imported*
(see ``hubclient.point_loaded_client_at`` for a client imported earlier). Model repos only; state is
in memory.

Real Hub endpoints imitated (what hf_hub_download / HfApi call):
  HEAD|GET /{repo}/resolve/{rev}/{path}            file download: X-Repo-Commit, ETag, Content-Length,
                                                   X-Linked-Etag/-Size for LFS files, Range;
                                                   404 + X-Error-Code (RepoNotFound, RevisionNotFound, ...)
  GET      /api/models/{repo}[/revision/{rev}]     model_info / repo_info / repo_exists
  GET      /api/models/{repo}/tree/{rev}[/{path}]  list_repo_tree / list_repo_files (no pagination)
  GET      /api/models/{repo}/refs                 list_repo_refs
  GET      /api/whoami-v2                          whoami
  POST     /api/repos/create                       create_repo (409 + {"url"} when it exists: exist_ok)
  POST     /api/validate-yaml                      README.md metadata check before a commit (always valid)
  POST|DELETE /api/models/{repo}/branch/{branch}   create_branch (409 when it exists) / delete_branch
  POST     /api/models/{repo}/preupload/{rev}      uploadMode per file: "regular" unless lfs_patterns match
  POST     /api/models/{repo}/commit/{rev}         create_commit / upload_* (NDJSON: header, file, lfsFile,
                                                   deletedFile, deletedFolder; ?create_pr=1 -> refs/pr/N)
  POST     /{repo}.git/info/lfs/objects/batch     git-LFS batch API, "basic" transfer, whose upload href is
  PUT      /_fake_lfs/{repo}/{sha256}              this server (the real Hub points at S3 instead)
Not imitated: Xet storage (keep lfs_patterns empty when hf_xet is installed in 2.x, which sends every
"lfs" file to Xet), CDN redirects, datasets/spaces, private/gated repos, pagination, token checks
beyond "an Authorization header is present" on writes.

Test hooks: ``hub.add_repo`` seeds a repo, ``hub.files`` reads one back, ``hub.calls`` logs every
request, ``hub.fail`` injects HTTP errors / dropped connections / delays, ``hub.missing_repo_status``
switches unknown repos from 404 to 401 (what the real Hub answers when not logged in).
"""
from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

_NOW = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
_GITATTRIBUTES = (b"*.bin filter=lfs diff=lfs merge=lfs -text\n"
                  b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
_R = r"(?P<repo>[^/]+(?:/[^/]+)?)"  # "name" or "namespace/name"
ROUTES = [(m, re.compile(p), h) for m, p, h in [
    ("GET", r"^/api/whoami-v2$", "whoami"),
    ("POST", r"^/api/repos/create$", "create_repo"),
    ("POST", r"^/api/validate-yaml$", "validate_yaml"),
    ("GET", rf"^/api/models/{_R}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$", "tree"),
    ("GET", rf"^/api/models/{_R}/refs$", "refs"),
    ("POST", rf"^/api/models/{_R}/branch/(?P<branch>[^/]+)$", "create_branch"),
    ("DELETE", rf"^/api/models/{_R}/branch/(?P<branch>[^/]+)$", "delete_branch"),
    ("POST", rf"^/api/models/{_R}/preupload/(?P<rev>[^/]+)$", "preupload"),
    ("POST", rf"^/api/models/{_R}/commit/(?P<rev>[^/]+)$", "commit"),
    ("GET", rf"^/api/models/{_R}(?:/revision/(?P<rev>[^/]+))?$", "model_info"),
    ("POST", rf"^/{_R}\.git/info/lfs/objects/batch$", "lfs_batch"),
    ("PUT", rf"^/_fake_lfs/{_R}/(?P<oid>[0-9a-f]{{64}})$", "lfs_put"),
    ("HEAD", rf"^/{_R}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$", "resolve"),
    ("GET", rf"^/{_R}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$", "resolve"),
]]


def git_blob_sha1(data: bytes) -> str:
    """The git blob id the Hub uses as ETag / oid of a regular (non-LFS) file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Call:
    """One logged request. ``status`` is None for a dropped connection."""
    method: str
    path: str
    query: dict
    headers: dict
    status: int | None = None
    routed: bool = False  # False: no imitated endpoint matched (the client asked for something else)


@dataclass
class Fault:
    """An injected failure; see FakeHub.fail."""
    status: int = 500
    times: int | None = 1  # None: until cleared
    method: str | None = None
    path: re.Pattern | None = None
    drop: bool = False
    delay: float = 0.0
    hits: int = 0


@dataclass
class Repo:
    commits: dict = field(default_factory=dict)  # sha -> {path: bytes}
    branches: dict = field(default_factory=dict)  # "main", "dev", "refs/pr/1" -> sha
    lfs: set = field(default_factory=set)  # sha256 of the LFS objects this repo holds
    n_prs: int = 0


class HubError(Exception):
    def __init__(self, status, message, code=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class FakeHub:
    """In-memory Hub model repos behind a ThreadingHTTPServer. The port is bound in __init__ (so
    HF_ENDPOINT can be exported before huggingface_hub is imported); ``start()`` begins serving."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, username: str = "fake-user"):
        self.username = username
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, bytes] = {}  # sha256 -> content (the LFS object store)
        self.calls: list[Call] = []
        self.faults: list[Fault] = []
        self.errors: list[str] = []  # tracebacks of fakehub's own bugs (answered 500 "internal error")
        self.lfs_patterns: list[str] = []  # fnmatch patterns answered "lfs" by preupload, served LFS-style
        self.missing_repo_status = 404  # 401: like the real Hub for anonymous requests
        self.missing_repo_error_code = True  # False: bare 401/404 without X-Error-Code
        self._lock = threading.RLock()
        self._n = 0
        self.server = _Server((host, port), type("Handler", (_Handler,), {"hub": self}))
        self.server.daemon_threads = True
        self.endpoint = f"http://{host}:{self.server.server_address[1]}"
        self._thread: threading.Thread | None = None

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> FakeHub:
        if self._thread is None:
            self._thread = threading.Thread(target=self.server.serve_forever, name="fakehub", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ---- test hooks --------------------------------------------------------------------------
    def add_repo(self, repo_id: str, files: dict[str, bytes], branch: str = "main") -> str:
        """Create (or add a commit to) a repo holding exactly ``files`` on ``branch``; returns the sha."""
        with self._lock:
            repo = self.repos.setdefault(repo_id, Repo())
            return self._commit(repo_id, repo, branch, dict(files), "seed")

    def remove_repo(self, repo_id: str) -> None:
        """Delete a repo (unknown ids are ignored), as if it had never been created."""
        with self._lock:
            self.repos.pop(repo_id, None)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        with self._lock:
            return dict(self._tree(repo_id, revision)[1])

    def fail(self, status: int = 500, *, times: int | None = 1, method: str | None = None,
             path: str | None = None, drop: bool = False, delay: float = 0.0) -> Fault:
        """Make the next ``times`` requests (None: all, until ``clear_faults``) whose method matches and
        whose path matches regex ``path`` (re.search) fail with ``status``, or close the connection
        without an answer (``drop``), after sleeping ``delay`` s (with status=0: delay only)."""
        fault = Fault(status, times, method, re.compile(path) if path else None, drop, delay)
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()

    def reset(self) -> None:
        """Forget calls, faults and switches (repos are kept)."""
        with self._lock:
            self.calls.clear()
            self.faults.clear()
            self.lfs_patterns = []
            self.missing_repo_status, self.missing_repo_error_code = 404, True

    def requests(self, method: str | None = None, path: str | None = None) -> list[tuple[str, str]]:
        """(method, path) of logged calls, filtered by method and path regex (re.search)."""
        with self._lock:
            return [(c.method, c.path) for c in self.calls if (method is None or c.method == method)
                    and (path is None or re.search(path, c.path))]

    # ---- state helpers -----------------------------------------------------------------------
    def _is_lfs(self, path: str) -> bool:
        name = path.rsplit("/", 1)[-1]
        return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(name, p) for p in self.lfs_patterns)

    def _repo(self, repo_id: str) -> Repo:
        if repo_id not in self.repos:
            status = self.missing_repo_status
            message = "Invalid username or password." if status == 401 else "Repository not found"
            raise HubError(status, message, "RepoNotFound" if self.missing_repo_error_code else None)
        return self.repos[repo_id]

    def _resolve(self, repo_id: str, rev: str | None) -> str:
        repo, rev = self._repo(repo_id), rev or "main"
        if rev in repo.branches:
            return repo.branches[rev]
        if rev in repo.commits:
            return rev
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def _tree(self, repo_id: str, rev: str | None) -> tuple[str, dict[str, bytes]]:
        sha = self._resolve(repo_id, rev)
        return sha, self.repos[repo_id].commits[sha]

    def _commit(self, repo_id: str, repo: Repo, branch: str, files: dict, summary: str) -> str:
        self._n += 1
        digest = hashlib.sha1(f"{repo_id}\n{branch}\n{summary}\n{self._n}".encode())
        for path in sorted(files):
            digest.update(f"{path}:{git_blob_sha1(files[path])}\n".encode())
        sha = digest.hexdigest()
        repo.commits[sha], repo.branches[branch] = files, sha
        for path, data in files.items():
            if self._is_lfs(path):
                repo.lfs.add(hashlib.sha256(data).hexdigest())
                self.blobs.setdefault(hashlib.sha256(data).hexdigest(), data)
        return sha

    def _entry(self, path: str, data: bytes) -> dict:
        entry = {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": path}
        if self._is_lfs(path):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry

    # ---- endpoints: each returns (status, json-able body or bytes, extra headers) --------------
    def h_whoami(self, req):
        token = {"displayName": "fake", "role": "write"}
        return 200, {"type": "user", "name": self.username, "fullname": "Fake User", "orgs": [],
                     "auth": {"type": "access_token", "accessToken": token}}, {}

    def h_validate_yaml(self, req):  # README.md metadata check made before commits; accepts anything
        return 200, {"errors": [], "warnings": []}, {}

    def h_create_repo(self, req):
        body = req.json()
        if body.get("type", "model") != "model":
            raise HubError(400, "fakehub only holds model repos")
        repo_id = f"{body.get('organization') or self.username}/{body['name']}"
        url = f"{self.endpoint}/{repo_id}"
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": url}, {}
        self.repos[repo_id] = Repo()
        self._commit(repo_id, self.repos[repo_id], "main", {".gitattributes": _GITATTRIBUTES}, "initial")
        return 200, {"url": url, "name": repo_id, "id": repo_id}, {}

    def h_model_info(self, req, repo, rev=None):
        sha, files = self._tree(repo, rev)
        siblings = []
        for path, data in sorted(files.items()):
            e = self._entry(path, data)
            lfs = {}
            if "lfs" in e:
                lfs = {"lfs": {"sha256": e["lfs"]["oid"], "size": len(data), "pointerSize": 134}}
            siblings.append({"rfilename": path, "size": e["size"], "blobId": e["oid"], **lfs})
        return 200, {"_id": sha[:24], "id": repo, "modelId": repo, "author": repo.split("/")[0], "sha": sha,
                     "lastModified": _NOW, "createdAt": _NOW, "private": False, "gated": False,
                     "disabled": False, "downloads": 0, "likes": 0, "tags": [], "siblings": siblings}, {}

    def h_tree(self, req, repo, rev, path=None):
        _, files = self._tree(repo, rev)
        prefix = (path or "").strip("/")
        prefix = prefix + "/" if prefix else ""
        if prefix and not any(p.startswith(prefix) for p in files):
            raise HubError(404, f"{path} does not exist", "EntryNotFound")
        recursive = req.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        out, dirs = [], set()
        for p, data in sorted(files.items()):
            if not p.startswith(prefix):
                continue
            parts = p[len(prefix):].split("/")
            for i in range(1, len(parts) if recursive else min(2, len(parts))):
                dirs.add(prefix + "/".join(parts[:i]))
            if recursive or len(parts) == 1:
                out.append(self._entry(p, data))
        out += [{"type": "directory", "oid": git_blob_sha1(d.encode()), "size": 0, "path": d}
                for d in sorted(dirs)]
        return 200, out, {}

    def h_refs(self, req, repo):
        refs = [{"name": n, "ref": n if n.startswith("refs/") else f"refs/heads/{n}", "targetCommit": s}
                for n, s in self._repo(repo).branches.items()]
        return 200, {"branches": [r for r in refs if not r["name"].startswith("refs/pr/")], "converts": [],
                     "tags": [], "pullRequests": [r for r in refs if r["name"].startswith("refs/pr/")]}, {}

    def h_create_branch(self, req, repo, branch):
        r, start = self._repo(repo), (req.json() if req.body else {}).get("startingPoint")
        if branch in r.branches:
            raise HubError(409, "Reference already exists")
        r.branches[branch] = self._resolve(repo, start)
        return 200, {}, {}

    def h_delete_branch(self, req, repo, branch):
        if branch == "main" or self._repo(repo).branches.pop(branch, None) is None:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        return 200, {}, {}

    def h_preupload(self, req, repo, rev):
        sha, files = self._tree(repo, rev)
        out = []
        for f in req.json()["files"]:
            old = files.get(f["path"])
            lfs = self._is_lfs(f["path"])
            oid = None if old is None else hashlib.sha256(old).hexdigest() if lfs else git_blob_sha1(old)
            out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                        "oid": oid})
        return 200, {"files": out, "commitOid": sha}, {}

    def h_commit(self, req, repo, rev):
        create_pr = req.query.get("create_pr", ["0"])[0] == "1"
        head, files = self._tree(repo, rev)
        files = dict(files)
        summary = "commit"
        for line in req.body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                summary = value.get("summary") or summary
                if value.get("parentCommit") not in (None, head):
                    raise HubError(412, "A commit has happened since. Please refresh and try again.")
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                if value["oid"] not in self.blobs:
                    raise HubError(422, f"LFS object {value['oid']} was never uploaded")
                files[value["path"]] = self.blobs[value["oid"]]
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                files = {p: d for p, d in files.items() if not p.startswith(folder)}
            else:
                raise HubError(400, f"Unknown commit operation {key!r}")
        r, pr_url = self.repos[repo], None
        if create_pr:
            r.n_prs += 1
            rev, pr_url = f"refs/pr/{r.n_prs}", f"{self.endpoint}/{repo}/discussions/{r.n_prs}"
        elif rev not in r.branches:
            raise HubError(400, f"Cannot commit to {rev}: not a branch")
        sha = self._commit(repo, r, rev, files, summary)
        return 200, {"success": True, "commitOid": sha, "commitUrl": f"{self.endpoint}/{repo}/commit/{sha}",
                     "hookOutput": "", "pullRequestUrl": pr_url}, {}

    def h_lfs_batch(self, req, repo):
        held, objects = self._repo(repo).lfs, []
        for o in req.json()["objects"]:
            upload = {"href": f"{self.endpoint}/_fake_lfs/{repo}/{o['oid']}", "expires_in": 3600}
            objects.append({"oid": o["oid"], "size": o["size"]} if o["oid"] in held else
                           {"oid": o["oid"], "size": o["size"], "authenticated": True,
                            "actions": {"upload": upload}})
        lfs_json = {"Content-Type": "application/vnd.git-lfs+json"}
        return 200, {"transfer": "basic", "objects": objects}, lfs_json

    def h_lfs_put(self, req, repo, oid):
        if hashlib.sha256(req.body).hexdigest() != oid:
            raise HubError(400, "sha256 mismatch")
        self.blobs[oid] = req.body
        self._repo(repo).lfs.add(oid)
        return 200, b"", {}

    def h_resolve(self, req, repo, rev, path):
        try:
            sha, files = self._tree(repo, rev)
        except HubError as e:
            if e.code == "RevisionNotFound":
                e.message = "Revision Not Found"  # the real Hub's wording on /resolve
            raise
        if path not in files:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": sha})
        data = files[path]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_sha1(data)}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if self._is_lfs(path):  # the real Hub also 302s to a CDN here; fakehub serves the bytes itself
            headers["X-Linked-Etag"] = f'"{hashlib.sha256(data).hexdigest()}"'
            headers["X-Linked-Size"] = str(len(data))
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", req.headers.get("range", ""))
        if m and req.method == "GET" and (m[1] or m[2]):
            start = int(m[1]) if m[1] else max(0, len(data) - int(m[2]))
            end = min(len(data) - 1, int(m[2])) if m[1] and m[2] else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return 206, data[start:end + 1], headers
        return 200, data, headers


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address):  # a client hanging up is not news
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class _Request:
    def __init__(self, method, path, query, headers, body):
        self.method, self.path, self.query, self.headers, self.body = method, path, query, headers, body

    def json(self):
        return json.loads(self.body or b"{}")


_WRITES = {"create_repo", "create_branch", "delete_branch", "preupload", "commit", "lfs_batch", "whoami"}


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"
    timeout = 60

    def log_message(self, *args):  # keep test output clean; use hub.calls instead
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while (size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)) > 0:
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self):
        hub, url = self.hub, urlsplit(self.path)
        body = self._read_body()
        headers = {k.lower(): v for k, v in self.headers.items()}
        call = Call(self.command, url.path, parse_qs(url.query), headers)
        with hub._lock:
            hub.calls.append(call)
            fault = next((f for f in hub.faults if (f.times is None or f.hits < f.times)
                          and (f.method is None or f.method == self.command)
                          and (f.path is None or f.path.search(url.path))), None)
            if fault:
                fault.hits += 1
        if fault and fault.delay:
            time.sleep(fault.delay)
        if fault and fault.drop:
            self.close_connection = True  # closes the socket without a status line
            return
        if fault and fault.status:
            return self._send(call, fault.status, {"error": f"fakehub: injected {fault.status}"}, {})
        for method, pattern, name in ROUTES:
            m = pattern.match(url.path) if method == self.command else None
            if not m:
                continue
            call.routed = True
            kwargs = {k: unquote(v) for k, v in m.groupdict().items() if v is not None}
            req = _Request(self.command, url.path, call.query, headers, body)
            try:
                with hub._lock:
                    if name in _WRITES and "authorization" not in headers:
                        raise HubError(401, "Invalid username or password.")
                    status, payload, extra = getattr(hub, "h_" + name)(req, **kwargs)
            except HubError as e:
                status, payload = e.status, {"error": e.message}
                extra = {"X-Error-Message": e.message, **e.headers}
                if e.code:
                    extra["X-Error-Code"] = e.code
            except Exception:  # a bug in the fake, or a request it cannot parse: say so loudly
                hub.errors.append(traceback.format_exc())
                status, payload, extra = 500, {"error": "fakehub internal error\n" + hub.errors[-1]}, {}
            return self._send(call, status, payload, extra)
        self._send(call, 404, {"error": f"fakehub: no imitated endpoint for {self.command} {url.path}"}, {})

    def _send(self, call, status, payload, headers):
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        call.status = status
        hub = self.hub
        with hub._lock:
            hub._n += 1
            request_id = f"fakehub-{hub._n}"
        self.send_response(status)
        headers = {"Content-Type": "application/json", **headers, "Content-Length": str(len(data)),
                   "X-Request-Id": request_id}
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _handle
