"""Device inventory, enrollment, revocation, broker credentials and label selectors."""
