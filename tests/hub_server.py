"""A small Hub-compatible HTTP server for tests: just the endpoints huggingface_hub uses to create a
repo, a branch, and commit files (every file uploaded inline, "regular" mode). Started on 127.0.0.1
with a random port; point huggingface_hub at it with HF_ENDPOINT."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    def __init__(self, token: str):
        self.token = token
        self.repos: dict[str, dict] = {}  # repo_id -> {"private": bool, "branches": {name: {path: bytes}}}
        self.requests: list[tuple[str, str]] = []  # (method, path)
        self.fail_commits = False
        self.validated: list[str] = []  # model-card texts sent for validation
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def _send(self, status: int, payload: dict) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                if status >= 400:
                    self.send_header("X-Error-Message", payload.get("error", ""))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):  # noqa: N802 (http.server's naming)
                hub.requests.append(("POST", self.path))
                data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Authorization") != f"Bearer {hub.token}":
                    return self._send(401, {"error": "Invalid credentials in Authorization header"})
                path = self.path.split("?")[0]
                if path == "/api/validate-yaml":  # the Hub checks a model card's metadata before accepting it
                    hub.validated.append(json.loads(data).get("content", ""))
                    return self._send(200, {"errors": [], "warnings": []})
                if path == "/api/repos/create":
                    req = json.loads(data)
                    repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
                    if repo_id in hub.repos:
                        return self._send(409, {"error": "You already created this model repo", "url": hub.url(repo_id)})
                    hub.repos[repo_id] = {"private": bool(req.get("private")) or req.get("visibility") == "private",
                                         "branches": {"main": {}}}
                    return self._send(200, {"url": hub.url(repo_id), "name": repo_id})
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit|branch)/(.+)", path)
                if not m or m.group(1) not in hub.repos:
                    return self._send(404, {"error": f"Repository not found: {path}"})
                repo_id, action, rev = m.group(1), m.group(2), m.group(3).replace("%2F", "/")
                repo = hub.repos[repo_id]
                if action == "branch":
                    repo["branches"].setdefault(rev, dict(repo["branches"]["main"]))
                    return self._send(200, {})
                if action == "preupload":
                    files = json.loads(data)["files"]
                    return self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                      for f in files]})
                if hub.fail_commits:
                    return self._send(500, {"error": "Internal Error - the fake hub refuses this commit"})
                branch = repo["branches"].setdefault(rev, {})
                for line in data.decode().splitlines():
                    item = json.loads(line)
                    if item["key"] == "file":
                        branch[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                oid = hashlib.sha1(data).hexdigest()
                return self._send(200, {"commitUrl": f"{hub.url(repo_id)}/commit/{oid}", "commitOid": oid,
                                        "pullRequestUrl": None})

            def do_GET(self):  # noqa: N802
                hub.requests.append(("GET", self.path))
                return self._send(404, {"error": f"not implemented in the fake hub: {self.path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, repo_id: str) -> str:
        return f"{self.endpoint}/{repo_id}"

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        return self.repos[repo_id]["branches"][branch]

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
