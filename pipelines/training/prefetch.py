"""Batches built ahead of the step that needs them, off the training loop's critical path.

A background thread reads the token windows and decodes the teacher-logits cache for the next
steps (a shard's checksum is verified there too, once, on first use) and puts each step's
micro-batches in a bounded queue. On a GPU the thread pins them, so the copy to the device that
:meth:`StepBatches.get` starts does not block the host. The loop waits only when the thread is
truly behind; :attr:`StepBatches.waited` is the time it waited, reported in the progress line and
in ``metrics.jsonl``.

Data order is a function of the step (see :func:`pipelines.training.batches.step_samples`), so the thread
needs only the first step: a resumed run starts it at the resumed step.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable

import torch

from pipelines.backend.distributed import map_tensors

_DONE = object()


class StepBatches:
    """The host batches ``build(step)`` of steps ``first, first + 1, …, end - 1``, built ``depth``
    steps ahead by one daemon thread; :meth:`get` returns the next step's, on ``layout``'s device."""

    def __init__(self, build: Callable[[int], list], first: int, end: int, layout, depth: int = 2):
        self.layout, self.next_step, self.end = layout, first, end
        self.waited = 0.0          # seconds get() has waited for the thread, in total
        self.last_wait = 0.0       # of the latest get()
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        pin = layout.device.type == "cuda"
        self._thread = threading.Thread(target=self._fill, args=(build, first, end, pin),
                                        name="step-batches", daemon=True)
        self._thread.start()

    def _fill(self, build, first: int, end: int, pin: bool) -> None:
        try:
            for step in range(first, end):
                batches = build(step)
                if pin:
                    batches = map_tensors(torch.Tensor.pin_memory, batches)
                if not self._put((step, batches)):
                    return
        except BaseException as error:  # handed to the loop, which raises it (e.g. a corrupted shard)
            self._put((None, error))
            return
        self._put((None, _DONE))

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(self, step: int) -> list:
        """Step ``step``'s micro-batches on the device (steps must be asked for in order)."""
        if step != self.next_step:
            raise RuntimeError(f"batches of step {self.next_step} are next, not of step {step}")
        started = time.perf_counter()
        produced, batches = self._queue.get()
        self.last_wait = time.perf_counter() - started
        self.waited += self.last_wait
        if produced is None:
            if batches is _DONE:
                raise RuntimeError(f"no batches past step {self.end}")
            raise batches
        self.next_step += 1
        return self.layout.place(batches)

    def close(self) -> None:
        self._stop.set()
        while True:  # unblock a put the thread is waiting in
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=5)

