"""The GPU suite's plan: batch and epochs that fit the budget (benchmarks/gpu_forgetting.py)."""

import math

from benchmarks.gpu_forgetting import plan


def test_plan_takes_the_smallest_batch_that_reaches_min_epochs():
    # 512 records, 100 s per training (0.5 of 400 s, halved), one process: batch 8 is 64 steps an epoch
    steps = {"8": 0.05, "16": 0.05, "32": 0.05}
    p = plan(steps, 512, 400, 1, min_epochs=40, max_epochs=500, train_share=0.5)
    assert p["per_training_s"] == 100
    # batch 8: 100 / (64 · 0.05) = 31.25 -> 30 epochs (< 40); batch 16: 62.5 -> 60 (>= 40)
    assert (p["batch_size"], p["epochs"]) == (16, 60)
    assert p["options"] == [(8, 30), (16, 60), (32, 125)]


def test_plan_falls_back_to_the_largest_batch_and_caps_epochs():
    steps = {"8": 0.05, "32": 0.05}
    p = plan(steps, 512, 400, 1, min_epochs=1000, max_epochs=100, train_share=0.5)
    assert (p["batch_size"], p["epochs"]) == (32, 100)


def test_plan_slows_each_step_by_the_other_processes():
    one = plan({"8": 0.01}, 512, 400, 1, 1, 10_000, train_share=0.5, contention=0.5)
    three = plan({"8": 0.01}, 512, 400, 3, 1, 10_000, train_share=0.5, contention=0.5)
    assert three["slowdown"] == 2
    # 100 / (64 · 0.01) = 156.25 -> 155 alone; 100 / (64 · 0.02) = 78.1 -> 75 with two others
    assert (one["epochs"], three["epochs"]) == (155, 75)
    assert math.isclose(three["per_training_s"], one["per_training_s"])


def test_portable_names_keep_only_what_the_device_tool_brings_back():
    import re

    from benchmarks.forgetting import SCENARIOS
    from benchmarks.gpu_forgetting import portable

    names = [portable(f"{s}-n512-s0-bf16.json") for s in SCENARIOS]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", n) for n in names)
    assert len(set(names)) == len(SCENARIOS)  # no two scenarios collide
