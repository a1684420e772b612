"""A wasmproc web process type in Python (componentize-py, wasi:http).

  GET  /       a greeting
  POST /echo   the request body, back
  GET  /env    GREETING from the formation's `env`, `greeting` from its `config`
  POST /jobs   enqueues the body onto the `jobs` queue, for the worker

Unlike a JavaScript fetch-event guest, an instance may serve many requests
(`reuse` in the formation).
"""

import os

from componentize_py_types import Err, Ok
from wit_world import exports
from wit_world.imports import store
from wit_world.imports.streams import StreamError_Closed
from wit_world.imports.types import (
    Fields,
    IncomingRequest,
    Method_Post,
    OutgoingBody,
    OutgoingResponse,
    ResponseOutparam,
)

# The most bytes one `blocking-write-and-flush` may take.
WRITE_CHUNK = 4096


def read_body(request: IncomingRequest) -> bytes:
    """The whole request body."""
    body = request.consume()
    parts = []
    with body.stream() as stream:
        while True:
            try:
                parts.append(stream.blocking_read(64 * 1024))
            except Err as e:
                if isinstance(e.value, StreamError_Closed):
                    break
                raise
    type(body).finish(body)
    return b"".join(parts)


def respond(out: ResponseOutparam, status: int, body: bytes, content_type: str = "text/plain") -> None:
    """Answers with `status` and `body`."""
    response = OutgoingResponse(Fields.from_list([("content-type", content_type.encode())]))
    response.set_status_code(status)
    outgoing = response.body()
    ResponseOutparam.set(out, Ok(response))
    with outgoing.write() as stream:
        for start in range(0, len(body), WRITE_CHUNK):
            stream.blocking_write_and_flush(body[start : start + WRITE_CHUNK])
    OutgoingBody.finish(outgoing, None)


class IncomingHandler(exports.IncomingHandler):
    def handle(self, request: IncomingRequest, out: ResponseOutparam) -> None:
        path = request.path_with_query() or "/"
        post = isinstance(request.method(), Method_Post)
        if path == "/echo" and post:
            respond(out, 200, read_body(request), "application/octet-stream")
        elif path == "/env":
            greeting = f"{os.environ.get('GREETING')}, {store.get('greeting')}\n"
            respond(out, 200, greeting.encode())
        elif path == "/jobs" and post:
            # Imported where it is used, so this module also builds for a
            # world without wasmproc's queue (bench/languages.sh runs that
            # one under `wasmtime serve`).
            from wit_world.imports import queue

            message = queue.Message(read_body(request), "text/plain", [], None)
            try:
                id = queue.enqueue("jobs", message)
            except Err as e:
                respond(out, 503, f"cannot enqueue: {e.value}\n".encode())
                return
            respond(out, 202, f"enqueued {id}\n".encode())
        elif path == "/":
            respond(out, 200, b"Hello from Python\n")
        else:
            respond(out, 404, f"no page at {path}\n".encode())
