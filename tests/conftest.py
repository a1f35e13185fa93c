import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Tests never download: Hugging Face hub loaders (timm's ImageNet weights) stay offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Deterministic, and fair to a 2-core CI machine.
torch.set_num_threads(min(2, torch.get_num_threads()))


NO_FAITHFULNESS = ["--set", "metrics.faithfulness.images=0"]
"""For runs that test something else: the faithfulness curves cost more than the rest of a tiny run
(they have their own tests, tests/test_faithfulness_run.py)."""
TINY_RUN = [
    "--set", "models.backbones=[{name: resnet10t, weights: none}]",
    "--set", "data.synthetic.n_images=48",
    "--set", "data.synthetic.image_size=64",
    "--set", "preprocessing.input_size=64",
    "--set", "preprocessing.crop=[false]",
    "--set", "selection.constraints={}",
    *NO_FAITHFULNESS,
]
"""quick.yaml shrunk to a run of seconds: the base every CLI test run extends (a later --set of the same
key wins)."""


def run_quick(out: Path, *settings: str) -> Path:
    """``auditbench run protocols/quick.yaml *settings --out out`` through typer's runner; ``out`` once it succeeded."""
    from typer.testing import CliRunner

    from auditbench.cli import app

    result = CliRunner().invoke(app, ["run", str(REPO / "protocols" / "quick.yaml"), *settings, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real chest X-ray samples); tests that need it skip, saying why, without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real chest X-ray samples not found at {SHARED_DATA} (../shared/data beside the checkout)")
    return SHARED_DATA
