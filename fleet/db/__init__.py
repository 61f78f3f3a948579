"""The fleet's database layer: connection, transactions, paging, migrations."""
