"""The Functions host's core, locally: one Python worker, the app it indexed, the host's rules.

- Start-up: the worker indexes the app; the host validates each function (host_functions.py),
  logs each refused one as "The '<name>' function is in error: ..." and loads the rest.
- Invocations carry an id, are logged as the host logs them ("Executing 'Functions.x' ...",
  "Executed 'Functions.x' (Succeeded|Failed, Id=..., Duration=...ms)") and fail (the caller gets
  a 500) when the function raises, the worker exits, or `functionTimeout` passes.
- Past `functionTimeout` the host restarts the worker process: every invocation in flight on it
  ends (WebScriptHostExceptionHandler.OnTimeoutExceptionAsync, with the WebJobs SDK's
  FunctionExecutor message). A worker that exits on its own is restarted too.
- The worker's logs: System records (the worker, the runtime, azure.functions) under
  `Worker.python`; User records under `Function.<name>.User` when they belong to an invocation in
  flight, and dropped otherwise, as the host drops them (GrpcWorkerChannel.Log).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .host_config import HostConfig
from .host_functions import Functions, HttpFunction, TimerFunction, index
from .rpc import protos
from .worker_channel import (
    LOAD_TIMEOUT_SECONDS,
    START_TIMEOUT_SECONDS,
    WorkerChannel,
    WorkerError,
    WorkerGone,
)

startup_log = logging.getLogger("Host.Startup")
host_log = logging.getLogger("Host.General")
worker_log = logging.getLogger("Worker.python")
WORKER_PACKAGE = "azure-functions-runtime"
RESTART_ATTEMPTS = 3  # tries a restart gets before the host gives up on the worker
RESTART_BUDGET = (10, 600.0)  # at most 10 restarts in 10 minutes, then the app is in error
_LEVELS = {
    protos.RpcLog.Trace: logging.DEBUG,
    protos.RpcLog.Debug: logging.DEBUG,
    protos.RpcLog.Information: logging.INFO,
    protos.RpcLog.Warning: logging.WARNING,
    protos.RpcLog.Error: logging.ERROR,
    protos.RpcLog.Critical: logging.CRITICAL,
}


class HostUnavailable(RuntimeError):
    """No worker can run functions now (the app failed to load, or a restart is taking too long)."""


class InvocationFailed(RuntimeError):
    """The function raised, timed out or lost its worker; the host answers an HTTP caller 500."""


def timespan(seconds: float | None) -> str:
    """Seconds as .NET writes a TimeSpan ("00:01:00"), for the host's own messages."""
    if seconds is None:
        return "-1"
    whole = int(seconds)
    text = f"{whole // 3600:02d}:{whole % 3600 // 60:02d}:{whole % 60:02d}"
    return text + (f".{round((seconds - whole) * 1e7):07d}" if seconds != whole else "")


def trace_parent(incoming: str | None) -> str:
    """A W3C traceparent for the invocation: the caller's trace if it sent one, a new span in it."""
    parts = (incoming or "").split("-")
    if len(parts) == 4 and len(parts[1]) == 32 and len(parts[2]) == 16:
        return f"00-{parts[1]}-{secrets.token_hex(8)}-{parts[3]}"
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-00"


