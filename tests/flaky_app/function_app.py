"""A function app that fails to start the second time, as an app whose import breaks does.

Once SAMPLE_MARKER names a file that exists, importing this module exits the worker
(SAMPLE_MODE=exit) or never returns (SAMPLE_MODE=hang); `GET /api/crash` creates the file and
kills the worker, so the host's restart meets the broken import.
"""

import os
import pathlib
import time

import azure.functions as func

MARKER = pathlib.Path(os.environ["SAMPLE_MARKER"])
if MARKER.exists():
    if os.environ.get("SAMPLE_MODE") == "hang":
        time.sleep(3600)
    os._exit(3)

app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)


@app.route(route="crash", methods=["GET"])
def crash(req: func.HttpRequest) -> func.HttpResponse:
    MARKER.touch()
    os._exit(1)


@app.route(route="ok", methods=["GET"])
def ok(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse("ok")
