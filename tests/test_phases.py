"""recallk.training.phases: the seconds per phase of the training loop that summary.json reports."""

from __future__ import annotations

import time

import torch

from recallk.training.phases import PhaseClock


def test_the_first_step_is_counted_whole_and_the_later_ones_by_phase() -> None:
    clock = PhaseClock(torch.device("cpu"))
    for _step in range(3):
        for _ in clock.timed([None], "data"):
            time.sleep(0.02)  # waiting for the batch happens inside next(), not here
        time.sleep(0.01)
        clock.lap("forward_backward")
        time.sleep(0.005)
        clock.step_done()
    clock.mark()
    time.sleep(0.03)
    clock.lap("evaluation")
    seconds = clock.summary()
    assert set(seconds) == {"first_step", "data", "forward_backward", "optimizer", "evaluation"} and clock.steps == 3
    assert seconds["forward_backward"] >= 0.02 and seconds["optimizer"] >= 0.01 and seconds["first_step"] >= 0.015
    assert seconds["data"] < 0.01 and seconds["evaluation"] >= 0.03  # the sleeps in the loop body are not data waits


def test_waiting_for_a_slow_iterator_is_data_time() -> None:
    def slow():
        for item in range(2):
            time.sleep(0.03)
            yield item

    clock = PhaseClock(torch.device("cpu"))
    clock.steps = 1  # past the first step
    assert list(clock.timed(slow(), "data")) == [0, 1]
    assert clock.summary()["data"] >= 0.06
