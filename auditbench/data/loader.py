"""Frames made in worker processes while the backbone runs: a torch DataLoader over chunks.

Reading, decoding and resampling an image and its masks (:func:`~auditbench.data.prepare.to_frames`)
costs CPU time that, with a GPU, would leave the GPU waiting. With ``workers > 0`` each worker makes
whole chunks of frames, a few chunks ahead of the one the backbone is on; the chunks come back in
order and are the same arrays as without workers, so outputs do not depend on the worker count.
"""
from __future__ import annotations

import os
from typing import Iterator, Sequence

from torch.utils.data import DataLoader, Dataset

from auditbench.data.prepare import Frames, to_frames
from auditbench.data.records import Sample
from auditbench.data.transforms import FrameSpec

MAX_AUTO_WORKERS = 8


def resolve_workers(setting: int | str, device_type: str) -> int:
    """``training.loader_workers``: a number, or ``"auto"``: none on the CPU, where the backbone
    already uses every core; half the cores (at most :data:`MAX_AUTO_WORKERS`) beside a GPU."""
    if setting != "auto":
        return int(setting)
    if device_type == "cpu":
        return 0
    return max(1, min(MAX_AUTO_WORKERS, (os.cpu_count() or 2) // 2))


class _ChunkFrames(Dataset):
    def __init__(self, chunks: Sequence[Sequence[Sample]], frame: FrameSpec, border_fraction: float):
        self.chunks, self.frame, self.border_fraction = chunks, frame, border_fraction

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, index: int) -> Frames:
        return to_frames(list(self.chunks[index]), self.frame, self.border_fraction)


def _as_is(item: Frames) -> Frames:  # module level: picklable for any start method
    return item


def frame_chunks(chunks: Sequence[Sequence[Sample]], frame: FrameSpec, border_fraction: float,
                 workers: int = 0) -> Iterator[Frames]:
    """The frames of each chunk of samples, in order; made by ``workers`` processes when > 0."""
    if workers <= 0 or len(chunks) <= 1:
        for chunk in chunks:
            yield to_frames(list(chunk), frame, border_fraction)
        return
    loader = DataLoader(_ChunkFrames(chunks, frame, border_fraction), batch_size=None, shuffle=False,
                        num_workers=min(workers, len(chunks)), collate_fn=_as_is, prefetch_factor=2)
    yield from loader
