"""The timing harness's clocks: wall time counts sleeping, process CPU time does not."""

import time

import torch

from transferlab.core.bench import time_fn


def test_cpu_clock_reads_process_time_and_auto_follows_the_thread_count():
    nap = lambda: time.sleep(0.03)  # noqa: E731  (no CPU work, 30 ms of wall time)
    assert time_fn(nap, warmup=0, repeat=3) >= 0.03
    assert time_fn(nap, warmup=0, repeat=3, clock="cpu") < 0.02
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert time_fn(nap, warmup=0, repeat=3, clock="auto") < 0.02
        torch.set_num_threads(2)
        assert time_fn(nap, warmup=0, repeat=3, clock="auto") >= 0.03
    finally:
        torch.set_num_threads(threads)
