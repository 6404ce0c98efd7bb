"""The OCI Distribution (Docker Registry HTTP API v2) adapter, as an ASGI application."""

from casengine.http.app import AllowAll, Authorizer, RegistryApp

__all__ = ["AllowAll", "Authorizer", "RegistryApp"]
