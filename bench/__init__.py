"""Benchmark of the qwen-grpc service against its own engine, transformers and llama.cpp.

``python -m bench.run`` (``make bench``) builds the Qwen-shaped random-weight model, starts the
real server as a subprocess and drives it over gRPC at several concurrency levels, runs the
in-process baselines on the same weights, and writes ``bench/results/latest.{json,md,png}``.
It is not part of the test suite: a full run takes many minutes on a 2-core machine.
"""
