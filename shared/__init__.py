"""The token service: everything function_app.py calls into. Never imports devstack."""
