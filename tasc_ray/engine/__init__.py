"""TASC-spec, the algorithm: n-gram index, drafter, draft length, batched speculative generator, simulator.

Never imports Ray: everything here runs in a plain Python process, and Ray stages and Serve replicas call it.
"""
