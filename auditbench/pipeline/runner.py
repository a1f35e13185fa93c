"""`auditbench run`: the stages in order, with progress, resume and an executor.

plan (data, grid -> groups of model x fold cells) -> backbone passes per group -> cells (fit,
explain, audit; each journalled as it finishes) -> finish (aggregate, validate, select, write).
"""
from __future__ import annotations

import shlex
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from auditbench.explain.cam_base import resolve_method
from auditbench.outputs import PARTIAL_MARKER, new_run_id, prepare_output, protocol_yaml
from auditbench.pipeline.evaluate import CellContext
from auditbench.pipeline.executors import Executor, make_executor
from auditbench.pipeline.finish import RunState, finish_run
from auditbench.pipeline.journal import CellJournal
from auditbench.pipeline.names import check_registered_names
from auditbench.pipeline.passes import PassFactory
from auditbench.pipeline.plan import RunPlan, plan_run
from auditbench.pipeline.probes import probe_cells
from auditbench.pipeline.sanity import sanity_cells
from auditbench.pipeline.provenance import git_commit
from auditbench.pipeline.records import CellKey, CellResult, StageClock
from auditbench.data.datasets import data_axes
from auditbench.protocol.grid import expand_grid
from auditbench.protocol.loader import dump_protocol
from auditbench.protocol.schema import Protocol
from auditbench.training.device import Accelerator, accelerator_for


STORE_DIR = "store"  # the run's own feature store (without --cache), inside its staging folder


class Runner:
    """Runs one protocol into one (staging) output folder; resumes from the folder's journal."""

    def __init__(self, protocol: Protocol, out_dir: Path, base_dir: Path, console: Console | None = None,
                 run_id: str | None = None, cache_dir: Path | None = None, executor: Executor | None = None):
        self.protocol = protocol
        self.out_dir = out_dir
        self.run_id = run_id or new_run_id()
        self.protocol_text, self.protocol_sha256 = protocol_yaml(dump_protocol(protocol), self.run_id)
        self.base_dir = base_dir
        self.console = console or Console(stderr=True)
        self.clock = StageClock()
        self.accelerator: Accelerator = accelerator_for(protocol.training)
        self.specs = expand_grid(protocol, data_axes(protocol))
        self.cache_dir = cache_dir
        self.executor = executor or make_executor("local")
        # Without --cache the store is working state of this run (and of its resumption).
        self.store_folder = Path(cache_dir) if cache_dir is not None else out_dir / STORE_DIR
        self.pass_factory = PassFactory(protocol, self.accelerator, self.store_folder)
        self.cells_finished = 0
        check_registered_names(protocol)
        self.cams = {name: resolve_method(name) for name in protocol.explain.method}

    @property
    def provenance(self) -> dict[str, str]:
        """What every output carries: this run's id and the sha256 of its resolved protocol."""
        return {"run_id": self.run_id, "protocol_sha256": self.protocol_sha256}

    def say(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def run(self) -> dict:
        started, self._started_at = datetime.now(timezone.utc), time.perf_counter()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "protocol.resolved.yaml").write_text(self.protocol_text, encoding="utf-8")
        with self.clock.stage("data"):
            plan = plan_run(self.protocol, self.base_dir)
        journal = CellJournal(self.out_dir, {
            "protocol_sha256": self.protocol_sha256, "run_id": self.run_id,
            "data_fingerprint": plan.data_fingerprint, "code": git_commit() or _version(),
        })
        dropped = journal.open()
        if dropped:
            self.say(dropped)
        done = {key: cell for group in plan.groups for spec, fold in group.cells
                if (cell := journal.read(key := CellKey(spec.model_id, fold.index))) is not None}
        if done:
            self.say(f"resuming run {self.run_id}: {len(done)} of {plan.n_cells} model x fold cells are done "
                     f"and are reused (journal in {journal.folder})")
        try:
            computed = self._compute_cells(plan, journal, done)
        except KeyboardInterrupt:  # Ctrl-C: say what is kept and how to resume; exit 130 (128 + SIGINT)
            self._interrupted(plan)
            raise SystemExit(130) from None
        cells = [done.get(key) or computed[key] for group in plan.groups
                 for key in (CellKey(spec.model_id, fold.index) for spec, fold in group.cells)]
        self.clock.merge(self.pass_factory.clock.seconds)
        extra = {"executor": self.executor.name}
        if self.cache_dir is not None:
            extra["feature_store"] = {"folder": str(self.cache_dir), **self.executor.store_counts(self.pass_factory)}
        state = RunState(self.protocol, self.out_dir, self.provenance, plan, cells, self.clock,
                         self.accelerator.describe(), started, self.pass_factory.warning_counts,
                         cells_reused=len(done), extra=extra, before_manifest=lambda: self._remove_working_state(journal))
        return finish_run(state)

    def _remove_working_state(self, journal: CellJournal) -> None:
        """The journal and (without --cache) the store are not outputs: gone before the manifest is
        built, and only then, so a run that fails while finishing still resumes from its cells."""
        journal.remove()
        if self.cache_dir is None:
            shutil.rmtree(self.store_folder, ignore_errors=True)

    # ----- cells ------------------------------------------------------------------------------

    def _compute_cells(self, plan: RunPlan, journal: CellJournal, done: dict[CellKey, CellResult]) -> dict[CellKey, CellResult]:
        computed: dict[CellKey, CellResult] = {}
        context = CellContext(self.protocol, self.accelerator, self.cams, self.out_dir, self.provenance,
                              frozenset(sanity_cells(plan)), frozenset(probe_cells(plan)))
        total, self.cells_finished = plan.n_cells, len(done)
        # A terminal gets the live bar; a log (CI, a pipe) one plain line per finished model x fold.
        plain = not self.console.is_terminal
        loop_start, n_computed = time.perf_counter(), 0
        columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn()]
        with Progress(*columns, console=self.console, disable=plain) as progress:
            bar = progress.add_task("training and auditing", total=total, completed=len(done))
            work = [(group, [(spec, fold) for spec, fold in group.cells if CellKey(spec.model_id, fold.index) not in done])
                    for group in plan.groups]
            # A group whose cells are all journalled needs no backbone pass.
            work = [(group, todo) for group, todo in work if todo]
            for spec, fold, result in self.executor.run(context, self.pass_factory, work):
                journal.write(result)
                computed[result.key] = result
                self.cells_finished += 1
                n_computed += 1
                progress.update(bar, advance=1, description=f"{spec.model_id} fold {fold.index}")
                if plain:
                    self._progress_line(spec.model_id, fold.index, result, total, n_computed, loop_start)
        return computed

    def _progress_line(self, model_id: str, fold: int, result: CellResult, total: int, n_computed: int,
                       loop_start: float) -> None:
        """ETA from the cells computed in this process (reused ones took no time here)."""
        now = time.perf_counter()
        eta = (now - loop_start) / n_computed * (total - self.cells_finished)
        self.say(f"[{self.cells_finished}/{total}] {model_id} fold {fold} done in {sum(result.stage_seconds.values()):.1f} s; "
                 f"elapsed {_clock(now - self._started_at)}, ETA {_clock(eta)}")

    def _interrupted(self, plan: RunPlan) -> None:
        command = shlex.join(["auditbench", *sys.argv[1:]]) if sys.argv[1:2] == ["run"] else "the same auditbench run command"
        if self.cells_finished and (self.out_dir / PARTIAL_MARKER).exists():
            cells = "cell" if self.cells_finished == 1 else "cells"
            verb = "is" if self.cells_finished == 1 else "are"
            kept = (f"the finished {cells} ({self.cells_finished}) {verb} kept in {self.out_dir}; the output folder is "
                    f"as it was. To resume, rerun: {command}")
        else:
            kept = f"nothing is kept; the output folder is as it was. To rerun: {command}"
        self.say(f"interrupted after {self.cells_finished} of {plan.n_cells} model x fold runs; {kept}")


