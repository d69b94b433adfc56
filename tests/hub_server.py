"""A loopback server that speaks the Hugging Face Hub's file protocol, for offline download tests.

HEAD and GET on ``/{namespace}/{name}/resolve/{revision}/{file}`` serve ``<root>/<name>/<file>`` with the
``X-Repo-Commit`` and ``ETag`` headers that ``huggingface_hub`` reads; unknown repos answer 401 with
``X-Error-Code: RepoNotFound`` and missing files 404 with ``X-Error-Code: EntryNotFound``, as the Hub does.
Requests are counted per path so tests can tell a download from a cache hit.
"""
import hashlib
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

COMMIT = 'a' * 40


class HubHandler(BaseHTTPRequestHandler):
    root: Path = Path('.')
    requests: Counter = Counter()

    def log_message(self, *args):  # keep test output clean
        pass

    def _resolve(self):
        parts = unquote(self.path.split('?')[0]).strip('/').split('/')
        if len(parts) < 5 or parts[2] != 'resolve':
            return None, None, 400
        repo_folder = self.root / parts[1]
        if not repo_folder.is_dir():
            return repo_folder, None, 401
        path = repo_folder / '/'.join(parts[4:])
        return repo_folder, path, 200 if path.is_file() else 404

    def _answer(self, with_body: bool):
        self.requests[(self.command, self.path)] += 1
        _, path, status = self._resolve()
        if status != 200:
            self.send_response(status)
            self.send_header('X-Error-Code', {401: 'RepoNotFound', 404: 'EntryNotFound'}.get(status, 'BadRequest'))
            self.send_header('X-Error-Message', {401: 'Repository not found', 404: 'Entry not found'}.get(status, ''))
            if status == 404:
                self.send_header('X-Repo-Commit', COMMIT)
            self.send_header('Content-Length', '0')
            self.end_headers()
            return
        body = path.read_bytes()
        self.send_response(200)
        self.send_header('X-Repo-Commit', COMMIT)
        self.send_header('ETag', '"' + hashlib.sha256(body).hexdigest() + '"')
        self.send_header('Content-Length', str(len(body)))
        self.send_header('Content-Type', 'application/octet-stream')
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def do_HEAD(self):
        self._answer(with_body=False)

    def do_GET(self):
        self._answer(with_body=True)


def start_hub_server(root: Path):
    """Serve ``root`` (one folder per repo name) on 127.0.0.1; returns ``(server, endpoint, request_counter)``."""
    handler = type('Handler', (HubHandler,), {'root': Path(root), 'requests': Counter()})
    server = ThreadingHTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f'http://127.0.0.1:{server.server_address[1]}', handler.requests
