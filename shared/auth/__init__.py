"""Who is calling: a bearer JWT from the app's OpenID Connect issuer, or an Easy Auth principal.

`caller.py` is the result, `jwt.py` validates bearers against the keys `jwks.py` keeps, and
`easyauth.py` reads the principal App Service Authentication passes on.
"""

from .caller import Caller
from .easyauth import EasyAuthAuthenticator
from .jwks import JwksCache
from .jwt import JwtAuthenticator, unverified_segment

__all__ = ["Caller", "EasyAuthAuthenticator", "JwksCache", "JwtAuthenticator", "unverified_segment"]
