"""The engine: the one place that knows about devices, processes, precision, seeds and checkpoints.

A thin facade over Hugging Face Accelerate. Method code receives tensors and modules and never
sees a `cuda` string or a rank. Plain `python -m transferlab run ...` is one process;
`accelerate launch -m transferlab run ...` gives DDP/FSDP with the same code.
"""

from __future__ import annotations

import os
import random
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import UserError
from .io import atomic_torch_save


def default_threads(num_processes: int = 1) -> int:
    """Torch intra-op threads per process.

    Why: on these 2-core machines, oversubscribing cores makes small ops many times slower
    (measured: 2 threads up to 13x slower than 1 while the other core was busy). We give each
    process an equal share of the cores it may use, never more. Override with TRANSFERLAB_THREADS.
    """
    env = os.environ.get("TRANSFERLAB_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            raise UserError(f"TRANSFERLAB_THREADS={env!r} must be a positive integer") from None
        if n < 1:
            raise UserError(f"TRANSFERLAB_THREADS={env!r} must be a positive integer")
        return n
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, num_processes))


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch; CPU runs with the same seed are bitwise identical."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Engine:
    """Device, precision, processes, seeding, checkpoints, gathering and rank-0 printing.

    Args:
        device: "auto" (CUDA if available), "cpu" or "cuda".
        mixed_precision: "no", "bf16" or "fp16" (passed to Accelerate).
        threads: torch intra-op threads; None picks `default_threads()`.
    """

    def __init__(self, device: str = "auto", mixed_precision: str = "no", threads: int | None = None):
        if device not in ("auto", "cpu", "cuda"):
            raise UserError(f"device must be auto, cpu or cuda, got {device!r}")
        if device == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
        from accelerate import Accelerator  # the only import of accelerate in transferlab

        # On a machine without CUDA, "auto" means CPU. Telling Accelerate so also lets it pick gloo
        # for several CPU processes started by `accelerate launch --multi_gpu` or torchrun.
        cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
        self.accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision)
        self.threads = threads or default_threads(self.accelerator.state.num_processes)
        torch.set_num_threads(self.threads)
        self.run_dir: Path | None = None  # set by the runner for each (arm, seed)

    # ---- processes --------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    @property
    def process_index(self) -> int:
        return self.accelerator.process_index

    def print0(self, *args, **kwargs) -> None:
        if self.is_main:
            print(*args, **kwargs, flush=True)

    def wait(self) -> None:
        self.accelerator.wait_for_everyone()

    def shard(self, items: list, equal: bool = True) -> list:
        """This process's share of `items`: every world-th one, starting at its rank.

        With `equal` the tail is dropped so every rank gets as many items (training batches, where
        ranks step together); without it every item goes to some rank (evaluation, summed exactly)."""
        world = self.num_processes
        if world == 1:
            return items
        if equal:
            items = items[: len(items) - len(items) % world]
        return items[self.process_index::world]

    def progress(self, iterable=None, **kwargs):
        """A tqdm bar on rank 0 only; silent when stdout is not a terminal."""
        from tqdm.auto import tqdm

        return tqdm(iterable, disable=(not self.is_main) or None, leave=False, dynamic_ncols=True, **kwargs)

    # ---- training ---------------------------------------------------------------------------
    def prepare(self, *objects):
        """Wrap models/optimizers/dataloaders for the current device and process group."""
        return self.accelerator.prepare(*objects)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.accelerator.unwrap_model(model)

    def autocast(self):
        return self.accelerator.autocast() if self.accelerator.mixed_precision != "no" else nullcontext()

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate a per-process tensor over processes, dropping the sampler's padding duplicates."""
        return self.accelerator.gather_for_metrics(tensor)

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Exact sum over processes (use integer counts for exact accuracies)."""
        if self.num_processes == 1:
            return tensor
        return self.accelerator.reduce(tensor.clone(), reduction="sum")

    # ---- seeding and checkpoints ------------------------------------------------------------
    def seed(self, seed: int) -> None:
        seed_everything(seed)

    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.run_dir is None else self.run_dir / "checkpoint.pt"

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """Atomically save `state` plus all RNG states (rank 0 writes; everyone waits)."""
        if self.checkpoint_path is None:
            return
        if self.is_main:
            atomic_torch_save({"state": state, "rng": rng_state()}, self.checkpoint_path)
        self.wait()

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The last saved state, with RNG states restored, or None when starting fresh."""
        path = self.checkpoint_path
        if path is None or not path.exists():
            return None
        blob = torch.load(path, map_location="cpu", weights_only=False)
        set_rng_state(blob["rng"])
        return blob["state"]
