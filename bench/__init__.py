"""bitplan's benchmarks: scripts that print the tables the README quotes (`python bench/NAME.py`),
plus what they and the end-to-end tests share: `deploy` (a real deployment on loopback) and
`loadgen` (the HTTP load client), and the scripts' own parts (`tables`, `drain`, `attacks`,
`spec_fuzz`). A package so that tests import these as `bench.<module>`, and import-linter can
check that nothing here imports tests."""
