"""Stage 5: finish a run. Aggregate the cells' rows into models, validate the metrics against the
known answer, rank and select, and write every output through the one writer, in plan order."""
from __future__ import annotations

import platform
import shutil
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from auditbench.audit.aggregate import add_accuracy_drop, aggregate_models
from auditbench.audit.metrics import METRICS
from auditbench.outputs import PNG_PROTOCOL_KEY, PNG_RUN_KEY, build_manifest, png_with_text, write_json_atomic
from auditbench.pipeline.findings import external_findings, runner_up_comparison
from auditbench.pipeline.gallery import INTERNAL, merge_folds
from auditbench.pipeline.plan import RunPlan
from auditbench.pipeline.provenance import git_commit, package_versions
from auditbench.pipeline.probes import GROUP_COLUMNS, PROBE_COLUMNS, add_probe_columns, probe_notes
from auditbench.pipeline.validate import method_notes, validation_table
from auditbench.pipeline.sanity import SANITY_COLUMNS, sanity_column, sanity_notes
from auditbench.pipeline.records import SOURCE_KINDS, CellResult, GalleryCandidate, StageClock
from auditbench.protocol.schema import Protocol
from auditbench.report.overlays import overlay_png
from auditbench.report.tables import (
    GALLERY_FILE, IMAGES_FILE, MODELS_FILE, PROBES_FILE, RESULTS_FILE, SANITY_FILE, SKIPPED_FILE, SUMMARY_FILE,
    VALIDATION_FILE, primary_method_rows,
)
from auditbench.report.csv_cells import write_csv
from auditbench.selection.ranking import Constraint, SelectionRule, rank_models

GALLERY_COLUMNS = ["model_id", "sample_id", "fold", "split", "kind", "label", "prediction", "p_positive",
                   "lung_mass", "file", "source"]
SPLIT_NAME_CHARS = 60  # of an external split's (or a data source's) name in a gallery PNG's name
UNDEFINED_CAUSES = {"zero_map": "the maps were all zero (no positive evidence for the target class)",
                    "empty_lung_mask": "lung masks were empty",
                    "not_explained": "the method is registered as expensive and explains only the first "
                                     "explain.expensive_images images of each split"}


@dataclass
class RunState:
    """What the run knows when its cells are done: the plan, every cell's result in plan order,
    and the run-level facts the summary reports."""

    protocol: Protocol
    out_dir: Path
    provenance: dict[str, str]  # run_id, protocol_sha256
    plan: RunPlan
    cells: list[CellResult]
    clock: StageClock
    device: str
    started: datetime
    pass_warnings: Counter = field(default_factory=Counter)
    cells_reused: int = 0
    extra: dict = field(default_factory=dict)  # e.g. the feature store's counts
    before_manifest: Callable[[], None] | None = None  # removes working state (journal, store)
    # What the checkpoints in models/ are; `auditbench audit` says what it loaded instead.
    models_note: str = "Checkpoints are the models trained on fold 0; metrics are over all folds."


