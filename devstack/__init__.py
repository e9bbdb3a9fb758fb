"""Local stand-ins for the Azure services the token service talks to.

Everything here exists so that `make run` and `make test` work on one machine with no Azure
account: Azurite for Table Storage, an ACS Identity emulator that the real SDKs accept, a dev
OpenID Connect issuer and an App Service-style managed-identity endpoint. The service package
(`shared/`) never imports this package.
"""
