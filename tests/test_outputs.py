"""Output folders that never lose or mix data: staging and atomic replacement, the lock, the
never-delete rule, run ids and the manifest, CSV injection (auditbench.outputs, report.tables)."""
from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from auditbench import outputs
from auditbench.outputs import staging
from auditbench.cli import app
from auditbench.outputs import OutputError, png_text, prepare_output, seal, verify_run_folder
from auditbench.report.csv_cells import neutralise_cell, restore_cell, write_csv
from auditbench.report.tables import IMAGE_COLUMNS, read_tables
from conftest import NO_FAITHFULNESS, REPO
from test_check import RUN_ID, image_rows, write_run

runner = CliRunner()
INJECTION = "=cmd|' /C calc'!A0"


def tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) -> sha256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def error_line(result) -> str:
    """The one line of a bad input (exit code 2); a run's progress lines may come before it."""
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert result.output.rstrip().endswith(errors[0])
    return errors[0]


# ----- CSV injection ----------------------------------------------------------------------------


@pytest.mark.parametrize("text", [INJECTION, "+1+1", "-2+3", "@SUM(A1)", "\tlead", "\rlead", "'quoted"])
def test_text_that_a_spreadsheet_runs_is_quoted_and_restored(text):
    assert neutralise_cell(text) == "'" + text
    assert restore_cell(neutralise_cell(text)) == text


@pytest.mark.parametrize("value", ["covid", "a=b", "", -0.5, -3, 1e-9, True, None])
def test_other_cells_and_numbers_stay_as_they_are(value):
    assert neutralise_cell(value) is value


def test_write_csv_quotes_text_cells_only(tmp_path):
    frame = pd.DataFrame({
        "sample_id": [INJECTION, "-7", "plain"],
        "value": [-0.25, -1e-3, 2.0],
        "fold": [-1, 0, 1],
        "flag": [True, False, True],
        "=header": ["@x", "y", "+z"],
    })
    path = tmp_path / "t.csv"
    write_csv(frame, path, {"run_id": "r1", "protocol_sha256": "abc"})
    rows = list(csv.reader(path.open(newline="")))
    assert rows[0] == ["sample_id", "value", "fold", "flag", "'=header", "run_id", "protocol_sha256"]
    assert rows[1] == ["'" + INJECTION, "-0.25", "-1", "True", "'@x", "r1", "abc"]
    assert rows[2][:3] == ["'-7", "-0.001", "0"]  # a text "-7" is quoted, the numbers are not
    assert all(not cell.startswith(tuple("=+-@\t\r")) or cell.lstrip("-").replace(".", "").replace("e", "").isdigit()
               for row in rows for cell in row)


def test_tables_with_injected_text_read_back_exactly(tmp_path):
    images = pd.DataFrame(image_rows("crop", "out_of_view", False), columns=IMAGE_COLUMNS)
    images["sample_id"] = [INJECTION, "+1", "-5", "@me"]
    images["source"] = "\tsource"
    images["path"] = "'already quoted"
    write_run(tmp_path, images_update=lambda _: images)
    raw = (tmp_path / "images.csv").read_text()
    assert f"\"'{INJECTION}\"" in raw or f"'{INJECTION}" in raw
    tables = read_tables(tmp_path)
    assert list(tables.images["sample_id"].iloc[:4]) == [INJECTION, "+1", "-5", "@me"]
    assert set(tables.images["source"]) == {"\tsource"}
    assert "'already quoted" in set(tables.images["path"])
    assert tables.images["p_positive"].dtype == float and "run_id" not in tables.images
    assert tables.provenance["images.csv"] == {(RUN_ID, json.loads((tmp_path / "summary.json").read_text())["protocol_sha256"])}


# ----- staging, replacing, never deleting -------------------------------------------------------


def fake_run(folder: Path, run_id: str, files: dict[str, str] | None = None) -> None:
    """A run-shaped folder (write_run's two models) plus ``files``, sealed: all of it the run's."""
    write_run(folder, run_id=run_id)
    for name, text in (files or {}).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    seal(folder)


def write_new(target, run_id="20270101T000000Z-00000new"):
    """The new run: run-shaped, no validation.csv (a run on real data writes none)."""
    fake_run(target.staging, run_id)
    (target.staging / "validation.csv").unlink()
    seal(target.staging)
    assert target.staging.name.startswith(f".{target.out.name}.partial-")


def leftovers(parent: Path, keep: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name != keep)


