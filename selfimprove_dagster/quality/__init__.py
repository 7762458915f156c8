"""Gates, Great Expectations suites and monitors that guard a round.

`gates` and `prompt_gates` are pure functions returning the observed value and the
threshold (the Dagster checks in `assets/checks.py` only convert them);
`expectations` runs the Great Expectations suites; `monitors` and `metrics` compute
the B-STaR exploration / exploitation figures and pass@k.

Promise: pure functions over frames, no I/O, no Dagster import.
"""
