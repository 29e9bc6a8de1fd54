"""Shared test set-up: one share of the cores per xdist worker.

``pytest -n 2`` runs two worker processes; with torch's default of one intra-op thread per core
each, the machine runs twice as many busy threads as it has cores, and small operations (most
of this suite) then wait on each other's thread pools: a test can take ten times as long as
alone. Each worker takes ``cores // workers`` threads instead.
"""

import os

import torch


def pytest_configure(config):
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if os.environ.get("PYTEST_XDIST_WORKER") and workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
