"""The dev host's Python worker process: the part of Azure's Python worker that sits above the runtime.

In Azure (Python 3.13+) the host starts a small "proxy" worker that connects back to it, reads the
host's FunctionRpc messages and hands each one to `azure_functions_runtime`, the package the app
pins in requirements.txt (Azure/azure-functions-python-worker, workers/proxy_worker/dispatcher.py).
This module does that job for the dev host, with the same package, so that indexing, binding
conversion, invocation and the answer's conversion are Azure's own code, not ours:

- each message goes to the runtime as `WorkerRequest(name, request, properties)`, `request` being
  the whole StreamingMessage and `properties` `{"protos", "host"}` on init and reload, as there;
- logging as there: the root logger at INFO (DEBUG with PYTHON_ENABLE_DEBUG_LOGGING) and every
  record sent to the host as an RpcLog, tagged with the invocation it was logged in; records of
  `azure.functions`, `azure_functions_runtime` and the worker itself are the System category,
  everything else (the app, the Azure SDKs) User.

Run by the dev host as `python -m devstack.worker --fd N --workerId W --requestId R
--grpcMaxMessageLength L`: the Functions host's arguments, but for `--host H --port P` (the
address to call back on) an inherited socket, so that no other process can take its place.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import logging
import os
import socket
import sys
import threading
from dataclasses import dataclass
from typing import Any

from .rpc import protos, stream

log = logging.getLogger("devstack.worker")  # System: see _SYSTEM_PREFIXES
CONSOLE_PREFIX = "LanguageWorkerConsoleLog"  # what Azure's worker prefixes console lines with
_SYSTEM_PREFIXES = ("devstack.worker", "azure.functions", "azure_functions_runtime")
_invocation_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("invocation_id", default=None)


@dataclass
class WorkerRequest:
    """What the runtime's handlers take: the message's name, the message, and init-time extras."""

    name: str
    request: Any
    properties: dict[str, Any] | None = None


class Connection:
    """The stream back to the host; messages may be sent from any thread (logging does)."""

    def __init__(self, writer: asyncio.StreamWriter, request_id: str) -> None:
        self.writer = writer
        self.request_id = request_id
        self.loop = asyncio.get_running_loop()
        self.loop_thread = threading.get_ident()

    def send(self, **content: Any) -> None:
        data = stream.frame(protos.StreamingMessage(request_id=self.request_id, **content))
        if threading.get_ident() == self.loop_thread:
            self.writer.write(data)
        elif not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.writer.write, data)


_LEVELS = (
    (logging.CRITICAL, protos.RpcLog.Critical),
    (logging.ERROR, protos.RpcLog.Error),
    (logging.WARNING, protos.RpcLog.Warning),
    (logging.INFO, protos.RpcLog.Information),
    (logging.DEBUG, protos.RpcLog.Debug),
)


def rpc_level(levelno: int) -> int:
    return next((rpc for py, rpc in _LEVELS if levelno >= py), getattr(protos.RpcLog, "None"))


def is_system(category: str) -> bool:
    return category.startswith(_SYSTEM_PREFIXES)


class RpcLogHandler(logging.Handler):
    """Every record to the host as an RpcLog: the worker's 'gRPC logging'."""

    def __init__(self, connection: Connection, runtime: Any) -> None:
        super().__init__()
        self.connection = connection
        self.runtime = runtime
        self._busy = threading.local()

    def current_invocation(self) -> str | None:
        # Coroutines carry it in a context variable; the runtime sets its own in the threads it
        # runs sync functions on (run_in_executor does not copy contexts).
        return _invocation_id.get() or self.runtime.invocation_id_cv.get()

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(self._busy, "active", False):  # a record logged while sending one
            return
        self._busy.active = True
        try:
            invocation_id = self.current_invocation()
            rpc_log = protos.RpcLog(
                category=record.name,
                level=rpc_level(record.levelno),
                message=self.format(record),
                log_category=protos.RpcLog.System if is_system(record.name) else protos.RpcLog.User,
                **({"invocation_id": invocation_id} if invocation_id else {}),
            )
            self.connection.send(rpc_log=rpc_log)
        except Exception:  # noqa: BLE001  (logging must never break the code that logs)
            self.handleError(record)
        finally:
            self._busy.active = False


