"""Where backbone passes and cells run. Every executor yields each cell's :class:`CellResult` as
it finishes; the runner journals it, and the finish stage writes in plan order, so the order cells
finish in never changes an output: any executor gives the local executor's tables.

``ray``: each group's backbone pass is a Ray task, and each model x fold cell is a Ray task that
reads the pass from Ray's object store, on a local Ray instance or a cluster (``--ray-address``).
With a CUDA device, a pass or fine-tuning cell asks for a whole GPU and a frozen model's cell a
quarter of one. Tasks run with the driver's torch thread count, so their floating-point results
equal the local executor's. On a cluster, ``--out`` (checkpoints) and ``--cache`` must be on a file
system every node sees.
"""
from __future__ import annotations

from typing import Iterator, Protocol as TypingProtocol

import torch

from auditbench.data.splits import Fold
from auditbench.pipeline.evaluate import CellContext, run_cell
from auditbench.pipeline.passes import PassFactory
from auditbench.pipeline.records import CellResult, GroupPlan
from auditbench.protocol.grid import ModelSpec

Work = list[tuple[GroupPlan, list[tuple[ModelSpec, Fold]]]]
EXECUTORS = ("local", "ray")


class ExecutorError(ValueError):
    """An executor that cannot be used (unknown, or Ray not installed or not reachable)."""


class Executor(TypingProtocol):
    name: str

    def run(self, context: CellContext, passes: PassFactory, work: Work) -> Iterator[tuple[ModelSpec, Fold, CellResult]]: ...

    def store_counts(self, passes: PassFactory) -> dict[str, int]: ...


class LocalExecutor:
    """Passes and cells one after another in this process; passes share one in-memory store."""

    name = "local"

    def run(self, context, passes, work):
        for group, cells in work:
            inputs = passes.group_inputs(group)
            for spec, fold in cells:
                yield spec, fold, run_cell(context, spec, inputs, group.task_inputs.data, fold)

    def store_counts(self, passes):
        return passes.store_counts()


def _pass_task(passes: PassFactory, group: GroupPlan, threads: int):
    torch.set_num_threads(threads)
    inputs = passes.group_inputs(group)
    return inputs, dict(passes.clock.seconds), dict(passes.warning_counts), passes.store_counts()


def _cell_task(context: CellContext, spec: ModelSpec, inputs, data, fold: Fold, threads: int) -> CellResult:
    torch.set_num_threads(threads)
    return run_cell(context, spec, inputs, data, fold)


class RayExecutor:
    name = "ray"

    def __init__(self, address: str | None = None):
        try:
            import ray
        except ImportError:
            raise ExecutorError("--executor ray needs Ray: pip install 'auditbench[ray]'") from None
        self.ray = ray
        if not ray.is_initialized():
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
            except (ConnectionError, RuntimeError, ValueError) as error:
                raise ExecutorError(f"--executor ray: cannot start or reach Ray at {address or 'a local instance'}: "
                                    f"{error}") from None
        self._counts = {"entries_read": 0, "entries_written": 0}
        self._pass_task = ray.remote(_pass_task)
        self._cell_task = ray.remote(_cell_task)

    def _gpus(self, context: CellContext, full: bool) -> float:
        if context.accelerator.device.type != "cuda":
            return 0
        return 1 if full else 0.25

    def run(self, context, passes, work):
        ray, threads = self.ray, torch.get_num_threads()
        pending = {}
        for group, cells in work:
            made = self._pass_task.options(num_cpus=1, num_gpus=self._gpus(context, True)).remote(passes, group, threads)
            inputs, seconds, warnings, counts = ray.get(made)
            passes.clock.merge(seconds)
            passes.warning_counts.update(warnings)
            self._counts = {k: self._counts[k] + counts[k] for k in self._counts}
            inputs_ref, data_ref = ray.put(inputs), ray.put(group.task_inputs.data)
            del inputs
            for spec, fold in cells:
                task = self._cell_task.options(num_cpus=1, num_gpus=self._gpus(context, spec.finetune))
                pending[task.remote(context, spec, inputs_ref, data_ref, fold, threads)] = (spec, fold)
            # Cells of a group run while the next group's pass is computed; results come back as they finish.
            while len(pending) > 4 * max(1, int(ray.available_resources().get("CPU", 1))):
                yield from self._collect(pending, wait_for=1)
        while pending:
            yield from self._collect(pending, wait_for=1)

    def _collect(self, pending: dict, wait_for: int):
        ready, _ = self.ray.wait(list(pending), num_returns=wait_for)
        for ref in ready:
            spec, fold = pending.pop(ref)
            yield spec, fold, self.ray.get(ref)

    def store_counts(self, passes):
        return dict(self._counts)


def make_executor(name: str, address: str | None = None) -> Executor:
    if name == "local":
        if address is not None:
            raise ExecutorError("--ray-address needs --executor ray")
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(address)
    raise ExecutorError(f"unknown executor {name!r} (known: {', '.join(EXECUTORS)})")
