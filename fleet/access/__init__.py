"""API keys, enrollment tokens, roles and the API's authentication."""