def finish_run(state: RunState) -> dict:
    protocol, out_dir, notes = state.protocol, state.out_dir, list(state.plan.notes)
    results_rows = [row for cell in state.cells for row in cell.results_rows]
    image_rows = [row for cell in state.cells for row in cell.image_rows]
    cam_geometry = {(cell.model_id, method): geometry for cell in state.cells
                    for method, geometry in cell.cam_geometry.items()}
    with state.clock.stage("select"):
        results = add_accuracy_drop(pd.DataFrame(results_rows))
        images = pd.DataFrame(image_rows)
        grid = pd.DataFrame([s.grid_row() for s in state.plan.specs])
        n_folds = max(len(inputs.folds) for inputs in state.plan.task_inputs)  # an audit has one
        by_method = aggregate_models(results, images, grid, n_folds, cam_geometry,
                                     protocol.metrics.bootstrap, protocol.seed)
        probes = _probes(state)
        if len(probes):  # before ranking: a selection constraint may name a probe metric
            by_method = add_probe_columns(by_method, probes)
            notes.extend(probe_notes(by_method, probes))
        rule = SelectionRule(
            primary=protocol.selection.primary,
            constraints=[Constraint(metric, c.min, c.max) for metric, c in protocol.selection.constraints.items()],
            pareto=tuple(protocol.selection.pareto),
        )
        # Each method's rows are ranked as if it were the lens; the run selects with the primary one.
        ranked = {method: rank_models(rows, rule) for method, rows in by_method.groupby("method", sort=False)}
        # In the primary method's rank order, each model's methods together (the primary first).
        order = {model_id: k for k, model_id in enumerate(ranked[protocol.explain.primary]["model_id"])}
        all_models = pd.concat(ranked.values()).loc[by_method.index]
        all_models = all_models.iloc[np.argsort([order[m] for m in all_models["model_id"]], kind="stable")]
        all_models = all_models.reset_index(drop=True)
        sanity = pd.DataFrame([row for cell in state.cells for row in cell.sanity_rows], columns=SANITY_COLUMNS)
        if len(sanity):
            all_models["explanation_sanity"] = sanity_column(all_models, sanity)
            notes.extend(sanity_notes(sanity))
        primary = protocol.explain.primary  # its rows: what selection, findings, the gallery and check read
        models = primary_method_rows(all_models, primary)
        selected = models.loc[models["selected"], "model_id"]
        selected_id = str(selected.iloc[0]) if len(selected) else None
        validation = validation_table(all_models, protocol, notes)
        notes.extend(external_findings(primary_method_rows(results, primary), models))
        notes.extend(runner_up_comparison(models, primary_method_rows(images, primary), protocol))
        notes.extend(method_notes(all_models, protocol))
    with state.clock.stage("report"):
        gallery_rows = _write_gallery(state)
        # Every CSV through the one writer: text cells neutralised, run id and protocol hash per row.
        write_csv(results, out_dir / RESULTS_FILE, state.provenance)
        write_csv(all_models, out_dir / MODELS_FILE, state.provenance)
        write_csv(images, out_dir / IMAGES_FILE, state.provenance)
        write_csv(pd.DataFrame(gallery_rows, columns=GALLERY_COLUMNS), out_dir / GALLERY_FILE, state.provenance)
        write_csv(pd.DataFrame([vars(s) for s in state.plan.skipped], columns=["path", "reason", "source"]),
                  out_dir / SKIPPED_FILE, state.provenance)
        if validation is not None:
            write_csv(validation, out_dir / VALIDATION_FILE, state.provenance)
        if len(sanity):
            write_csv(sanity, out_dir / SANITY_FILE, state.provenance)
        if len(probes):
            write_csv(probes, out_dir / PROBES_FILE, state.provenance)
        _prune_models(state, selected_id)
        summary = _summary(state, selected_id, rule, notes)
        write_json_atomic(out_dir / SUMMARY_FILE, summary)  # the report reads it
        if protocol.report.html:
            from auditbench.report.html import render_report

            render_report(out_dir)
    summary["stage_seconds"] = _seconds(state)
    if state.before_manifest is not None:
        state.before_manifest()
    summary["manifest"] = build_manifest(out_dir)  # every file but summary.json, with its sha256
    write_json_atomic(out_dir / SUMMARY_FILE, summary)
    return summary


def _probes(state: RunState) -> pd.DataFrame:
    """probes.csv: every group's rows in plan order, the group columns and data axes first."""
    rows = [row for cell in state.cells for row in cell.probe_rows]
    axes = list(dict.fromkeys(axis for spec in state.plan.specs for axis in spec.data_axes))
    return pd.DataFrame(rows, columns=[*GROUP_COLUMNS, *axes, *PROBE_COLUMNS])


def _seconds(state: RunState) -> dict[str, float]:
    """This process's stages; cells reused from the journal add the seconds they took when computed."""
    clock = StageClock()
    clock.merge(state.clock.seconds)
    for cell in state.cells:
        clock.merge(cell.stage_seconds)
    return {k: round(v, 2) for k, v in clock.seconds.items()}


def _write_gallery(state: RunState) -> list[dict]:
    """Each model's gallery over its folds (pipeline/gallery.py: best and worst internal lung_mass, the
    most confident internal tp / fp / fn / tn, the most confident errors on each external set, the
    most confident correct and wrong decision per split and data source), one overlay PNG per
    image; ties keep the earlier fold."""
    if not state.protocol.report.gallery_per_model:
        return []
    folder = state.out_dir / "gallery"
    folder.mkdir(exist_ok=True)
    rows, used = [], set()
    for model_id, chosen in merge_folds(state.cells).items():
        ranks = Counter()
        for candidate in chosen:
            ranks[candidate.split, candidate.kind] += 1
            file = _gallery_file(model_id, candidate, ranks[candidate.split, candidate.kind], used)
            png = overlay_png(candidate.image, candidate.heatmap, candidate.lung, candidate.artifact)
            (folder / file).write_bytes(png_with_text(png, {PNG_RUN_KEY: state.provenance["run_id"],
                                                            PNG_PROTOCOL_KEY: state.provenance["protocol_sha256"]}))
            rows.append({"model_id": model_id, "sample_id": candidate.sample_id, "fold": candidate.fold,
                         "split": candidate.split, "kind": candidate.kind, "label": candidate.label,
                         "prediction": candidate.prediction, "p_positive": candidate.p_positive,
                         "lung_mass": candidate.lung_mass, "file": f"gallery/{file}", "source": candidate.source})
    return rows


