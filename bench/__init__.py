"""modelfleet's benchmarks: `python -m bench` runs them all and prints one table with a verdict per goal;
`python -m bench.NAME` runs one with its own detailed report. See bench/README.md."""
