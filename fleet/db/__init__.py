"""The fleet's database layer, below every feature slice (it imports none of them).

`connection.open_sqlite` is how any fleet SQLite file is opened (pragmas in one place);
`database.FleetDatabase` is the fleet store's connection, lock, transactions and paging;
`migrations` its schema; `paging` the cursors; `rows` the JSON/time encoding and the typed
`Record` base; `audit` and `idempotency` the two tables every slice or route shares.
"""