def test_new_folder_appears_only_when_complete(tmp_path):
    out, said = tmp_path / "out", []
    with prepare_output(out, say=said.append) as target:
        write_new(target)
        assert not out.exists() and (tmp_path / ".out.lock").is_file()
        target.commit({"crop", "nocrop"})
    assert verify_run_folder(out) == [] and leftovers(tmp_path, "out") == [] and said == []


def test_empty_folder_is_used(tmp_path):
    (tmp_path / "out").mkdir()
    with prepare_output(tmp_path / "out") as target:
        write_new(target)
        target.commit(set())
    assert verify_run_folder(tmp_path / "out") == []


@pytest.mark.parametrize("swap", ["exchange", "two renames"])
def test_earlier_run_is_replaced_after_the_new_one_is_complete_and_only_its_files_go(tmp_path, monkeypatch, swap):
    if swap == "two renames":
        monkeypatch.setattr(staging, "exchange", lambda a, b: False)
    out = tmp_path / "out"
    fake_run(out, "20260101T000000Z-00000old", {"validation.csv": "metric\nlung_mass\n",
                                                 "models/crop/config.json": "{}"})
    # not the old run's: a user's notes and model folder, Finder litter, a table edited after the run
    (out / "notes.txt").write_text("mine")
    (out / "models" / "mine").mkdir()
    (out / "models" / "mine" / "weights.bin").write_bytes(b"\1\2")
    (out / "models" / ".DS_Store").write_bytes(b"\0")
    (out / "drafts" / "empty").mkdir(parents=True)
    (out / "gallery.csv").write_text("edited by hand\n")
    before = tree(out)
    said = []
    with prepare_output(out, say=said.append) as target:
        write_new(target)
        assert tree(out) == before  # the previous complete output, untouched while the run writes
        target.commit({"crop", "nocrop"})
    assert json.loads((out / "summary.json").read_text())["run_id"] == "20270101T000000Z-00000new"
    assert verify_run_folder(out) == []
    assert not (out / "validation.csv").exists()  # the old run's own stale table is gone
    assert not (out / "models" / "crop").exists()
    assert (out / "notes.txt").read_text() == "mine"  # what auditbench did not write survives
    assert (out / "models" / "mine" / "weights.bin").read_bytes() == b"\1\2"
    assert (out / "models" / ".DS_Store").is_file()
    assert (out / "drafts" / "empty").is_dir()  # even an empty folder is not auditbench's to delete
    previous = [p for p in tmp_path.iterdir() if p.name.startswith(".out.previous-")]
    assert len(previous) == 1 and (previous[0] / "gallery.csv").read_text() == "edited by hand\n"
    assert any("kept in" in line and "gallery.csv" in line for line in said)
    assert leftovers(tmp_path, "out") == [previous[0].name]


def test_foreign_folder_is_refused_untouched(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputError, match=r"exists and is not an auditbench run folder .* --overwrite"):
        with prepare_output(out):
            pytest.fail("must not get here")
    assert tree(out) == {"thesis.tex": hashlib.sha256(b"years of work").hexdigest()}
    assert leftovers(tmp_path, "mine") == []


def test_overwrite_deletes_nothing_it_did_not_write(tmp_path):
    out = tmp_path / "mine"
    (out / "models" / "theirs").mkdir(parents=True)
    (out / "thesis.tex").write_text("years of work")
    (out / "results.csv").write_text("their own results\n")
    (out / "models" / "theirs" / "w.bin").write_bytes(b"\7")
    said = []
    with prepare_output(out, overwrite=True, say=said.append) as target:
        write_new(target)
        target.commit({"crop", "nocrop"})
    assert (out / "thesis.tex").read_text() == "years of work"
    assert (out / "models" / "theirs" / "w.bin").read_bytes() == b"\7"
    assert verify_run_folder(out) == []  # their results.csv did not mix into the run
    (previous,) = [p for p in tmp_path.iterdir() if p.name.startswith(".mine.previous-")]
    assert (previous / "results.csv").read_text() == "their own results\n"
    assert any("results.csv" in line for line in said)


def test_failure_mid_write_leaves_the_previous_output_untouched(tmp_path):
    out = tmp_path / "out"
    fake_run(out, "20260101T000000Z-00000old")
    before = tree(out)
    with pytest.raises(OSError, match="No space left"):
        with prepare_output(out) as target:
            (target.staging / "results.csv").write_text("half a tab")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target.staging / "images.csv"))
    assert tree(out) == before and leftovers(tmp_path, "out") == []


