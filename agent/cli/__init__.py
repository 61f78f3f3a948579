"""The `edgefleet` command-line root and the `edgefleet agent` group."""
