"""Peak memory of a run against the size of its data: does it grow with the batch or the data?

Run: ``python -m pytest benchmarks/bench_memory.py --benchmark-only -s`` (needs the ``bench`` extra;
a few minutes on a 2-core CPU).

The same small grid (resnet10t, random init, frozen, one shortcut strength, 96-px frames, 2
folds) on 500 and on 2,000 synthetic images, each run in a fresh process; its peak RSS
(``ru_maxrss``) is read by a parent that runs nothing else. The target (issue 7) is a ratio below
1.3: memory bounded by the batch, not the data. The ratio is stored in ``extra_info`` and printed,
and the test fails when the target is missed: a missed target is a finding, not a flaky test.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SIZES = (500, 2000)
TARGET_RATIO = 1.3
GRID = [
    "--set", "models.backbones=[{name: resnet10t, weights: none}]",
    "--set", "data.synthetic.image_size=120",
    "--set", "data.synthetic.shortcut_strength=[1.0]",
    "--set", "preprocessing.input_size=96",
    "--set", "preprocessing.crop=[false]",
    "--set", "training.finetune=[false]",
    "--set", "selection.constraints={}",
    "--set", "report.html=false",
    "--set", "report.save_models=none",
]
# A parent process that runs the command and reports its child's peak RSS, so that neither pytest's
# own memory nor the other size's run is counted.
_PEAK = """
import resource, subprocess, sys
subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""


def peak_rss(n_images: int, out: Path) -> int:
    command = [sys.executable, "-m", "auditbench", "run", str(REPO / "protocols" / "quick.yaml"), *GRID,
               "--set", f"data.synthetic.n_images={n_images}", "--out", str(out)]
    result = subprocess.run([sys.executable, "-c", _PEAK, *command], capture_output=True, text=True, cwd=REPO, check=True)
    return int(result.stdout.split()[-1])


@pytest.mark.benchmark(group="peak memory vs data size")
def test_peak_rss_grows_with_the_batch_not_the_data(benchmark, tmp_path):
    peaks = {}

    def measure():
        for n in SIZES:
            peaks[n] = peak_rss(n, tmp_path / f"run{n}")
            images = json.loads((tmp_path / f"run{n}" / "summary.json").read_text())["n_images"]
            assert images >= n, images

    benchmark.pedantic(measure, rounds=1, iterations=1)
    ratio = peaks[SIZES[1]] / peaks[SIZES[0]]
    benchmark.extra_info.update({f"peak_rss_{n}_bytes": peak for n, peak in peaks.items()}, ratio=ratio)
    print(f"\npeak RSS: {SIZES[0]} images {peaks[SIZES[0]] / 2**30:.2f} GiB, {SIZES[1]} images "
          f"{peaks[SIZES[1]] / 2**30:.2f} GiB; ratio {ratio:.2f} (target < {TARGET_RATIO})")
    assert ratio < TARGET_RATIO, f"peak RSS ratio {ratio:.2f} at {SIZES[1]} vs {SIZES[0]} images"