def test_a_failed_final_move_keeps_the_complete_output(tmp_path, monkeypatch):
    out = tmp_path / "out"
    fake_run(out, "20260101T000000Z-00000old")
    before = tree(out)

    def broken(a, b):
        raise OSError(errno.EIO, "I/O error", str(b))

    monkeypatch.setattr(staging, "exchange", broken)
    with pytest.raises(OutputError, match="could not be moved into .* its complete output is in"):
        with prepare_output(out) as target:
            write_new(target)
            target.commit(set())
    assert tree(out) == before
    assert verify_run_folder(target.staging) == []  # nothing lost


@pytest.mark.parametrize("case, message", [
    ("missing parent", "the parent folder .*nowhere of --out does not exist"),
    ("parent is a file", "the parent .*file.txt of --out is not a folder"),
    ("out is a file", "exists and is not a folder"),
    ("unwritable parent", "cannot write in .*: permission denied"),
    ("working folder", "is the working folder"),
])
def test_unusable_out_is_one_clear_error(tmp_path, monkeypatch, case, message):
    (tmp_path / "file.txt").write_text("x")
    out = {"missing parent": tmp_path / "nowhere" / "out", "parent is a file": tmp_path / "file.txt" / "out",
           "out is a file": tmp_path / "file.txt", "unwritable parent": tmp_path / "out",
           "working folder": tmp_path}[case]
    monkeypatch.chdir(tmp_path)
    if case == "unwritable parent":  # root ignores permission bits: ask the check itself
        monkeypatch.setattr(staging.os, "access", lambda path, mode: False)
    with pytest.raises(OutputError, match=message):
        with prepare_output(out):
            pytest.fail("must not get here")


def test_default_location_creates_its_parent(tmp_path):
    with prepare_output(tmp_path / "reports" / "quick", make_parents=True) as target:
        write_new(target)
        target.commit(set())
    assert verify_run_folder(tmp_path / "reports" / "quick") == []


# ----- the lock ---------------------------------------------------------------------------------


def test_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path):
    out = tmp_path / "out"
    with prepare_output(out, run_id="20270101T000000Z-0000first") as first:
        with pytest.raises(OutputError, match=r"another auditbench process \(run 20270101T000000Z-0000first, "
                                              rf"pid {os.getpid()} .*\) is writing {out}"):
            with prepare_output(out):
                pytest.fail("must not get here")
        assert first.staging.is_dir()  # the refused second writer removed nothing of the first's
        write_new(first)
        first.commit(set())
    assert verify_run_folder(out) == [] and not (tmp_path / ".out.lock").exists()


