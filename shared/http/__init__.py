"""The HTTP boundary, the only code that knows HTTP: each route declares its auth and limit
(`route.py`), errors become answers in one place (`problems.py`), results in another (`bodies.py`).

The route modules are named here for function_app.py, whose functions bear some of their names.
"""

from . import demo, events, health, manage, openapi, timer, tokens

__all__ = ["demo", "events", "health", "manage", "openapi", "timer", "tokens"]
