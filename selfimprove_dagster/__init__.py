"""selfimprove_dagster: iterative LLM self-improvement as round-partitioned Dagster assets.

The core library (this package) is plain Python: importing it loads neither torch nor
Dagster. Heavy libraries are imported inside the functions that need them;
`selfimprove_dagster.definitions` is the Dagster composition root.
"""

__version__ = "0.1.0"
