"""The `auditbench` command line: a thin layer over the pipeline stages."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

app = typer.Typer(
    help="Explainability audits of chest X-ray classifiers: accuracy and Grad-CAM attention on lungs vs artifacts.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Inspect data sets.", no_args_is_help=True)
masks_app = typer.Typer(help="Lung masks for images that come without them.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(masks_app, name="masks")

console = Console()
err_console = Console(stderr=True)

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def _fail(message: str) -> typer.Exit:
    """Print ``error: message`` on stderr, unwrapped and verbatim (square brackets in paths and YAML
    errors are text, not rich markup), and return the exit for bad input (2)."""
    err_console.print(f"[bold red]error:[/] {escape(str(message))}", highlight=False, markup=True, soft_wrap=True)
    return typer.Exit(EXIT_BAD_INPUT)


def _warn(message: str) -> None:
    err_console.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False, markup=True, soft_wrap=True)


def _say(text: str) -> None:
    """Print text verbatim on stdout: no markup, no highlighting, no wrapping."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def _load(protocol: Path, overrides: list[str], weights: str = "error"):
    """The validated protocol, or exit 2 with one line: invalid fields, unknown names, a grid that
    cannot be expanded, and (``weights="error"``) backbone weights that cannot be had now;
    ``weights="warn"`` only prints those."""
    from auditbench.data.datasets import data_axes
    from auditbench.data.records import DataError
    from auditbench.protocol.grid import expand_grid
    from auditbench.protocol.loader import ProtocolError, load_protocol
    from auditbench.pipeline.names import backbone_weights_errors, check_registered_names
    from auditbench.registry import UnknownNameError

    try:
        resolved = load_protocol(protocol, overrides)
        check_registered_names(resolved)
        expand_grid(resolved, data_axes(resolved))
    except (ProtocolError, UnknownNameError, ValueError, DataError) as error:
        raise _fail(str(error) if isinstance(error, ProtocolError) else f"{protocol}: {error}") from None
    for error in backbone_weights_errors(resolved):
        if weights == "error":
            raise _fail(f"{protocol}: {error}")
        _warn(f"{protocol}: {error} (`auditbench run` would stop here)")
    return resolved


SetOption = typer.Option([], "--set", help="Override a protocol field: dotted.key=value (value parsed as YAML). Repeatable.")
OverwriteOption = typer.Option(
    False, "--overwrite",
    help="Write into an existing --out that is not an auditbench run (files auditbench did not write are kept).",
)


@app.command()
def validate(
    protocol: Path = typer.Argument(..., help="Protocol YAML file."),
    overrides: list[str] = SetOption,
) -> None:
    """Check a protocol without running it; print the model grid it expands to."""
    from auditbench.data.datasets import data_axes
    from auditbench.protocol.grid import expand_grid

    resolved = _load(protocol, overrides, weights="warn")
    try:
        specs = expand_grid(resolved, data_axes(resolved))
    except ValueError as error:
        raise _fail(f"{protocol}: {error}") from None
    console.print(f"[green]valid[/]: {escape(str(protocol))} -> {len(specs)} models x {resolved.training.folds} folds", highlight=False)
    for spec in specs:
        _say(f"  {spec.model_id}")


@app.command()
def run(
    protocol: Path = typer.Argument(..., help="Protocol YAML file, e.g. protocols/quick.yaml."),
    overrides: list[str] = SetOption,
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default reports/<protocol name>/)."),
    overwrite: bool = OverwriteOption,
    cache: Optional[Path] = typer.Option(
        None, "--cache", help="Folder of backbone passes (features, maps, occluded copies) shared by runs: a run on "
        "the same images and backbone reads them instead of running the backbone.",
    ),
    restart: bool = typer.Option(
        False, "--restart", help="Do not resume an interrupted run of this protocol on --out; start over.",
    ),
    executor: str = typer.Option("local", "--executor", help="Where cells run: local, or ray (pip install auditbench[ray])."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray cluster to join (default: a local Ray)."),
) -> None:
    """Train the grid, explain, audit, rank and write CSV, JSON and HTML reports.

    The run writes beside --out and moves its folder into place when complete; an earlier run in
    --out is replaced only then. A second run on the same --out is refused while one is running.
    A run that stopped before its end (Ctrl-C, a crash, a killed process) resumes when the same
    command is run again: its finished model x fold cells are reused."""
    from auditbench.data.records import DataError
    from auditbench.models.backbones import WeightsFileError, WeightsUnavailableError
    from auditbench.outputs import OutputError
    from auditbench.registry import UnknownNameError
    from auditbench.pipeline.executors import ExecutorError
    from auditbench.run import run_protocol

    resolved = _load(protocol, overrides)
    out_dir = out or Path("reports") / resolved.name
    try:
        summary = run_protocol(resolved, out_dir, Path.cwd(), err_console, overwrite=overwrite, make_parents=out is None,
                               cache_dir=cache, executor=executor, ray_address=ray_address, restart=restart)
    except (DataError, WeightsUnavailableError, WeightsFileError, UnknownNameError, OutputError, ExecutorError) as error:
        raise _fail(str(error)) from None
    except OSError as error:  # a full disk, a folder gone: nothing of --out was changed
        raise _fail(f"cannot write the run's outputs: {error}; {out_dir} was left as it was") from None
    selected = escape(summary["selected_model"]) if summary["selected_model"] else \
        "[bold red]none: no model meets the selection constraints[/]"
    console.print(f"selected model: {selected}", highlight=False)
    for note in summary["notes"]:
        if note.startswith("Test set"):  # external findings: the ones a reader must not miss
            _say(note)
    _say(f"report: {out_dir / 'report.html'}")
    console.print(f"time per stage (s): {summary['stage_seconds']}", highlight=False)


