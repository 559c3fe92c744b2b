"""A Hugging Face Hub protocol server on 127.0.0.1 for the real `huggingface_hub` client (HF_ENDPOINT).

It implements what the client uses for repos, commits and downloads: create_repo, repo_info, branches,
refs, commit history, tree and paths-info listings, the preupload check, the NDJSON commit endpoint with
regular and LFS files and folder deletes, the LFS batch API with the basic transfer (PUT + verify), and
`resolve` downloads (HEAD metadata + GET). Xet storage is not implemented: the client runs with
HF_HUB_DISABLE_XET=1 and takes the LFS path, as it does for any Hub without Xet.

`rate_limit_commits = N` answers the next N commit requests with 429 and `Retry-After: 1`. Every
committed file's bytes and every commit message are kept, so tests can inspect the whole payload.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

_LFS_EXTS = (".safetensors", ".png", ".bin", ".ckpt", ".pt")


@dataclass
class _File:
    sha256: str
    size: int
    lfs: bool

    @property
    def blob_id(self) -> str:
        return hashlib.sha1(self.sha256.encode()).hexdigest()


@dataclass
class _Commit:
    id: str
    parent: str | None
    title: str
    files: dict[str, _File]
    date: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()))


@dataclass
class _Repo:
    repo_type: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, _Commit] = field(default_factory=dict)

    def resolve(self, revision: str) -> _Commit | None:
        revision = unquote(revision)
        commit_id = self.branches.get(revision, revision)
        return self.commits.get(commit_id)


class HubState:
    def __init__(self) -> None:
        self.repos: dict[str, _Repo] = {}
        self.blobs: dict[str, bytes] = {}
        self.lock = threading.Lock()
        self.rate_limit_commits = 0
        self.counts: Counter[str] = Counter()
        self.auth_headers: list[str] = []

    def new_repo(self, repo_id: str, repo_type: str, private: bool) -> None:
        repo = _Repo(repo_type, private)
        first = _Commit(hashlib.sha1(f"init {repo_id}".encode()).hexdigest(), None, "initial commit", {})
        repo.commits[first.id] = first
        repo.branches["main"] = first.id
        self.repos[repo_id] = repo

    def history(self, repo_id: str, branch: str = "main") -> list[_Commit]:
        repo = self.repos[repo_id]
        commit, out = repo.resolve(branch), []
        while commit is not None:
            out.append(commit)
            commit = repo.commits.get(commit.parent) if commit.parent else None
        return out

    def file_bytes(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        return self.blobs[self.repos[repo_id].resolve(revision).files[path].sha256]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HubServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    # ---- plumbing -----------------------------------------------------------------------------------
    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, data: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _error(self, status: int, code: str, message: str) -> None:
        self._json({"error": message}, status, {"X-Error-Code": code, "X-Error-Message": message})

    def _repo(self, repo_id: str, revision: str | None = None) -> tuple[_Repo, _Commit] | None:
        repo = self.server.state.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
            return None
        commit = repo.resolve(revision or "main")
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None
        return repo, commit

    def _dispatch(self) -> None:
        state = self.server.state
        if auth := self.headers.get("Authorization"):
            state.auth_headers.append(auth)
        url = urlparse(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        state.counts[f"{self.command} {re.sub(r'/[^/]+', '/*', path)[:40]}"] += 1
        for pattern, handler in _ROUTES:
            if pattern[0] == self.command and (m := re.fullmatch(pattern[1], path)):
                with state.lock:
                    handler(self, *m.groups(), query=query)
                return
        self._error(404, "NotFound", f"test hub server: no route for {self.command} {path}")

    do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _dispatch

    # ---- API ------------------------------------------------------------------------------------------
    def create_repo(self, query: dict) -> None:
        body = json.loads(self._body())
        repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
        if repo_id in self.server.state.repos:  # the Hub's 409 carries the repo URL, which the client reads
            message = "You already created this model repo"
            self._json({"error": message, "url": f"{self.server.url}/{repo_id}"}, 409, {"X-Error-Message": message})
            return
        self.server.state.new_repo(repo_id, body.get("type") or "model", bool(body.get("private")))
        self._json({"url": f"{self.server.url}/{repo_id}", "name": repo_id})

    def whoami(self, query: dict) -> None:
        self._json({"type": "user", "name": "sdtune-tester", "orgs": [], "auth": {}})

    def validate_yaml(self, query: dict) -> None:
        self._body()
        self._json({})

    def repo_info(self, kind: str, repo_id: str, revision: str | None, query: dict) -> None:
        found = self._repo(repo_id, revision)
        if found:
            repo, commit = found
            siblings = [{"rfilename": p, "size": f.size} for p, f in sorted(commit.files.items())]
            self._json({"id": repo_id, "sha": commit.id, "private": repo.private, "siblings": siblings,
                        "lastModified": commit.date, "tags": []})  # fmt: skip

    def preupload(self, kind: str, repo_id: str, revision: str, query: dict) -> None:
        body = json.loads(self._body())
        if found := self._repo(repo_id, revision):
            files = []
            for entry in body["files"]:
                lfs = entry["path"].endswith(_LFS_EXTS) or entry["size"] > 1_000_000
                existing = found[1].files.get(entry["path"])
                files.append(
                    {
                        "path": entry["path"],
                        "uploadMode": "lfs" if lfs else "regular",
                        "shouldIgnore": False,
                        "oid": existing.sha256 if existing and existing.lfs else None,
                    }
                )
            self._json({"files": files, "commitOid": found[1].id})

    def lfs_batch(self, kind: str | None, repo_id: str, query: dict) -> None:
        body = json.loads(self._body())
        if body.get("operation") != "upload" or "basic" not in body.get("transfers", ["basic"]):
            self._error(400, "BadRequest", "only basic LFS uploads")
            return
        objects = []
        for obj in body["objects"]:
            entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.server.state.blobs:
                entry["actions"] = {
                    "upload": {"href": f"{self.server.url}/_lfs/{obj['oid']}"},
                    "verify": {"href": f"{self.server.url}/_lfs/verify"},
                }
            objects.append(entry)
        self._json({"transfer": "basic", "objects": objects}, headers={"Content-Type": "application/vnd.git-lfs+json"})

    def lfs_put(self, oid: str, query: dict) -> None:
        data = self._body()
        if hashlib.sha256(data).hexdigest() != oid:
            self._error(400, "BadRequest", "sha256 of the upload does not match its oid")
            return
        self.server.state.blobs[oid] = data
        self.server.state.counts["lfs_uploads"] += 1
        self._send(200)

    def lfs_verify(self, query: dict) -> None:
        body = json.loads(self._body())
        ok = len(self.server.state.blobs.get(body["oid"], b"")) == body["size"]
        self._json({}, 200 if ok else 404)

    def commit(self, kind: str, repo_id: str, revision: str, query: dict) -> None:
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        state = self.server.state
        if state.rate_limit_commits > 0:
            state.rate_limit_commits -= 1
            state.counts["commit_429"] += 1
            self._json({"error": "rate limited"}, 429, {"Retry-After": "1"})
            return
        found = self._repo(repo_id, revision)
        if not found:
            return
        repo, parent = found
        files = dict(parent.files)
        title = ""
        for item in lines:
            key, value = item["key"], item["value"]
            if key == "header":
                title = value["summary"]
            elif key == "file":
                data = base64.b64decode(value["content"])
                sha = hashlib.sha256(data).hexdigest()
                state.blobs[sha] = data
                files[value["path"]] = _File(sha, len(data), lfs=False)
            elif key == "lfsFile":
                if value["oid"] not in state.blobs:
                    self._error(400, "BadRequest", f"LFS object {value['oid']} was not uploaded")
                    return
                files[value["path"]] = _File(value["oid"], value["size"], lfs=True)
            elif key in ("deletedFile", "deletedFolder"):
                prefix = value["path"].rstrip("/") + "/"
                gone = [p for p in files if p == value["path"] or key == "deletedFolder" and p.startswith(prefix)]
                if not gone:
                    self._error(404, "EntryNotFound", f"A file with this name doesn't exist: {value['path']}")
                    return
                for p in gone:
                    del files[p]
        commit_id = hashlib.sha1(f"{parent.id}{title}{sorted(files)}{time.time_ns()}".encode()).hexdigest()
        repo.commits[commit_id] = _Commit(commit_id, parent.id, title, files)
        repo.branches[unquote(revision)] = commit_id
        self._json({"commitUrl": f"{self.server.url}/{repo_id}/commit/{commit_id}", "commitOid": commit_id,
                    "success": True})  # fmt: skip

    def _entries(self, commit: _Commit, prefix: str, recursive: bool) -> list[dict]:
        prefix = prefix.strip("/")
        under = {p: f for p, f in commit.files.items() if not prefix or p.startswith(prefix + "/")}
        entries: dict[str, dict] = {}
        for p, f in sorted(under.items()):
            rel = p[len(prefix) + 1 :] if prefix else p
            parts = rel.split("/")
            for depth in range(1, len(parts)):
                folder = "/".join(([prefix] if prefix else []) + parts[:depth])
                if recursive or depth == 1:
                    entries.setdefault(folder, {"type": "directory", "oid": "0" * 40, "path": folder, "size": 0})
            if recursive or len(parts) == 1:
                entries[p] = self._file_entry(p, f)
        return list(entries.values())

    @staticmethod
    def _file_entry(path: str, f: _File) -> dict:
        entry: dict[str, Any] = {"type": "file", "oid": f.blob_id, "size": f.size, "path": path}
        if f.lfs:
            entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": 134}
        return entry

    def tree(self, kind: str, repo_id: str, revision: str, sub: str | None, query: dict) -> None:
        if found := self._repo(repo_id, revision):
            commit = found[1]
            prefix = (sub or "").strip("/")
            if prefix and not any(p.startswith(prefix + "/") for p in commit.files):
                self._error(404, "EntryNotFound", f"{prefix} does not exist on {revision}")
                return
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            self._json(self._entries(commit, prefix, recursive))

    def paths_info(self, kind: str, repo_id: str, revision: str, query: dict) -> None:
        raw = self._body()
        ctype = self.headers.get("Content-Type", "")
        body = json.loads(raw) if "json" in ctype else {k: v for k, v in parse_qs(raw.decode()).items()}
        if found := self._repo(repo_id, revision):
            commit = found[1]
            out = []
            for p in body.get("paths", []):
                if p in commit.files:
                    out.append(self._file_entry(p, commit.files[p]))
                elif any(q.startswith(p.rstrip("/") + "/") for q in commit.files):
                    out.append({"type": "directory", "oid": "0" * 40, "path": p, "size": 0})
            self._json(out)

    def commits(self, kind: str, repo_id: str, revision: str, query: dict) -> None:
        if self._repo(repo_id, revision):
            history = self.server.state.history(repo_id, unquote(revision))
            self._json([{"id": c.id, "title": c.title, "message": "", "authors": [], "date": c.date} for c in history])

    def refs(self, kind: str, repo_id: str, query: dict) -> None:
        if found := self._repo(repo_id):
            repo = found[0]
            branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": c} for b, c in repo.branches.items()]
            self._json({"branches": branches, "tags": [], "converts": []})

    def create_branch(self, kind: str, repo_id: str, branch: str, query: dict) -> None:
        self._body()
        if found := self._repo(repo_id):
            repo, main = found
            if branch in repo.branches:
                self._error(409, "Conflict", f"Reference refs/heads/{branch} already exists")
                return
            repo.branches[branch] = main.id
            self._json({})

    def resolve(self, kind: str | None, repo_id: str, revision: str, path: str, query: dict) -> None:
        found = self._repo(repo_id, revision)
        if not found:
            return
        commit = found[1]
        f = commit.files.get(path)
        if f is None:
            self._error(404, "EntryNotFound", f"{path} does not exist on {revision}")
            return
        headers = {"X-Repo-Commit": commit.id, "ETag": f'"{f.sha256 if f.lfs else f.blob_id}"',
                   "Content-Type": "application/octet-stream", "Accept-Ranges": "none"}  # fmt: skip
        if f.lfs:
            headers |= {"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size)}
        self._send(200, self.server.state.blobs[f.sha256], headers)


_REPO = r"([^/]+/[^/]+)"
_ROUTES = [
    (("POST", r"/api/repos/create"), _Handler.create_repo),
    (("GET", r"/api/whoami-v2"), _Handler.whoami),
    (("POST", r"/api/validate-yaml"), _Handler.validate_yaml),
    (("GET", rf"/api/(models|datasets)/{_REPO}(?:/revision/(.+))?"), _Handler.repo_info),
    (("POST", rf"/api/(models|datasets)/{_REPO}/preupload/(.+)"), _Handler.preupload),
    (("POST", rf"/api/(models|datasets)/{_REPO}/commit/(.+)"), _Handler.commit),
    (("GET", rf"/api/(models|datasets)/{_REPO}/tree/([^/]+)(?:/(.*))?"), _Handler.tree),
    (("POST", rf"/api/(models|datasets)/{_REPO}/paths-info/(.+)"), _Handler.paths_info),
    (("GET", rf"/api/(models|datasets)/{_REPO}/commits/(.+)"), _Handler.commits),
    (("GET", rf"/api/(models|datasets)/{_REPO}/refs"), _Handler.refs),
    (("POST", rf"/api/(models|datasets)/{_REPO}/branch/(.+)"), _Handler.create_branch),
    (("POST", rf"/(datasets/)?{_REPO}\.git/info/lfs/objects/batch"), _Handler.lfs_batch),
    (("PUT", r"/_lfs/([0-9a-f]{64})"), _Handler.lfs_put),
    (("POST", r"/_lfs/verify"), _Handler.lfs_verify),
    (("HEAD", rf"/(datasets/)?{_REPO}/resolve/([^/]+)/(.+)"), _Handler.resolve),
    (("GET", rf"/(datasets/)?{_REPO}/resolve/([^/]+)/(.+)"), _Handler.resolve),
]


class _HubServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, state: HubState) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.state = state

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class HubServer:
    def __init__(self) -> None:
        self.state = HubState()
        self.server = _HubServer(self.state)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return self.server.url

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
