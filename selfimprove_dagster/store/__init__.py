"""Where a round's artifacts live, the DuckDB catalog over them, and lineage queries.

`storage` is the one place that builds paths and writes files (atomically);
`lineage` answers "which samples, from which policy, trained this checkpoint?".

Promise: no path under the data dir is built outside this package.
"""
