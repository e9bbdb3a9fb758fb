"""App users for the benchmark: bearer tokens from the stack's dev issuer, minted before timing."""

from __future__ import annotations

import uuid
from pathlib import Path

from devstack.issuer import mint_user_token
from devstack.signing import SigningKey
from shared.store.keys import user_key


class Users:
    def __init__(self, env: dict, issuer_key: Path) -> None:
        self.env = env
        self.key = SigningKey.load(issuer_key)

    def _mint(self, user: str, **options) -> str:
        return mint_user_token(
            key=self.key,
            issuer=self.env["issuer"],
            audience=self.env["audience"],
            user=user,
            tenant_id=self.env["tenant_id"],
            **options,
        )

    def token(self, user: str) -> str:
        """As an Entra-like IdP signs it: `sub`, and `oid` + `tid`."""
        return self._mint(user)

    def unique_token(self, user: str) -> str:
        """Like `token`, but never the same twice (a `jti`), as a client's next sign-in would be."""
        return self._mint(user, token_id=uuid.uuid4().hex)

    def token_without_entra_ids(self, user: str) -> str:
        """As a plain OpenID Connect IdP signs it: no `oid`/`tid`, so no Graph lookup row."""
        return self._mint(user, entra_ids=False)

    def key_of(self, user: str) -> str:
        """The user's mapping PartitionKey, as the service computes it."""
        return user_key(self.env["issuer"], user)
