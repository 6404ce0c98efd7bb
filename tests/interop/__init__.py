"""Interop tests: real clients (skopeo, oras-py) against a real casengine serve."""