def test_stale_lock_is_reported_and_taken_over(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(gone.stdout)
    (tmp_path / ".out.lock").write_text(json.dumps({"pid": pid, "host": "h", "run_id": "r-dead", "started": "t"}))
    said = []
    with prepare_output(tmp_path / "out", say=said.append) as target:
        write_new(target)
        target.commit(set())
    assert any("stale lock" in line and f"pid {pid}" in line and "r-dead" in line for line in said)
    assert not (tmp_path / ".out.lock").exists()


def test_unfinished_output_of_a_killed_run_is_removed_and_foreign_lookalikes_are_not(tmp_path):
    ours = tmp_path / ".out.partial-20260101T000000Z-dead0000"
    ours.mkdir()
    (ours / outputs.PARTIAL_MARKER).write_text("{}")
    (ours / "results.csv").write_text("half")
    theirs = tmp_path / ".out.partial-someone"
    theirs.mkdir()
    said = []
    with prepare_output(tmp_path / "out", say=said.append) as target:
        write_new(target)
        target.commit(set())
    assert not ours.exists() and theirs.is_dir()
    assert any(f"removed {ours}" in line for line in said) and any(f"left {theirs} alone" in line for line in said)


# ----- the command line on real (tiny) runs -----------------------------------------------------


def manifest_data(root: Path) -> Path:
    """40 small images with lung masks, listed in a manifest whose cells a spreadsheet would run."""
    rng = np.random.default_rng(0)
    (root / "imgs").mkdir(parents=True)
    (root / "masks").mkdir()
    lung = np.zeros((64, 64), np.uint8)
    lung[16:48, 8:56] = 255
    lines = ["path,label,patient_id,lung_mask,source"]
    for i in range(40):
        Image.fromarray((rng.random((64, 64)) * 255).astype(np.uint8)).save(root / "imgs" / f"{i}.png")
        Image.fromarray(lung).save(root / "masks" / f"{i}.png")
        label = "covid" if i % 2 else "normal"
        lines.append(f"imgs/{i}.png,{label},-{i},masks/{i}.png,\"{INJECTION}\"")
    lines.append("imgs/missing.png,covid,p99,,@SUM(1+1)")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root / "manifest.csv"


def run_args(manifest: Path, out: Path) -> list[str]:
    return [
        "run", str(REPO / "protocols" / "paper.yaml"), "--out", str(out),
        "--set", f"data.root={manifest.parent}",
        "--set", f"data.sources=[{{dataset: manifest, root: {manifest.name}}}]",
        "--set", "data.masks.lung=dataset", "--set", "data.masks.artifacts=none",
        "--set", "task=[covid_vs_non_covid]",
        "--set", "models.backbones=[{name: resnet10t, weights: none}]", "--set", "models.hidden=[256]",
        "--set", "training.finetune=[false]", "--set", "training.augment=[false]", "--set", "training.folds=2",
        "--set", "preprocessing.input_size=64", "--set", "preprocessing.crop=[false]",
        "--set", "selection.constraints={}", *NO_FAITHFULNESS,
    ]


@pytest.fixture(scope="module")
def manifest_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("manifest_run")
    manifest = manifest_data(root / "data")
    result = runner.invoke(app, run_args(manifest, root / "out"))
    assert result.exit_code == 0, result.output
    return manifest, root / "out"


def test_every_csv_cell_from_data_is_neutralised_and_reads_back(manifest_run):
    _, out = manifest_run
    images = list(csv.DictReader((out / "images.csv").open(newline="")))
    assert {row["source"] for row in images} == {"'" + INJECTION}
    assert all(row["sample_id"].startswith("'" + INJECTION) for row in images)
    assert all(not row["p_positive"].startswith("'") for row in images)
    (skipped,) = list(csv.DictReader((out / "skipped.csv").open(newline="")))
    assert skipped["source"] == "'@SUM(1+1)"
    tables = read_tables(out)
    assert set(tables.images["source"]) == {INJECTION}
    assert list(tables.skipped["source"]) == ["@SUM(1+1)"]
    assert runner.invoke(app, ["check", str(out), "--min-accuracy", "0"]).exit_code == 0


def test_every_output_carries_the_run_id_and_protocol_hash(manifest_run):
    _, out = manifest_run
    summary = json.loads((out / "summary.json").read_text())
    run_id, digest = summary["run_id"], summary["protocol_sha256"]
    assert verify_run_folder(out) == []
    for name in ["results.csv", "models.csv", "images.csv", "skipped.csv", "gallery.csv"]:
        table = pd.read_csv(out / name)
        assert list(table.columns[-2:]) == ["run_id", "protocol_sha256"], name
        assert set(table["run_id"]) <= {run_id} and set(table["protocol_sha256"]) <= {digest}, name
    header = (out / "protocol.resolved.yaml").read_text().splitlines()[0]
    assert run_id in header and digest in header
    (config,) = (out / "models").glob("*/config.json")
    assert {json.loads(config.read_text())[k] for k in ("run_id", "protocol_sha256")} == {run_id, digest}
    for png in (out / "gallery").glob("*.png"):
        assert png_text(png)[outputs.PNG_RUN_KEY] == run_id
    assert run_id in (out / "report.html").read_text()
    listed = set(summary["manifest"]["files"])
    assert listed == {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} - {"summary.json"}


def test_report_rerender_keeps_the_manifest_consistent(manifest_run, tmp_path):
    _, original = manifest_run
    out = tmp_path / "copy"
    shutil.copytree(original, out)
    (out / "report.html").write_text("stale")
    assert error_line(runner.invoke(app, ["check", str(out), "--min-accuracy", "0"])).endswith(
        "(changed after the run wrote it)")
    result = runner.invoke(app, ["report", str(out)])
    assert result.exit_code == 0, result.output
    assert "warning" not in result.output
    manifest = json.loads((out / "summary.json").read_text())["manifest"]["files"]
    assert manifest["report.html"]["sha256"] == hashlib.sha256((out / "report.html").read_bytes()).hexdigest()
    assert runner.invoke(app, ["check", str(out), "--min-accuracy", "0"]).exit_code == 0
    assert not (tmp_path / ".copy.lock").exists()


def test_rerun_replaces_an_earlier_run_and_keeps_what_it_did_not_write(manifest_run, tmp_path):
    manifest, original = manifest_run
    out = tmp_path / "out"
    shutil.copytree(original, out)
    old_id = json.loads((out / "summary.json").read_text())["run_id"]
    (out / "validation.csv").write_text("metric\nlung_mass\n")  # a table the earlier run wrote
    seal(out)
    (out / "notes.txt").write_text("mine")
    (out / "models" / "mine").mkdir()
    (out / "models" / "mine" / "weights.bin").write_bytes(b"\1")
    (out / "models" / ".DS_Store").write_bytes(b"\0")  # crashed the run's model pruning before
    result = runner.invoke(app, run_args(manifest, out))
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["run_id"] != old_id
    assert not (out / "validation.csv").exists()
    assert (out / "notes.txt").read_text() == "mine" and (out / "models" / "mine" / "weights.bin").is_file()
    assert (out / "models" / ".DS_Store").is_file()
    assert leftovers(tmp_path, "out") == []
    assert runner.invoke(app, ["check", str(out), "--min-accuracy", "0"]).exit_code == 0


def test_disk_full_mid_write_exits_2_and_leaves_the_previous_run(manifest_run, tmp_path, monkeypatch):
    """The runner's writes fail half-way (no training here: the runner is replaced by one that
    writes a table and hits a full disk); the earlier run in --out stays byte for byte."""
    manifest, original = manifest_run
    out = tmp_path / "out"
    shutil.copytree(original, out)
    before = tree(out)
    import auditbench.pipeline.runner as runner_module
    from auditbench.report.csv_cells import write_csv

    def full_disk(self):
        write_csv(pd.DataFrame({"a": [1]}), self.out_dir / "results.csv", self.provenance)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.out_dir / "images.csv"))

    monkeypatch.setattr(runner_module.Runner, "run", full_disk)
    line = error_line(runner.invoke(app, run_args(manifest, out)))
    assert "No space left on device" in line and f"{out} was left as it was" in line
    assert tree(out) == before and leftovers(tmp_path, "out") == []


