"""The Functions host <-> language worker protocol (FunctionRpc.proto), as the dev host speaks it.

`protos` is what the Python worker hands `azure_functions_runtime` as `protos`; `stream` frames
the messages on the wire between the dev host and its worker process.
"""