def _clock(seconds: float) -> str:
    return f"{int(seconds // 3600)}:{int(seconds % 3600 // 60):02d}:{int(seconds % 60):02d}"


def _version() -> str:
    from auditbench.pipeline.provenance import package_versions

    return package_versions().get("auditbench", "unknown")


def run_protocol(protocol: Protocol, out_dir: Path, base_dir: Path | None = None, console: Console | None = None,
                 overwrite: bool = False, make_parents: bool = False, cache_dir: Path | None = None,
                 executor: str = "local", ray_address: str | None = None, restart: bool = False) -> dict:
    """Run a validated protocol and write every output into ``out_dir`` (docs/tables.md).

    The run writes into a staging folder beside ``out_dir`` and moves it into place when complete
    (``auditbench.outputs``); an existing ``out_dir`` must be empty or an earlier run, unless
    ``overwrite`` (which still deletes no file auditbench did not write). A run of the same protocol
    on the same ``out_dir`` that stopped before its end (Ctrl-C, a crash, SIGKILL) is resumed: its
    finished model x fold cells are reused, unless ``restart``. Raises
    :class:`auditbench.outputs.OutputError` when ``out_dir`` cannot be used."""
    console = console or Console(stderr=True)

    def say(text: str) -> None:
        console.print(text, highlight=False, markup=False, soft_wrap=True)

    _, protocol_sha256 = protocol_yaml(dump_protocol(protocol), "")
    resume = None if restart else (lambda staging: CellJournal.resumable(staging, protocol_sha256))
    with prepare_output(out_dir, overwrite=overwrite, say=say, make_parents=make_parents, resume=resume) as target:
        runner = Runner(protocol, target.staging, Path(base_dir or Path.cwd()), console, run_id=target.run_id,
                        cache_dir=cache_dir, executor=make_executor(executor, ray_address))
        try:
            summary = runner.run()
        except BaseException as error:
            # Finished cells survive an interruption or a crash of the code (not a full disk): the
            # same command resumes them.
            if runner.cells_finished and not isinstance(error, OSError):
                target.keep_staging = True
            raise
        target.commit({spec.model_id for spec in runner.specs})
    return summary
