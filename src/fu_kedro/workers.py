"""Worker processes shared by every stage that does independent CPU jobs side by side.

The evaluation's classifiers (:mod:`fu_kedro.classifiers.pool`) and the synthetic images of
one ``kedro run`` (``synthesis.workers``) each split their work into jobs whose results do not depend on
which process computes them: a job carries everything it needs, runs the same CPU kernels
on the same thread count, and the results come back in job order. So ``workers: 2`` gives
the same bits as ``workers: 1``, only sooner on an idle 2-core machine (pinned by the tests).

Workers are loky processes (joblib's reusable executor, what scikit-learn uses): started
once per run and reused by every node that asks for the same number.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Iterator

log = logging.getLogger(__name__)


def effective_workers(requested: Any, device, num_processes: int) -> int:
    """A stage's ``workers`` (an integer >= 1, its schema says) as it applies: 1 on a CUDA device
    (``device.type != "cpu"``) or under several launcher processes, which already split the work."""
    if device.type != "cpu" or num_processes > 1:
        return 1
    return requested


def _start_worker(level: int) -> None:
    # a worker's INFO lines go to its stderr, as in the main process
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-8s %(message)s", datefmt="[%X]")


def imap_in_workers(fn: Callable[[Any], Any], jobs: Iterable[Any], workers: int) -> Iterator[Any]:
    """``fn(job)`` for every job, on ``workers`` processes (1: here, one after the other), yielded in job order."""
    jobs = list(jobs)
    workers = max(1, min(int(workers), len(jobs)))
    if workers == 1:
        yield from map(fn, jobs)
        return
    from joblib.externals.loky import get_reusable_executor

    executor = get_reusable_executor(max_workers=workers, initializer=_start_worker, initargs=(logging.INFO,))
    futures = [executor.submit(fn, job) for job in jobs]
    for future in futures:
        yield future.result()


def map_in_workers(fn: Callable[[Any], Any], jobs: Iterable[Any], workers: int) -> list[Any]:
    """:func:`imap_in_workers` as a list."""
    return list(imap_in_workers(fn, jobs, workers))
