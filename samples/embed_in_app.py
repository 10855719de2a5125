"""A minimal generation service: the Python standard library's HTTP server and `lmexport.runtime`
(onnxruntime, numpy, tokenizers; no torch, no web framework).

    python samples/embed_in_app.py OUTDIR [--host 127.0.0.1] [--port 8000]

POST /generate with a JSON body: "prompt" (text, needs the folder's tokenizer.json) or "ids"
(token ids), and optionally "max_new_tokens" (default 32), "temperature", "top_k", "top_p",
"min_p", "repetition_penalty", "seed", "stop" (a string or a list of strings), "chat" (true: the
prompt is a user turn of the folder's chat template). The answer is {"ids": [...], "text": "..."}
("text" when the folder has a tokenizer), or {"error": "..."} with status 400 for bad input.

    curl -s localhost:8000/generate -d '{"ids": [1, 2, 3], "max_new_tokens": 8}'

Port 0 picks a free port; the first line printed says where it listens.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from lmexport.errors import LmexportError
from lmexport.runtime import LlamaRunner, load_chat_template

SAMPLING = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any, name: str, kind: type = float) -> Any:
    """A JSON number as given ("1.7" tokens, `true` as a temperature are refused, not cast)."""
    if _is_int(value) or (kind is float and isinstance(value, float)):
        return value
    raise LmexportError(f'"{name}" must be {"an integer" if kind is int else "a number"}')


def _stop(value: Any) -> list[str]:
    """One stop string or a list of them ("Paris" is one stop, not five letters)."""
    stop = [value] if isinstance(value, str) else value
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise LmexportError('"stop" must be a string or a list of strings')
    return stop


class Generator:
    """The model, loaded once, shared by the request threads (one generation at a time)."""

    def __init__(self, folder: Path, provider: str) -> None:
        self.folder = folder
        self.runner = LlamaRunner.load(folder, provider=provider)
        self.has_tokenizer = (folder / "tokenizer.json").is_file()
        self.lock = threading.Lock()

    def __call__(self, request: dict[str, Any]) -> dict[str, Any]:
        if ("prompt" in request) == ("ids" in request):
            raise LmexportError('give either "prompt" or "ids"')
        options = {
            k: _number(request[k], k, int if k in ("top_k", "seed") else float)
            for k in SAMPLING
            if k in request
        }
        max_new_tokens = _number(request.get("max_new_tokens", 32), "max_new_tokens", int)
        eos = list(self.runner.eos_token_ids)
        if "ids" in request:
            ids = request["ids"]
            if not isinstance(ids, list) or not all(_is_int(t) for t in ids):
                raise LmexportError('"ids" must be a list of integers')
        elif request.get("chat"):
            template = load_chat_template(self.folder)
            messages = [{"role": "user", "content": str(request["prompt"])}]
            ids = template.encode(self.runner.tokenizer, messages)
            eos += template.end_token_ids(self.runner.tokenizer)
        else:
            ids = list(self.runner.tokenizer.encode(str(request["prompt"])).ids)
        with self.lock:
            if not self.has_tokenizer:
                steps = self.runner.stream([ids], max_new_tokens, eos_token_id=eos, **options)
                return {"ids": [int(step[0]) for step in steps]}
            tokens: list[int] = []
            text = ""
            stop = _stop(request.get("stop", []))
            for step in self.runner.stream_text(
                [ids], max_new_tokens, eos_token_id=eos, stop=stop, **options
            ):
                tokens += step.tokens.tolist()
                text += step.text[0]
            return {"ids": tokens, "text": text}


def make_server(generator: Generator, host: str, port: int) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            if self.path != "/generate":
                self._reply(404, {"error": f"no such endpoint {self.path}"})
                return
            try:
                length = int(self.headers.get("Content-Length", 0))
                request = json.loads(self.rfile.read(length) or b"{}")
                if not isinstance(request, dict):
                    raise LmexportError("the body must be a JSON object")
                self._reply(200, generator(request))
            except (LmexportError, ValueError, TypeError) as e:  # bad JSON, fields or ids
                self._reply(400, {"error": str(e)})

        def _reply(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # one line per request on stderr is noise here

    return ThreadingHTTPServer((host, port), Handler)


def main() -> int:
    parser = argparse.ArgumentParser(description="Serve POST /generate for an exported model.")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--provider", default="cpu", help="cpu, cuda or auto.")
    args = parser.parse_args()
    try:
        generator = Generator(args.folder, args.provider)
    except LmexportError as e:
        print(f"embed_in_app.py: {e}", file=sys.stderr)
        return 2
    server = make_server(generator, args.host, args.port)
    host, port = server.server_address[:2]
    print(f"serving on http://{host}:{port}/generate", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
