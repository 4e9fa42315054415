"""The step batches built ahead in a background thread (pipelines.training.prefetch)."""

import threading
import time

import pytest
import torch

from pipelines.core.errors import UserError
from pipelines.training.prefetch import StepBatches


class _Layout:
    device = torch.device("cpu")

    def place(self, data):
        return data


def _build(step: int) -> list[dict]:
    return [{"tokens": torch.full((2, 3), step), "thread": threading.current_thread().name}]


def test_batches_are_the_steps_own_in_order_built_by_another_thread():
    batches = StepBatches(_build, 3, 7, _Layout())
    for step in range(3, 7):
        (batch,) = batches.get(step)
        assert torch.equal(batch["tokens"], torch.full((2, 3), step))
        assert batch["thread"] == "step-batches"
    with pytest.raises(RuntimeError, match="no batches past step 7"):
        batches.get(7)
    batches.close()


def test_steps_must_be_asked_for_in_order():
    batches = StepBatches(_build, 0, 5, _Layout())
    with pytest.raises(RuntimeError, match="step 0 are next, not of step 1"):
        batches.get(1)
    batches.close()


def test_an_error_while_building_reaches_the_loop_at_that_step():
    def build(step):
        if step == 2:
            raise UserError("cache shard x is corrupted", "distill.cache")
        return _build(step)

    batches = StepBatches(build, 0, 5, _Layout())
    batches.get(0)
    batches.get(1)
    with pytest.raises(UserError, match="corrupted"):
        batches.get(2)
    batches.close()


def test_waits_are_counted_and_the_queue_is_bounded():
    built = []

    def slow(step):
        built.append(step)
        time.sleep(0.2)
        return _build(step)

    batches = StepBatches(slow, 0, 100, _Layout(), depth=2)
    batches.get(0)
    assert batches.last_wait >= 0.15  # nothing was ready: the loop waited for the first build
    time.sleep(1.0)  # the thread fills the queue (2 steps) plus the one it holds, then blocks
    assert len(built) <= 4
    started = time.perf_counter()
    batches.get(1)
    assert time.perf_counter() - started < 0.1 and batches.last_wait < 0.1
    assert batches.waited >= 0.15
    batches.close()
    assert not batches._thread.is_alive()
