"""Whole batches on every core at once: one worker process per core, one torch thread each.

Adaptive inference is mostly small operators (the probe at 2 latents, a dozen rows per setting in every block),
and a second intra-op thread speeds them up little: on the 2-core machine the p = 0.3 controller gains 1.38x from
it (its blocks 1.24x) where the full setting's large matmuls gain 1.73x (``python -m policy.benchmark --threads 1``
and ``2``; ``benchmarks.profile_adaptive`` under ``OMP_NUM_THREADS=1`` and ``2``). Giving each core its own process
and its own batches gives the adaptive path 1.13-1.24x more at batch 256, and the full setting the same as before
(``python -m policy.benchmark --processes 2``, docs/results). Throughput only: one image's latency cannot be split.

Workers are forked from the caller, so they share the loaded classifier (copy on write) and start in a moment.
Images go through slots of one shared-memory buffer mapped before the fork (the queues carry only slot numbers):
piping a batch of 256 images through a queue kept the workers waiting 5-13 ms per batch on the 2-core machine (as
measured while building this), a quarter to a half of an adaptive batch's compute, as the parent's feeder thread
needs a core to write it. Results (small) come back pickled, in input order; an error in a worker (a NaN image, say)
is raised in the caller with the worker's message. Needs ``fork`` (Linux).
"""

from __future__ import annotations

import math
import mmap
import multiprocessing as mp
import pickle
import queue
import signal
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch


def _run_full(classifier: Any, batch: torch.Tensor) -> torch.Tensor:
    return classifier.backbone(batch)


def _run_predict(classifier: Any, batch: torch.Tensor) -> Any:
    return classifier.predict(batch)


def _run_front(classifier: Any, batch: torch.Tensor) -> Any:
    return classifier.front(batch)[-1]  # the chosen settings: what the front decides (its tensors stay home)


METHODS = {"predict": _run_predict, "full": _run_full, "front": _run_front}