def test_cli_refuses_foreign_out_and_missing_parent(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "a.txt").write_text("x")
    quick = str(REPO / "protocols" / "quick.yaml")
    line = error_line(runner.invoke(app, ["run", quick, "--out", str(foreign)]))
    assert f"--out {foreign} exists and is not an auditbench run folder" in line
    line = error_line(runner.invoke(app, ["run", quick, "--out", str(tmp_path / "nowhere" / "out")]))
    assert "nowhere of --out does not exist" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign"]


def test_cli_refuses_a_second_process_on_the_same_out(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from auditbench.outputs import locked
            with locked({str(tmp_path / 'out')!r}, print, run_id="20270101T000000Z-0000held"):
                print("locked", flush=True)
                sys.stdin.read()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        line = error_line(runner.invoke(app, ["run", str(REPO / "protocols" / "quick.yaml"), "--out", str(tmp_path / "out")]))
        assert f"run 20270101T000000Z-0000held, pid {holder.pid}" in line and "is writing" in line
        line = error_line(runner.invoke(app, ["report", str(tmp_path)]))  # any folder: its lock is beside it
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert not (tmp_path / ".out.lock").exists()


def test_masks_predict_neutralises_data_cells_in_masks_csv(tmp_path):
    """masks.csv goes through the one CSV writer: a cell from data that a spreadsheet would run
    (here a label) is written with a leading quote; the other cells are written as they are."""
    import csv

    import numpy as np
    from PIL import Image

    from auditbench.cli import app

    data = tmp_path / "data"
    data.mkdir()
    ramp = (np.add.outer(np.arange(64), np.arange(64)) * 2).astype(np.uint8)
    for name, image in (("a.png", ramp), ("b.png", ramp[::-1].copy())):  # different pixels
        Image.fromarray(image).save(data / name)
    (data / "manifest.csv").write_text(f'path,label\na.png,"{INJECTION.replace(chr(34), chr(34) * 2)}"\nb.png,normal\n',
                                       encoding="utf-8")
    out = tmp_path / "masks"
    result = runner.invoke(app, ["masks", "predict", str(data), "--dataset", "manifest", "--out", str(out)])
    assert result.exit_code == 0, result.output
    with open(out / "masks.csv", newline="", encoding="utf-8") as handle:
        rows = {Path(row["path"]).name: row for row in csv.DictReader(handle)}
    assert rows["a.png"]["label"] == "'" + INJECTION
    assert rows["b.png"]["label"] == "normal"
