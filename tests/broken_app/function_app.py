"""A function app whose import fails, as one with a missing requirement does in Azure."""

import azure.functions as func
import devhost_tests_no_such_module  # noqa: F401

app = func.FunctionApp()
