"""Several fleet processes on one database: roles, the leader lease (docs/scaling.md)."""
