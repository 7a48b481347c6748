"""A stand-in for the Hugging Face Hub API on 127.0.0.1: the endpoints ``create_repo`` + ``create_commit``
use, recording what they receive, so tests run the real ``huggingface_hub`` client with no network."""

from __future__ import annotations

import base64
import contextlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


class StandInHub(BaseHTTPRequestHandler):
    """Answers like the Hub and records: ``create`` (the repo request), ``commit_path``, ``header``,
    ``files`` (path in repo → bytes), ``validated`` (the card), ``auth`` (the Authorization headers)."""

    received: dict = {}

    def log_message(self, *args):  # keep pytest's output clean
        pass

    def _reply(self, body: dict, status: int = 200) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        got = self.received
        got.setdefault("auth", set()).add(self.headers.get("Authorization"))
        base = f"http://{self.server.server_address[0]}:{self.server.server_address[1]}"
        if self.path == "/api/repos/create":
            got["create"] = json.loads(body)
            return self._reply({"url": f"{base}/{got['create']['organization']}/{got['create']['name']}"})
        if self.path == "/api/validate-yaml":  # the client checks a README's metadata before committing it
            got["validated"] = json.loads(body)["content"]
            return self._reply({"errors": [], "warnings": []})
        if "/preupload/" in self.path:
            files = json.loads(body)["files"]
            return self._reply({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                          for f in files]})
        if "/commit/" in self.path:
            got["commit_path"] = self.path
            repo = self.path.removeprefix("/api/models/").rsplit("/commit/", 1)[0]
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            got["header"] = next(x["value"] for x in lines if x["key"] == "header")
            got["files"] = {x["value"]["path"]: base64.b64decode(x["value"]["content"])
                            for x in lines if x["key"] == "file"}
            return self._reply({"commitUrl": f"{base}/{repo}/commit/{'a' * 40}", "commitOid": "a" * 40,
                                "success": True})
        return self._reply({"error": f"stand-in Hub has no {self.path}"}, status=404)


@contextlib.contextmanager
def standin_hub(patch: pytest.MonkeyPatch) -> Iterator[dict]:
    """Serve the stand-in Hub while the block runs; point ``huggingface_hub`` at it with a token."""
    import huggingface_hub

    server = ThreadingHTTPServer(("127.0.0.1", 0), StandInHub)
    StandInHub.received = received = {}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    patch.setenv("HF_ENDPOINT", url)
    patch.setattr(huggingface_hub.constants, "ENDPOINT", url)  # read once at import
    patch.setenv("HF_TOKEN", "hf_standin_token")
    try:
        yield received
    finally:
        server.shutdown()
        server.server_close()
