"""The real server as an operator runs it, for the tests, the benchmark and the reliability suite."""