class FunctionHost:
    def __init__(
        self,
        app_dir: Path,
        *,
        config: HostConfig,
        environ: Mapping[str, str] | None = None,
        config_error: str | None = None,
    ) -> None:
        self.app_dir = app_dir
        self.config = config
        self.config_error = config_error  # host.json the host refuses: nothing starts
        self.environ = dict(os.environ if environ is None else environ)
        self.functions = Functions()
        self.worker: WorkerChannel | None = None
        self.load_error: WorkerError | None = None
        self.started_at = time.monotonic()
        self._ready = asyncio.Event()
        self._executing: dict[str, str] = {}  # invocation id -> function name
        self._restarting: asyncio.Task | None = None
        self._watcher: asyncio.Task | None = None
        self._restarts: list[float] = []
        self._stopping = False

    # ---- the worker's life ----------------------------------------------------------------------

    async def start(self) -> None:
        """Start the worker and load the app; a failure is kept in `load_error`, not raised."""
        if self.config_error is not None:
            self.load_error = WorkerError(f"host.json: {self.config_error}")
            startup_log.error("The host cannot start: %s", self.load_error)
            return
        try:
            await self._start_worker(first=True)
        except WorkerError as err:
            self.load_error = err
            startup_log.error("The function app could not be loaded: %s\n%s", err, err.details)

    async def _start_worker(self, *, first: bool) -> None:
        timeout = self.config.function_timeout or 0.0
        channel = WorkerChannel(
            self.app_dir,
            on_log=self._worker_log,
            environ=self.environ,
            load_timeout=max(LOAD_TIMEOUT_SECONDS, timeout),
        )
        try:
            metadata = await channel.start()
            info = channel.metadata
            startup_log.info(
                "Python worker (pid %s): %s %s on Python %s, function app %s",
                channel.pid,
                WORKER_PACKAGE,
                info.worker_version,
                info.runtime_version,
                self.app_dir,
            )
            functions = index(metadata, self.environ)
            by_id = {m.function_id: m for m in metadata}
            for function in functions.loaded:
                try:
                    await channel.load(by_id[function.function_id])
                except WorkerError as err:
                    functions.errors.setdefault(function.name, []).append(err.details)
            functions.http = [f for f in functions.http if f.name not in functions.errors]
            functions.timers = [f for f in functions.timers if f.name not in functions.errors]
        except BaseException:
            await channel.stop()
            raise
        if first or functions.errors != self.functions.errors:
            self._log_functions(functions)
        self.functions, self.worker = functions, channel
        self._watcher = asyncio.create_task(self._watch(channel))
        self._ready.set()

    def _log_functions(self, functions: Functions) -> None:
        prefix = self.config.route_prefix
        lines = [
            f"{f.name}: [{','.join(f.methods or ('all',))}] /{prefix}/{f.route.template}"
            for f in functions.http
        ]
        lines += [f"{f.name}: timerTrigger ({f.schedule.expression})" for f in functions.timers]
        startup_log.info("Functions:\n\t%s", "\n\t".join(lines) or "(none)")
        for name, reason in functions.skipped.items():
            startup_log.warning("Function '%s' is not run: %s", name, reason)
        for name, errors in functions.errors.items():
            startup_log.error("The '%s' function is in error: %s", name, "\n".join(errors))

    async def _watch(self, channel: WorkerChannel) -> None:
        await channel.closed.wait()
        if channel is self.worker and not self._stopping and self._restarting is None:
            host_log.error("Language Worker Process exited. Pid=%s.", channel.pid)
            self._restart(channel, "Restarting the Python worker")

    def _restart(self, channel: WorkerChannel, message: str) -> None:
        if channel is not self.worker or self._restarting is not None or self._stopping:
            return
        host_log.warning(message)
        self._ready.clear()
        self._restarting = asyncio.create_task(self._do_restart(channel))

    async def _do_restart(self, channel: WorkerChannel) -> None:
        """Every way out either has a worker ready or sets `load_error`: no request waits forever."""
        try:
            await channel.stop()
            now = time.monotonic()
            count, window = RESTART_BUDGET
            self._restarts = [t for t in self._restarts if now - t < window] + [now]
            if len(self._restarts) > count:
                raise WorkerError(
                    f"The Python worker was restarted {count} times in {window / 60:.0f} minutes"
                )
            for attempt in range(1, RESTART_ATTEMPTS + 1):
                try:
                    await self._start_worker(first=False)
                    host_log.warning("Restart of language worker process(es) completed.")
                    return
                except WorkerError as err:
                    host_log.error(
                        "Worker restart %d of %d failed: %s", attempt, RESTART_ATTEMPTS, err.details
                    )
                    await asyncio.sleep(attempt)
            raise WorkerError("The Python worker could not be restarted")
        except WorkerError as err:
            self.load_error = err
            host_log.error("The host stops running functions: %s. Restart it after fixing the app.", err)
        except Exception as err:  # noqa: BLE001  (a bug here must not leave requests waiting)
            self.load_error = WorkerError(f"The worker restart failed: {type(err).__name__}: {err}")
            host_log.exception("The worker restart failed")
        finally:
            self._restarting = None
            if self.load_error is not None:
                self._ready.set()  # wakes the requests waiting for the worker: they get the error

    async def stop(self) -> None:
        self._stopping = True
        tasks = [task for task in (self._restarting, self._watcher) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.worker is not None:
            await self.worker.stop()

    # ---- logs from the worker -------------------------------------------------------------------

    def _worker_log(self, rpc_log: Any) -> None:
        level = _LEVELS.get(rpc_log.level)
        if level is None:
            return
        if rpc_log.log_category == protos.RpcLog.System:
            worker_log.log(level, "%s", rpc_log.message)
            return
        name = self._executing.get(rpc_log.invocation_id)
        if name is not None:  # outside an invocation the host ignores a User log
            logging.getLogger(f"Function.{name}.User").log(level, "%s", rpc_log.message)

    # ---- invocations ----------------------------------------------------------------------------

    async def invoke(
        self,
        function: HttpFunction | TimerFunction,
        data: Any,
        *,
        reason: str,
        traceparent: str | None = None,
    ) -> Any:
        """The worker's InvocationResponse for one call of `function` with its trigger's `data`."""
        if self.load_error is not None:
            raise HostUnavailable(str(self.load_error))
        try:
            await asyncio.wait_for(self._ready.wait(), START_TIMEOUT_SECONDS)
        except TimeoutError:
            raise HostUnavailable("the Python worker is restarting") from None
        if self.load_error is not None:
            raise HostUnavailable(str(self.load_error))
        worker = self.worker
        assert worker is not None
        invocation_id = str(uuid.uuid4())
        request = protos.InvocationRequest(
            invocation_id=invocation_id,
            function_id=function.function_id,
            input_data=[protos.ParameterBinding(name=function.arg_name, data=data)],
            trace_context=protos.RpcTraceContext(trace_parent=trace_parent(traceparent)),
            retry_context=protos.RetryContext(),
        )
        log = logging.getLogger(f"Function.{function.name}")
        log.info("Executing 'Functions.%s' (Reason='%s', Id=%s)", function.name, reason, invocation_id)
        self._executing[invocation_id] = function.name
        started = time.monotonic()
        call = asyncio.ensure_future(worker.invoke(request))
        call.add_done_callback(lambda done: done.cancelled() or done.exception())  # seen, even if we left
        try:
            response = await asyncio.wait_for(asyncio.shield(call), self.config.function_timeout)
        except TimeoutError:
            limit = timespan(self.config.function_timeout)
            name = f"Functions.{function.name}"
            log.error("Timeout value of %s exceeded by function '%s' (Id: '%s'). Initiating cancellation.",
                      limit, name, invocation_id)  # fmt: skip
            detail = f"FunctionTimeoutException: Timeout value of {limit} was exceeded by function: {name}"
            self._failed(log, function, invocation_id, started, detail)
            restart = "A function timeout has occurred. Restarting worker process executing invocationId"
            self._restart(worker, f"{restart} '{invocation_id}'.")
            raise InvocationFailed("timeout") from None
        except WorkerGone as err:
            self._failed(log, function, invocation_id, started, f"Language worker process exited: {err}")
            raise InvocationFailed(str(err)) from None
        finally:
            self._executing.pop(invocation_id, None)
        if response.result.status != protos.StatusResult.Success:
            exception = response.result.exception
            self._failed(
                log, function, invocation_id, started, f"{exception.message}\nStack: {exception.stack_trace}"
            )
            raise InvocationFailed(exception.message)
        log.info(
            "Executed 'Functions.%s' (Succeeded, Id=%s, Duration=%dms)",
            function.name,
            invocation_id,
            (time.monotonic() - started) * 1000,
        )
        return response

    def _failed(
        self, log: logging.Logger, function: Any, invocation_id: str, started: float, detail: str
    ) -> None:
        log.error(
            "Executed 'Functions.%s' (Failed, Id=%s, Duration=%dms)\nResult: Failure\nException: %s",
            function.name,
            invocation_id,
            (time.monotonic() - started) * 1000,
            detail,
        )
