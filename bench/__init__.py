"""Benchmarks: each module is one command (`python -m bench.NAME --help`) that prints figures.

`bench.harness` is the rig they share with the fault suite (tests/fault): fake
kernels, a real usbipa process, and /proc readings of a process's cost.
"""
