"""The test kit: what the tests share, one module per job.

``site``     scratch directories with a config, a store directory and recording actions
``servers``  programs under test started one way (the port learned from ``-1``)
``wire``     the client side of the Ostiary protocol, and raw sockets
``damage``   the catalogue of broken store files (store, handler and operator tests)
``procs``    waiting, /proc: processes, zombies, descriptors, "the work is over"
``vectors``  HMAC test vectors from ``tests/vectors/*.txt``, with their provenance
``parsers``  the parsers' contract, which every fuzzer checks (Hypothesis, atheris)
"""