def _serve(classifier: Any, slots: torch.Tensor, tasks: mp.Queue, results: mp.Queue) -> None:
    """Worker loop: ``(call, index, function, slot, rows, pickled batch or None)`` in, ``(call, index, pickled output,
    error)`` out, until ``None``. A batch that does not fit a slot (shape, dtype, size) comes pickled instead."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the caller's to handle (it stops the pool), not ours
    # exit without flushing results nobody reads any more: a caller stopped mid-map (Ctrl-C, an error) leaves the
    # pipe full, and a worker waiting to flush it would hold up close() until it is killed
    results.cancel_join_thread()
    torch.set_num_threads(1)
    with torch.inference_mode():
        for call, index, method, slot, rows, payload in iter(tasks.get, None):
            try:
                batch = slots[slot, :rows] if payload is None else pickle.loads(payload)
                out = pickle.dumps(method(classifier, batch), protocol=pickle.HIGHEST_PROTOCOL)
            except Exception as e:  # sent back whole (type and message), raised in the caller
                results.put((call, index, None, (type(e).__name__, str(e))))
            else:
                results.put((call, index, out, None))


class CorePool:
    """``processes`` forked workers, each holding ``classifier`` and running whole batches with one torch thread.

    ``batch_size`` is the largest batch the shared slots hold (larger or odd-shaped ones are pickled through the
    queue instead: correct, slower). Use as a context manager (the workers stop on exit)::

        with CorePool(clf, processes=2) as pool:
            predictions = list(pool.map("predict", batches))
    """

    def __init__(self, classifier: Any, processes: int = 2, batch_size: int = 256, in_flight: int = 2) -> None:
        if min(processes, batch_size, in_flight) < 1:
            raise ValueError(f"need processes, batch_size, in_flight >= 1, got {processes}, {batch_size}, {in_flight}")
        if "fork" not in mp.get_all_start_methods():
            raise RuntimeError("CorePool forks its workers, which this platform cannot do; run in one process")
        device = next(classifier.backbone.parameters()).device
        if device.type != "cpu":
            raise ValueError(f"CorePool runs on CPU cores; this classifier is on {device}")
        cfg = classifier.backbone.cfg
        self.image_shape = (cfg.in_chans, cfg.img_size, cfg.img_size)
        self.batch_size = batch_size
        self.processes = processes
        n_slots = in_flight * processes  # batches queued or running: enough to keep every core busy
        self._buffer = mmap.mmap(-1, n_slots * batch_size * math.prod(self.image_shape) * 4)  # shared with forks
        self._slots = torch.frombuffer(self._buffer, dtype=torch.float32).view(n_slots, batch_size, *self.image_shape)
        self._slots_np = self._slots.numpy()  # the caller copies in with numpy: see _stage
        ctx = mp.get_context("fork")
        self._tasks, self._results = ctx.Queue(), ctx.Queue()
        self._call = 0
        self._workers = [
            ctx.Process(target=_serve, args=(classifier, self._slots, self._tasks, self._results), daemon=True)
            for _ in range(processes)
        ]
        for w in self._workers:
            w.start()

    def map(self, method: str | Callable[[Any, torch.Tensor], Any], batches: Iterable[torch.Tensor]) -> Iterator[Any]:
        """Outputs of ``method`` on each batch, in order, computed by the workers: "predict", "full" (the full
        setting's logits), "front" (the settings chosen), or a module-level function ``f(classifier, batch)``."""
        if isinstance(method, str):
            if method not in METHODS:
                raise ValueError(f"unknown method {method!r}; choose from {sorted(METHODS)}")
            method = METHODS[method]
        try:  # the queue would pickle it in a background thread, where a failure is printed and the task lost
            pickle.dumps(method)
        except (pickle.PicklingError, AttributeError, TypeError) as e:
            raise ValueError(f"a CorePool method must be a module-level function, got {method!r}: {e}") from None
        if not self._workers:
            raise RuntimeError("this CorePool is closed")
        self._call += 1
        free = list(range(len(self._slots)))  # every slot: an abandoned call's batches are dropped below, unread
        call, done, ready, sent, slot_of = self._call, {}, 0, 0, {}
        batches = iter(batches)
        exhausted = False
        while True:
            while not exhausted and free:
                batch = next(batches, None)
                if batch is None:
                    exhausted = True
                    break
                slot_of[sent] = slot = free.pop()
                self._tasks.put((call, sent, method, slot, len(batch), self._stage(batch, slot)))
                sent += 1
            if exhausted and ready == sent:
                return
            got, index, out, error = self._receive()
            if got != call:  # left over from a call abandoned part-way (an error, or a generator not run out)
                continue
            free.append(slot_of.pop(index))
            if error is not None:
                kind, message = error
                raise (ValueError if kind == "ValueError" else RuntimeError)(message)
            done[index] = pickle.loads(out)
            while ready in done:
                yield done.pop(ready)
                ready += 1

    def _stage(self, batch: torch.Tensor, slot: int) -> bytes | None:
        """Copy ``batch`` into ``slot`` (None returned), or pickle it when it does not fit one."""
        fits = (
            isinstance(batch, torch.Tensor)
            and batch.dtype == torch.float32
            and tuple(batch.shape[1:]) == self.image_shape
            and 0 < len(batch) <= self.batch_size
        )
        if not fits:
            return pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL)
        # numpy's copy runs on this thread alone; torch's copy_ would wake the caller's OpenMP threads, which then
        # spin-wait on the cores the workers need (the caller used 44-80 ms of CPU per 8 batches of 256 that way)
        np.copyto(self._slots_np[slot, : len(batch)], batch.detach().numpy())
        return None

    def _receive(self) -> tuple:
        while True:
            try:
                return self._results.get(timeout=1.0)
            except queue.Empty:
                dead = [w.exitcode for w in self._workers if not w.is_alive()]
                if dead:
                    self.close()
                    raise RuntimeError(f"a CorePool worker died (exit code {dead[0]}); the pool is closed") from None

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        workers, self._workers = self._workers, []
        for w in workers:
            if w.is_alive():
                self._tasks.put(None)
        for w in workers:
            w.join(timeout=5)
            if w.is_alive():
                w.terminate()
                w.join()
        if workers:
            self._tasks.cancel_join_thread()  # tasks a dead worker left unread must not hold up this process's exit

    def __enter__(self) -> CorePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
