"""The host's side of one Python worker: its process and the FunctionRpc stream to it.

As the Functions host does (GrpcWorkerChannel in Azure/azure-functions-host): start the worker
with the address to call back, wait for its StartStream, send WorkerInitRequest (the worker
indexes the app then), FunctionsMetadataRequest and a FunctionLoadRequest a function, then an
InvocationRequest a call. A worker that exits fails every invocation in flight on it.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .children import die_with_parent
from .rpc import protos, stream

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST_VERSION = "4.1000.0-devstack"  # what the dev host calls itself in WorkerInitRequest
START_TIMEOUT_SECONDS = 60.0


class WorkerError(RuntimeError):
    """The worker did not start, or answered a startup message with a failure."""

    def __init__(self, message: str, exception: Any = None) -> None:
        self.exception = exception  # the worker's RpcException, if it sent one
        super().__init__(message)

    @property
    def details(self) -> str:
        """The worker's own exception text (message and stack), as the host logs it."""
        if self.exception is None:
            return str(self)
        return f"{self.exception.message}\n{self.exception.stack_trace}".strip()


class WorkerGone(ConnectionError):
    """The worker's stream ended (it exited, crashed or was restarted) before it answered."""


def _failure(result: Any) -> bool:
    return result.status != protos.StatusResult.Success


class WorkerChannel:
    def __init__(
        self,
        app_dir: Path,
        *,
        on_log: Callable[[Any], None],
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.app_dir = app_dir
        self.on_log = on_log
        self.environ = dict(os.environ if environ is None else environ)
        self.worker_id = str(uuid.uuid4())
        self.request_id = str(uuid.uuid4())
        self.process: asyncio.subprocess.Process | None = None
        self.metadata: Any = None  # the worker's WorkerMetadata (runtime and package versions)
        self.closed = asyncio.Event()
        self._writer: asyncio.StreamWriter | None = None
        self._started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending: dict[tuple[str, str], asyncio.Future[Any]] = {}
        self._reader_task: asyncio.Task | None = None
        self._watch_task: asyncio.Task | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    # ---- start-up -------------------------------------------------------------------------------

    async def start(self) -> list[Any]:
        """Start the worker and let it index the app; the functions' metadata, in the worker's order."""
        server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "devstack.worker",
                "--host", "127.0.0.1", "--port", str(port),
                "--workerId", self.worker_id, "--requestId", self.request_id,
                "--grpcMaxMessageLength", str(stream.MAX_MESSAGE_BYTES),
                cwd=self.app_dir,
                env=self._worker_environment(),
                stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent,
            )  # fmt: skip
            exited = asyncio.create_task(self.process.wait())
            done, _ = await asyncio.wait(
                {self._started, exited}, timeout=START_TIMEOUT_SECONDS, return_when=asyncio.FIRST_COMPLETED
            )
            if self._started not in done:
                exited.cancel()
                code = self.process.returncode
                raise WorkerError(
                    f"The Python worker exited with code {code} before connecting"
                    if code is not None
                    else f"The Python worker did not connect within {START_TIMEOUT_SECONDS:.0f} s"
                )
            self._watch_task = asyncio.create_task(self._watch(exited))
        finally:
            server.close()  # one worker, one stream: nobody else may connect
        init = await self._request(
            "worker_init_response",
            "",
            worker_init_request=protos.WorkerInitRequest(
                host_version=HOST_VERSION,
                worker_directory=str(REPO_ROOT / "devstack"),
                function_app_directory=str(self.app_dir),
            ),
        )
        self.metadata = init.worker_metadata
        if _failure(init.result):
            raise WorkerError("The worker failed to index the function app", init.result.exception)
        listed = await self._request(
            "function_metadata_response",
            "",
            functions_metadata_request=protos.FunctionsMetadataRequest(
                function_app_directory=str(self.app_dir)
            ),
        )
        if _failure(listed.result):
            raise WorkerError("The worker failed to list the functions", listed.result.exception)
        return list(listed.function_metadata_results)

    async def load(self, metadata: Any) -> None:
        loaded = await self._request(
            "function_load_response",
            metadata.function_id,
            function_load_request=protos.FunctionLoadRequest(
                function_id=metadata.function_id, metadata=metadata
            ),
        )
        if _failure(loaded.result):
            raise WorkerError(f"The worker failed to load '{metadata.name}'", loaded.result.exception)

    def _worker_environment(self) -> dict[str, str]:
        """The app settings, plus where `devstack.worker` is; the app folder goes first on sys.path."""
        paths = [str(REPO_ROOT), *filter(None, self.environ.get("PYTHONPATH", "").split(os.pathsep))]
        return {**self.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONUNBUFFERED": "1"}

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            first = await asyncio.wait_for(stream.read(reader), 10)
        except (stream.StreamClosed, TimeoutError):
            writer.close()
            return
        if self._started.done() or first.start_stream.worker_id != self.worker_id:
            writer.close()  # not the worker we started
            return
        self._writer = writer
        self._reader_task = asyncio.create_task(self._read(reader))
        self._started.set_result(None)

    # ---- messages -------------------------------------------------------------------------------

    def _send(self, **content: Any) -> None:
        if self._writer is None or self.closed.is_set():
            raise WorkerGone("the worker is not connected")
        self._writer.write(stream.frame(protos.StreamingMessage(request_id=self.request_id, **content)))

    async def _request(self, answer: str, key: str, **content: Any) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[(answer, key)] = future
        try:
            self._send(**content)
            return await future
        finally:
            self._pending.pop((answer, key), None)

    async def invoke(self, request: Any) -> Any:
        """The worker's InvocationResponse; WorkerGone if it exits first."""
        return await self._request("invocation_response", request.invocation_id, invocation_request=request)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                message = await stream.read(reader)
                kind = message.WhichOneof("content")
                if kind == "rpc_log":
                    self.on_log(message.rpc_log)
                    continue
                key = ""
                if kind == "invocation_response":
                    key = message.invocation_response.invocation_id
                elif kind == "function_load_response":
                    key = message.function_load_response.function_id
                future = self._pending.get((kind, key))
                if future is not None and not future.done():
                    future.set_result(getattr(message, kind))
        except stream.StreamClosed:
            pass
        finally:
            self._close("the worker's stream ended")

    async def _watch(self, exited: asyncio.Task) -> None:
        await exited
        self._close(f"the worker exited with code {self.process.returncode if self.process else '?'}")

    def _close(self, reason: str) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(WorkerGone(reason))
        if self._writer is not None:
            self._writer.close()

    async def stop(self) -> None:
        """Kill the worker (as the host does on a restart): whatever is in flight fails."""
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        self._close("the worker was stopped")
        if self._reader_task is not None:
            await asyncio.gather(self._reader_task, return_exceptions=True)
