"""The cleanup timer's trigger: pending revocations and deletions, then retention (shared/cleanup/)."""

from __future__ import annotations

import logging

import azure.functions as func

from ..compose import services
from ..errors import ServiceError

log = logging.getLogger("acs_token_service.cleanup")


async def cleanup(_timer: func.TimerRequest) -> None:
    """A failed run only logs: the next one starts from the same durable state."""
    try:
        await services().cleanup.run()
    except ServiceError as err:
        log.error("cleanup run skipped: %s (%s)", err.code, err.detail)
    except Exception as err:  # noqa: BLE001
        log.error("cleanup run failed: %s", type(err).__name__)