@app.command()
def audit(
    model: str = typer.Argument(
        ..., help="A checkpoint folder (models/<id>/ of a run: weights.safetensors + config.json), or, with "
        "--weights, the timm model name of the classifier's backbone."),
    data: Path = typer.Option(
        ..., "--data", help="Protocol YAML whose data and task sections give the images, each a test image "
        "(data.external: external sets); its explain, metrics, selection and report sections apply. Its models, "
        "preprocessing and training sections are replaced by the model's own."),
    overrides: list[str] = SetOption,
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default reports/audit-<model id>/)."),
    overwrite: bool = OverwriteOption,
    name: Optional[str] = typer.Option(
        None, "--name", help="Model id in the tables (default: the checkpoint folder's name or the weights file's stem)."),
    weights: Optional[Path] = typer.Option(
        None, "--weights", help="State dict of the whole classifier (keys backbone.body.*, head.fc1.*, head.fc2.*): "
        ".safetensors, or .pth/.pt read with torch.load(weights_only=True). MODEL is then its timm backbone."),
    hidden: Optional[int] = typer.Option(None, "--hidden", help="With --weights: the hidden size of the head."),
    classes: Optional[str] = typer.Option(
        None, "--classes", help="With --weights: the class names in output order, NEGATIVE,POSITIVE (default: the task's)."),
    positive: Optional[str] = typer.Option(
        None, "--positive", help="With --weights: the positive class (default: the second of --classes)."),
    input_size: Optional[int] = typer.Option(
        None, "--input-size", help="With --weights: side of the model's square input (default: the backbone's)."),
    crop: Optional[bool] = typer.Option(
        None, "--crop/--no-crop", help="With --weights: the model sees the centre crop of each image (default: no crop)."),
    crop_ratio: Optional[float] = typer.Option(
        None, "--crop-ratio", help="With --weights and --crop: the fraction cut from each side (default: the study's 38/300)."),
) -> None:
    """Audit a trained classifier without training: the metrics, occlusion checks, external sets
    and report of `run`, on every image of --data. Gate the folder with `auditbench check`."""
    from auditbench.data.records import DataError
    from auditbench.data.transforms import STUDY_CROP_RATIO
    from auditbench.outputs import OutputError
    from auditbench.pipeline.audit_model import AuditError, StateDictHead, load_model, prepare_audit, run_audit
    from auditbench.protocol.loader import ProtocolError
    from auditbench.registry import UnknownNameError

    described = {"--hidden": hidden, "--classes": classes, "--positive": positive, "--input-size": input_size,
                 "--crop": crop, "--crop-ratio": crop_ratio}
    given = [option for option, value in described.items() if value is not None]
    head = None
    if weights is None and given:
        raise _fail(f"{', '.join(given)} describe a bare state dict and need --weights FILE; a checkpoint folder "
                    "carries its own head and preprocessing")
    if weights is not None:
        if hidden is None or hidden < 1:
            raise _fail("--weights needs --hidden N (N >= 1): the hidden size of the model's head")
        if input_size is not None and input_size < 32:
            raise _fail(f"--input-size {input_size}: must be at least 32")
        if crop_ratio is not None and not 0 <= crop_ratio < 0.5:
            raise _fail(f"--crop-ratio {crop_ratio}: must lie in [0, 0.5)")
        names = [part.strip() for part in classes.split(",")] if classes is not None else None
        head = StateDictHead(hidden, names, positive, input_size, bool(crop),
                             STUDY_CROP_RATIO if crop_ratio is None else crop_ratio)
    say = lambda text: err_console.print(text, highlight=False, markup=False, soft_wrap=True)  # noqa: E731
    try:
        audited = load_model(model, weights, head, name)
        out_dir = out or Path("reports") / f"audit-{audited.model_id}"
        plan = prepare_audit(audited, data, overrides, Path.cwd())
        summary = run_audit(plan, out_dir, say, overwrite=overwrite, make_parents=out is None)
    except (AuditError, ProtocolError, UnknownNameError, DataError, OutputError) as error:
        raise _fail(str(error)) from None
    except OSError as error:  # a full disk, a folder gone: nothing of --out was changed
        raise _fail(f"cannot write the audit's outputs: {error}; {out_dir} was left as it was") from None
    verdict = "meets the protocol's selection constraints" if summary["selected_model"] else \
        "does not meet the protocol's selection constraints (models.csv: violations, unverified)"
    _say(f"audited model {audited.model_id}: {verdict}")
    for note in summary["notes"]:
        if note.startswith("Test set"):
            _say(note)
    _say(f"report: {out_dir / 'report.html'}")


