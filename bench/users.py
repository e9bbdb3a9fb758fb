"""App users for the benchmark: bearer tokens from the stack's dev issuer, minted before timing."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import jwt

from devstack.issuer import mint_user_token, object_id_for
from devstack.keys import SigningKey
from shared.keys import user_key


class Users:
    def __init__(self, env: dict, issuer_key: Path) -> None:
        self.env = env
        self.key = SigningKey.load(issuer_key)

    def token(self, user: str) -> str:
        """As an Entra-like IdP signs it: `sub`, and `oid` + `tid`."""
        return mint_user_token(
            key=self.key,
            issuer=self.env["issuer"],
            audience=self.env["audience"],
            user=user,
            tenant_id=self.env["tenant_id"],
        )

    def unique_token(self, user: str) -> str:
        """Like `token`, but never the same twice (a `jti`), as a client's next sign-in would be."""
        now = int(time.time())
        claims = {
            "iss": self.env["issuer"],
            "aud": self.env["audience"],
            "sub": user,
            "oid": object_id_for(user),
            "tid": self.env["tenant_id"],
            "roles": [],
            "iat": now,
            "nbf": now,
            "exp": now + 3600,
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(claims, self.key.private_key, algorithm="RS256", headers={"kid": self.key.kid})

    def token_without_entra_ids(self, user: str) -> str:
        """As a plain OpenID Connect IdP signs it: no `oid`/`tid`, so no Graph lookup row."""
        now = int(time.time())
        claims = {
            "iss": self.env["issuer"],
            "aud": self.env["audience"],
            "sub": user,
            "iat": now,
            "nbf": now,
            "exp": now + 3600,
        }
        return jwt.encode(claims, self.key.private_key, algorithm="RS256", headers={"kid": self.key.kid})

    def key_of(self, user: str) -> str:
        """The user's mapping PartitionKey, as the service computes it."""
        return user_key(self.env["issuer"], user)