class Dispatcher:
    """One host message in, the runtime's answer out; each in a task of its own, as in Azure."""

    def __init__(self, connection: Connection, runtime: Any, host: str) -> None:
        self.connection = connection
        self.runtime = runtime
        self.host = host
        self.tasks: set[asyncio.Task] = set()

    def dispatch(self, message: Any) -> None:
        task = asyncio.create_task(self.handle(message))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def handle(self, message: Any) -> None:
        kind = message.WhichOneof("content")
        try:
            if kind == "invocation_request":
                _invocation_id.set(message.invocation_request.invocation_id)
                answer = await self.runtime.invocation_request(
                    WorkerRequest("FunctionInvocationRequest", message)
                )
                self.connection.send(invocation_response=answer)
            elif kind == "worker_init_request":
                self.connection.send(worker_init_response=await self.init(message))
            elif kind == "functions_metadata_request":
                answer = await self.runtime.functions_metadata_request(
                    WorkerRequest("WorkerMetadataRequest", message)
                )
                self.connection.send(function_metadata_response=answer)
            elif kind == "function_load_request":
                answer = await self.runtime.function_load_request(
                    WorkerRequest("FunctionLoadRequest", message)
                )
                self.connection.send(function_load_response=answer)
            elif kind == "function_environment_reload_request":
                answer = await self.reload(message)
                self.connection.send(function_environment_reload_response=answer)
            elif kind == "worker_status_request":
                self.connection.send(worker_status_response=protos.WorkerStatusResponse())
            else:
                log.error("Unknown StreamingMessage content type: %s", kind)
        except Exception:
            log.exception("Unhandled error handling %s", kind)

    def _with_app_directory(self, directory: str) -> None:
        """The app's folder first on sys.path, as the platform's PYTHONPATH puts /home/site/wwwroot."""
        if directory and directory not in sys.path:
            sys.path.insert(0, directory)

    async def init(self, message: Any) -> Any:
        request = message.worker_init_request
        log.info(
            "Received WorkerInitRequest, python version %s, worker version %s, request ID %s",
            sys.version.split()[0],
            self.runtime.version.VERSION,
            self.connection.request_id,
        )
        self._with_app_directory(request.function_app_directory)
        log.info(
            "Using library: %s, library version: %s", self.runtime.__name__, self.runtime.version.VERSION
        )
        self.runtime.start_threadpool_executor()
        properties = {"protos": protos, "host": self.host}
        return await self.runtime.worker_init_request(WorkerRequest("WorkerInitRequest", message, properties))

    async def reload(self, message: Any) -> Any:
        self._with_app_directory(message.function_environment_reload_request.function_app_directory)
        properties = {"protos": protos, "host": self.host}
        request = WorkerRequest("FunctionEnvironmentReloadRequest", message, properties)
        return await self.runtime.function_environment_reload_request(request)


def metadata_of(app: Any, directory: str) -> list[Any]:
    """What the worker answers a FunctionsMetadataRequest with, for an app object in this process.

    The runtime's own indexing (`process_indexed_function`), for checks that need the host's view of
    an app (its routes, its functions in error) without starting a worker.
    """
    from azure_functions_runtime.bindings.meta import load_binding_registry
    from azure_functions_runtime.functions import Registry
    from azure_functions_runtime.loader import process_indexed_function

    load_binding_registry()
    app.functions_bindings = None  # get_functions() refuses names it has already seen
    results, _logs = process_indexed_function(protos, Registry(), app.get_functions(), directory)
    return list(results)


async def serve(fd: int, worker_id: str, request_id: str) -> int:
    reader, writer = await asyncio.open_connection(sock=socket.socket(fileno=fd))
    connection = Connection(writer, request_id)
    connection.send(start_stream=protos.StartStream(worker_id=worker_id))

    import azure_functions_runtime as runtime  # the app's pinned worker runtime

    root = logging.getLogger()
    for handler in list(root.handlers):  # console logging off: from here on, records go to the host
        root.removeHandler(handler)
    root.addHandler(RpcLogHandler(connection, runtime))
    debug = os.environ.get("PYTHON_ENABLE_DEBUG_LOGGING", "").lower() in ("1", "true")
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    log.info("Switched to gRPC logging.")

    dispatcher = Dispatcher(connection, runtime, "127.0.0.1")
    try:
        while True:
            dispatcher.dispatch(await stream.read(reader))
    except stream.StreamClosed:
        return 0  # the host closed the stream: it is stopping or restarting us
    finally:
        runtime.stop_threadpool_executor()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack.worker", description=__doc__)
    parser.add_argument("--fd", type=int, required=True, help="the inherited socket to the host")
    parser.add_argument("--workerId", required=True)
    parser.add_argument("--requestId", required=True)
    parser.add_argument("--grpcMaxMessageLength", type=int, default=stream.MAX_MESSAGE_BYTES)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format=f"{CONSOLE_PREFIX} %(levelname)s: %(message)s"
    )
    try:
        return asyncio.run(serve(args.fd, args.workerId, args.requestId))
    except OSError as err:
        log.error("Cannot use the host's socket (fd %s): %s", args.fd, err)
        return 1


if __name__ == "__main__":
    sys.exit(main())
