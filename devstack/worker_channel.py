"""The host's side of one Python worker: its process and the FunctionRpc stream to it.

As the Functions host does (GrpcWorkerChannel in Azure/azure-functions-host): start the worker,
wait for its StartStream, send WorkerInitRequest (the worker indexes the app then),
FunctionsMetadataRequest and a FunctionLoadRequest a function, then an InvocationRequest a call.
Each start-up answer has the host's deadline (WorkerProcessCountOptions, GrpcWorkerChannel):
StartStream 60 s, WorkerInitResponse 10 s (so an app whose import takes longer fails there too),
the metadata and each load the larger of 1 minute and functionTimeout. A worker that exits fails
every invocation in flight on it.
"""

from __future__ import annotations

import asyncio
import os
import socket
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
START_TIMEOUT_SECONDS = 60.0  # ProcessStartupTimeout: until StartStream
INIT_TIMEOUT_SECONDS = 10.0  # InitializationTimeout: until WorkerInitResponse
LOAD_TIMEOUT_SECONDS = 60.0  # _functionLoadTimeout, or functionTimeout if that is longer
HOST_ONLY_SETTINGS = "DEVHOST_"  # the dev host's own settings (keys among them): never the worker's


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
        load_timeout: float = LOAD_TIMEOUT_SECONDS,
    ) -> None:
        self.app_dir = app_dir
        self.on_log = on_log
        self.load_timeout = load_timeout
        self.environ = dict(os.environ if environ is None else environ)
        self.worker_id = str(uuid.uuid4())
        self.request_id = str(uuid.uuid4())
        self.process: asyncio.subprocess.Process | None = None
        self.metadata: Any = None  # the worker's WorkerMetadata (runtime and package versions)
        self.closed = asyncio.Event()
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[tuple[str, str], asyncio.Future[Any]] = {}
        self._reader_task: asyncio.Task | None = None
        self._watch_task: asyncio.Task | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    # ---- start-up -------------------------------------------------------------------------------

    async def start(self) -> list[Any]:
        """Start the worker and let it index the app; the functions' metadata, in the worker's order.

        Every way a start can fail (the worker exits, hangs, or answers with a failure) is a
        WorkerError, for the host to report.
        """
        try:
            await self._spawn()
            init = await self._startup_request(
                INIT_TIMEOUT_SECONDS,
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
            listed = await self._startup_request(
                self.load_timeout,
                "function_metadata_response",
                "",
                functions_metadata_request=protos.FunctionsMetadataRequest(
                    function_app_directory=str(self.app_dir)
                ),
            )
            if _failure(listed.result):
                raise WorkerError("The worker failed to list the functions", listed.result.exception)
            return list(listed.function_metadata_results)
        except OSError as err:  # WorkerGone among them
            code = await self._exit_code()
            ended = f"exited with code {code}" if code is not None else f"went away ({err})"
            raise WorkerError(f"The Python worker {ended} while starting") from None

    async def load(self, metadata: Any) -> None:
        loaded = await self._startup_request(
            self.load_timeout,
            "function_load_response",
            metadata.function_id,
            function_load_request=protos.FunctionLoadRequest(
                function_id=metadata.function_id, metadata=metadata
            ),
        )
        if _failure(loaded.result):
            raise WorkerError(f"The worker failed to load '{metadata.name}'", loaded.result.exception)

    async def _spawn(self) -> None:
        """The worker process, on one end of a socket pair; until its StartStream names it."""
        ours, theirs = socket.socketpair()
        try:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "devstack.worker",
                "--fd", str(theirs.fileno()),
                "--workerId", self.worker_id, "--requestId", self.request_id,
                "--grpcMaxMessageLength", str(stream.MAX_MESSAGE_BYTES),
                cwd=self.app_dir,
                env=self._worker_environment(),
                stdin=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                preexec_fn=die_with_parent,
            )  # fmt: skip
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        reader, self._writer = await asyncio.open_connection(sock=ours)
        exited = asyncio.create_task(self.process.wait())
        first = asyncio.create_task(stream.read(reader))
        done, _ = await asyncio.wait(
            {first, exited}, timeout=START_TIMEOUT_SECONDS, return_when=asyncio.FIRST_COMPLETED
        )
        if first not in done or first.exception() is not None:
            first.cancel()
            exited.cancel()
            await self.stop()
            code = self.process.returncode
            raise WorkerError(
                f"The Python worker exited with code {code} before its StartStream"
                if code is not None
                else f"The Python worker sent no StartStream within {START_TIMEOUT_SECONDS:.0f} s"
            )
        if first.result().start_stream.worker_id != self.worker_id:
            exited.cancel()
            await self.stop()
            raise WorkerError("The worker's StartStream named another worker")
        self._watch_task = asyncio.create_task(self._watch(exited))
        self._reader_task = asyncio.create_task(self._read(reader))

    async def _exit_code(self) -> int | None:
        """The worker's exit code, if it exits within a moment (its stream ends first)."""
        if self.process is None:
            return None
        try:
            return await asyncio.wait_for(self.process.wait(), 2)
        except TimeoutError:
            return None

    async def _startup_request(self, seconds: float, answer: str, key: str, **content: Any) -> Any:
        try:
            return await asyncio.wait_for(self._request(answer, key, **content), seconds)
        except TimeoutError:
            raise WorkerError(f"The worker did not answer within {seconds:.0f} s ({answer})") from None

    def _worker_environment(self) -> dict[str, str]:
        """The app settings, plus where `devstack.worker` is; the app folder goes first on sys.path."""
        paths = [str(REPO_ROOT), *filter(None, self.environ.get("PYTHONPATH", "").split(os.pathsep))]
        settings = {k: v for k, v in self.environ.items() if not k.startswith(HOST_ONLY_SETTINGS)}
        return {**settings, "PYTHONPATH": os.pathsep.join(paths), "PYTHONUNBUFFERED": "1"}

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
