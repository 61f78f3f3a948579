"""Signing keys, the TUF repository and the director document signer."""