@app.command()
def report(out_dir: Path = typer.Argument(..., help="A run's output folder.")) -> None:
    """Re-render report.html from the result tables alone (no re-run)."""
    from auditbench.outputs import OutputError
    from auditbench.report.rerender import rerender_report
    from auditbench.report.tables import ResultsError

    try:
        path = rerender_report(out_dir, lambda text: err_console.print(text, highlight=False, markup=False, soft_wrap=True))
    except (ResultsError, OutputError) as error:
        raise _fail(str(error)) from None
    console.print(f"report: {path}")


@app.command()
def check(
    out_dir: Path = typer.Argument(..., help="A run's output folder."),
    min_lung_mass: Optional[float] = typer.Option(None, help="Fail when lung_mass is below this."),
    max_border_mass: Optional[float] = typer.Option(None, help="Fail when border_mass is above this."),
    max_artifact_mass: Optional[float] = typer.Option(None, help="Fail when artifact_mass is above this."),
    min_accuracy: Optional[float] = typer.Option(None, help="Fail when accuracy is below this."),
    minimum: list[str] = typer.Option([], "--min", help="METRIC=F: fail when METRIC is below F. Repeatable."),
    maximum: list[str] = typer.Option([], "--max", help="METRIC=F: fail when METRIC is above F. Repeatable."),
    all_models: bool = typer.Option(False, "--all-models", help="Check every model, not only the selected one."),
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="An earlier run's folder: fail when a metric regressed from it."),
    regression: list[str] = typer.Option(
        [], "--regression-metric", help="Metric held to the baseline (repeatable; default: the threshold metrics, else accuracy and lung_mass)."
    ),
    tolerance: Optional[float] = typer.Option(
        None, "--tolerance", help="How much worse than the baseline a metric may get (default 0.05)."
    ),
    policy: Optional[Path] = typer.Option(
        None, "--policy", help="YAML policy: thresholds, models, regression tolerances (docs/ci.md)."
    ),
    junit: Optional[Path] = typer.Option(None, "--junit", help="Also write the verdict as JUnit XML to this file."),
) -> None:
    """CI gate: exit 0 when every threshold holds (and nothing regressed from --baseline), 1 when one
    fails, 2 on bad input (including a folder that is not one complete run: manifest mismatch,
    missing or extra result file)."""
    from auditbench.report.check import (
        DEFAULT_TOLERANCE, CheckInputError, Threshold, check_tolerance, load_policy_file, parse_threshold_option,
        run_check, write_junit,
    )

    def bad_input(message: str) -> typer.Exit:
        if junit is not None:
            try:
                write_junit(junit, None, out_dir, error=message)
            except CheckInputError as error:
                message = f"{message}; and {error}"
        return _fail(message)

    try:
        thresholds = [
            Threshold(metric, bound, value, source=f"--{option} {value}")
            for metric, bound, value, option in (
                ("lung_mass", "min", min_lung_mass, "min-lung-mass"),
                ("border_mass", "max", max_border_mass, "max-border-mass"),
                ("artifact_mass", "max", max_artifact_mass, "max-artifact-mass"),
                ("accuracy", "min", min_accuracy, "min-accuracy"),
            )
            if value is not None
        ]
        thresholds += [parse_threshold_option(text, "min") for text in minimum]
        thresholds += [parse_threshold_option(text, "max") for text in maximum]
        if tolerance is not None:
            check_tolerance(tolerance)
            if baseline is None:
                raise CheckInputError("--tolerance needs --baseline DIR to compare with")
        rules = load_policy_file(policy) if policy is not None else None
        if not thresholds and baseline is None and rules is None:
            raise CheckInputError(
                "no thresholds given; e.g. --min-lung-mass 0.5, --max artifact_occlusion_effect=0.1, --policy FILE or --baseline DIR"
            )
        result = run_check(out_dir, thresholds, all_models, baseline, regression,
                           DEFAULT_TOLERANCE if tolerance is None else tolerance, policy=rules)
        if junit is not None:
            write_junit(junit, result, out_dir)
    except CheckInputError as error:
        raise bad_input(str(error)) from None
    for outcome in result.outcomes:
        if outcome.status == "skipped":
            label = "n/a" if "not applicable" in outcome.message else "skip"
            console.print(f"[yellow]{label}[/] {escape(outcome.model_id)}: {escape(outcome.rule)}: {escape(outcome.message)}",
                          highlight=False, soft_wrap=True)
    for failure in result.failures:
        console.print(f"[red]FAIL[/] {escape(str(failure))}", highlight=False, soft_wrap=True)
    if result.passed:
        against = f", no regression from {baseline}" if baseline is not None else ""
        console.print(f"[green]PASS[/] {len(result.checked_models)} model(s), {result.n_rules} rule(s){against}; "
                      f"run {result.run_id}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_OK)
    raise typer.Exit(EXIT_FAILED)


@data_app.command("check")
def data_check(
    root: Path = typer.Argument(..., help="Data set root in its public layout."),
    dataset: str = typer.Option(..., "--dataset", help="Data set adapter: ieee8023, kermany, manifest."),
    max_side: int = typer.Option(512, help="Images are read downsized to this longest side."),
) -> None:
    """Print what a data set holds (labels, sources, views, masks, unreadable files); trains nothing."""
    from auditbench.data.inspect import format_report, inspect_dataset
    from auditbench.data.records import DataError
    from auditbench.registry import UnknownNameError

    try:
        result = inspect_dataset(root, dataset, None, max_side=max_side)
    except (DataError, UnknownNameError) as error:
        raise _fail(str(error)) from None
    _say(format_report(result))


@masks_app.command("train")
def masks_train(
    pairs: Path = typer.Option(..., "--pairs", help="Folder with cxr/*.png and masks/*.png pairs."),
    out: Path = typer.Option(..., "--out", help="Weights file to write (.safetensors)."),
    epochs: Optional[int] = typer.Option(None, help="Training epochs (default: the shipped model's)."),
    seed: int = typer.Option(0, help="Random seed."),
) -> None:
    """Retrain the lung segmentation model on image/mask pairs."""
    from auditbench.masks.lungseg import train_lung_segmenter

    if not (pairs / "cxr").is_dir() or not (pairs / "masks").is_dir():
        raise _fail(f"{pairs}: expected folders cxr/ and masks/ with matching PNG names")
    kwargs = {"seed": seed}
    if epochs is not None:
        kwargs["epochs"] = epochs
    report_ = train_lung_segmenter(pairs, out, **kwargs)
    console.print(f"wrote {out}; validation Dice {report_.dice_val:.3f}")


@masks_app.command("predict")
def masks_predict(
    root: Path = typer.Argument(..., help="Data set root in its public layout."),
    dataset: str = typer.Option(..., "--dataset", help="Data set adapter: ieee8023, kermany, manifest."),
    out: Path = typer.Option(..., "--out", help="Folder for the predicted masks (PNG, 0/255) and masks.csv."),
    weights: Optional[Path] = typer.Option(None, help="Lung model weights (default: the shipped model)."),
    max_side: int = typer.Option(512, help="Images are read downsized to this longest side."),
) -> None:
    """Predict lung masks for every image of a data set (images that have masks get one too)."""
    import pandas as pd
    from PIL import Image

    from auditbench.data.datasets import DATASETS
    from auditbench.data.records import DataError
    from auditbench.masks.lungseg import LungSegmenter
    from auditbench.registry import UnknownNameError
    from auditbench.report.csv_cells import write_csv

    try:
        loaded = DATASETS.get(dataset).load(root, {}, max_side)
    except (DataError, UnknownNameError) as error:
        raise _fail(str(error)) from None
    segmenter = LungSegmenter.load(weights)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for sample, mask in zip(loaded.samples, segmenter.predict([s.image for s in loaded.samples])):
        file = "".join(c if c.isalnum() or c in "._-" else "_" for c in sample.sample_id) + ".png"
        Image.fromarray(mask.astype("uint8") * 255).save(out / file)
        rows.append({"sample_id": sample.sample_id, "path": sample.path, "lung_mask": file, "label": sample.label})
    write_csv(pd.DataFrame(rows), out / "masks.csv")  # paths and ids come from data: neutralised
    _say(f"wrote {len(rows)} masks to {out} ({len(loaded.skipped)} unreadable files skipped)")
