"""`python -m agent.cli ...` runs the `edgefleet` command line (tests and benchmarks use it)."""

from agent.cli.main import main

main()
