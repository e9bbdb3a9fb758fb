"""The Microsoft Graph subscription on users: `client.py` speaks Graph's API, `subscriptions.py`
creates, renews and reports on the subscription."""

from .subscriptions import GraphSubscriptions

__all__ = ["GraphSubscriptions"]
