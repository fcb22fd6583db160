"""The reliability suite (issue 6): the service's worst day, reproduced on demand with numbers.

``python -m reliability.run`` (``make reliability``) starts real server processes on loopback
and runs six scenarios against them: load, bad input, faults, drain, soak and long prompt. Each
scenario is a module with one entry point that takes a started server and a plan (the counts),
so the full run and the smoke test in ``make test`` share the code and differ only in the counts.

Nothing heavy is imported here: :mod:`reliability.doomed_client` runs in throwaway processes
that must start in a fraction of a second.
"""
