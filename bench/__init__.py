"""bitplan's benchmarks: scripts that print the tables the README quotes (`python bench/NAME.py`),
plus what they and the end-to-end tests share: `deploy` (a real deployment on loopback) and
`loadgen` (the HTTP load client). A package so that tests import those two as `bench.deploy`
and `bench.loadgen`, and import-linter can check that nothing here imports tests."""
