"""The generated FunctionRpc message classes under the names the Python worker's `protos` module uses.

`azure_functions_runtime` builds its answers from `request.properties["protos"]` (e.g.
`protos.InvocationResponse(...)`); the Python worker passes a module exporting these names
(Azure/azure-functions-python-worker, workers/proxy_worker/protos/__init__.py), and so does the dev
host. The `*_pb2` modules are generated from the .proto files beside this one by `make protos`.
"""

from __future__ import annotations

try:
    from . import FunctionRpc_pb2 as _rpc
    from . import NullableTypes_pb2 as _nullable
except ImportError as err:  # a checkout where `make` has not run yet
    raise ImportError(
        "devstack/rpc/*_pb2.py are missing or stale: run `make protos` (make setup does it)"
    ) from err

StreamingMessage = _rpc.StreamingMessage
StartStream = _rpc.StartStream
WorkerInitRequest = _rpc.WorkerInitRequest
WorkerInitResponse = _rpc.WorkerInitResponse
WorkerMetadata = _rpc.WorkerMetadata
WorkerStatusRequest = _rpc.WorkerStatusRequest
WorkerStatusResponse = _rpc.WorkerStatusResponse
StatusResult = _rpc.StatusResult
RpcException = _rpc.RpcException
RpcLog = _rpc.RpcLog
FunctionEnvironmentReloadRequest = _rpc.FunctionEnvironmentReloadRequest
FunctionEnvironmentReloadResponse = _rpc.FunctionEnvironmentReloadResponse
FunctionsMetadataRequest = _rpc.FunctionsMetadataRequest
FunctionMetadataResponse = _rpc.FunctionMetadataResponse
RpcFunctionMetadata = _rpc.RpcFunctionMetadata
BindingInfo = _rpc.BindingInfo
RpcRetryOptions = _rpc.RpcRetryOptions
FunctionLoadRequest = _rpc.FunctionLoadRequest
FunctionLoadResponse = _rpc.FunctionLoadResponse
InvocationRequest = _rpc.InvocationRequest
InvocationResponse = _rpc.InvocationResponse
RpcTraceContext = _rpc.RpcTraceContext
RetryContext = _rpc.RetryContext
ParameterBinding = _rpc.ParameterBinding
TypedData = _rpc.TypedData
RpcDataType = _rpc.RpcDataType
RpcSharedMemory = _rpc.RpcSharedMemory
RpcHttp = _rpc.RpcHttp
RpcHttpCookie = _rpc.RpcHttpCookie
CollectionString = _rpc.CollectionString
CollectionBytes = _rpc.CollectionBytes
CollectionDouble = _rpc.CollectionDouble
CollectionSInt64 = _rpc.CollectionSInt64
NullableString = _nullable.NullableString
NullableBool = _nullable.NullableBool
NullableDouble = _nullable.NullableDouble
NullableTimestamp = _nullable.NullableTimestamp