def _gallery_file(model_id: str, candidate: GalleryCandidate, rank: int, used: set[str]) -> str:
    """A PNG name that reads as what it shows, is safe on any file system and unique in the folder
    (also where case is not told apart): two split names can differ only in characters that
    :func:`_safe_name` replaces, so a clash gets a counter."""
    model, kind = _safe_name(model_id), _safe_name(candidate.kind)
    if candidate.kind in SOURCE_KINDS:  # one per split, source and kind
        stem = (f"{model}__{_safe_name(candidate.split)[:SPLIT_NAME_CHARS]}__"
                f"{_safe_name(candidate.source)[:SPLIT_NAME_CHARS]}__{kind}")
    elif candidate.split == INTERNAL:
        stem = f"{model}__{kind}"  # one image per internal kind; best / worst keep their earlier names
    else:  # a split name may be long: the file name must stay within the file system's limit
        stem = f"{model}__{_safe_name(candidate.split)[:SPLIT_NAME_CHARS]}__{kind}{rank}"
    name, count = f"{stem}.png", 1
    while name.lower() in used:
        count += 1
        name = f"{stem}-{count}.png"
    used.add(name.lower())
    return name


def _safe_name(text: str) -> str:
    """ASCII letters, digits and ``._-`` only (a non-ASCII letter may be stored in another Unicode form)."""
    return "".join(c if (c.isascii() and c.isalnum()) or c in "._-" else "_" for c in text)


def _prune_models(state: RunState, selected_id: str | None) -> None:
    """save_models: selected: the checkpoints this run saved of the models not selected go.
    Only those: nothing else in models/ is touched."""
    folder = state.out_dir / "models"
    if state.protocol.report.save_models != "selected" or not folder.exists():
        return
    for spec in state.plan.specs:
        path = folder / spec.model_id
        if spec.model_id != selected_id and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)


def _summary(state: RunState, selected_id: str | None, rule: SelectionRule, notes: list[str]) -> dict:
    protocol, plan = state.protocol, state.plan
    regional = [m for m in protocol.selection.constraints if METRICS.get(m).not_applicable_when_undefined]
    if regional:
        notes.append(
            f"A constraint on {', '.join(regional)} counts as met only where the masks prove its region out of "
            "the model's view (e.g. the crop removed every artifact); where the metric is undefined for any "
            "other reason (no mask, blank maps) the model is unverified and ranks below verified models."
        )
    if plan.skipped:
        duplicates = sum(str(item.reason).startswith("duplicate") for item in plan.skipped)
        notes.append(
            f"{len(plan.skipped)} entries in skipped.csv, each with its reason: {duplicates} repeated images kept "
            f"once, {len(plan.skipped) - duplicates} unreadable or blank images or unusable masks."
        )
    evaluated, undefined, warnings = Counter(), Counter(), Counter(state.pass_warnings)
    cam_layers = {}
    for cell, spec in zip(state.cells, (spec for group in plan.groups for spec, _ in group.cells)):
        evaluated.update(cell.heatmaps_evaluated)
        undefined.update(cell.undefined_heatmaps)
        warnings.update(cell.warnings)
        cam_layers.setdefault(spec.backbone, cell.cam_layer)
    for key, count in sorted(undefined.items(), key=lambda item: tuple(item[0].rsplit("|", 1))):
        split, cause = key.rsplit("|", 1)
        if count and cause == "not_explained":
            notes.append(
                f"{split}: {count} image evaluations (all models and folds) have no map beside the "
                f"{evaluated[split]} explained: {UNDEFINED_CAUSES[cause]}; their attention metrics are NaN and "
                "left out of the means (images.csv)."
            )
        elif count:
            notes.append(
                f"{split}: for {count} of {evaluated[split]} image evaluations (all models and folds) "
                f"{UNDEFINED_CAUSES[cause]}; their attention metrics are NaN and left out of the means (images.csv)."
            )
    notes.append(state.models_note)
    versions = package_versions()
    return {
        "name": protocol.name,
        "run_id": state.provenance["run_id"],
        "protocol_sha256": state.provenance["protocol_sha256"],
        "data_fingerprint": plan.data_fingerprint,
        "git_commit": git_commit(),
        "seed": protocol.seed,
        "selected_model": selected_id,
        "selection": {
            "primary": rule.primary,
            "constraints": {c.metric: {"min": c.min, "max": c.max} for c in rule.constraints},
            "pareto": list(rule.pareto),
        },
        "metric_directions": {name: "higher" if info.higher_is_better else "lower" for name, info in METRICS.items()},
        "explain_methods": list(protocol.explain.method),  # the primary first
        "n_models": len(plan.specs),
        "n_images": plan.n_images,
        "n_skipped": len(plan.skipped),
        "cells_computed": len(state.cells) - state.cells_reused,
        "cells_reused": state.cells_reused,
        **state.extra,
        "warnings": dict(warnings),
        "notes": notes,
        "cam_layers": cam_layers,
        "device": state.device,
        "package_versions": versions,
        "platform": platform.platform(),
        "stage_seconds": _seconds(state),
        "started": state.started.isoformat(timespec="seconds"),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "auditbench_version": versions.get("auditbench", "unknown"),
    }
