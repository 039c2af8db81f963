"""Meta-learning helps segmentation: on the synthetic set, a meta-learned initialization beats the run's own
random initialization given the same test-time adaptation (the record's baseline), on the same episodes."""

from __future__ import annotations

from pathlib import Path

import pytest

from metabench.run.config import resolve
from metabench.run.runner import run
from tests.helpers import local_run


@pytest.mark.slow
def test_fomaml_init_beats_random_init_on_synthetic_segmentation(tmp_path: Path) -> None:
    # The synthetic-seg-1w1s preset (200 FOMAML steps, ~40 s on one core; 200 test episodes), one validation.
    config = resolve("synthetic-seg-1w1s", "fomaml", overrides=[
        "trainer.val_every=200", "episodes.val_episodes=10", "trainer.cpu_threads=1"] + local_run(tmp_path))
    record = run(config, progress=False).record
    base = record.baseline
    print(f"fg-IoU {record.mean:.3f} +- {record.ci95:.3f} vs random init {base['random_init_mean']:.3f} "
          f"+- {base['random_init_ci95']:.3f}; mIoU {record.metrics['miou']:.3f} vs {base['random_init_miou']:.3f}; "
          f"FB-IoU {record.metrics['fb_iou']:.3f} vs {base['random_init_fb_iou']:.3f}")
    # Measured (2-core CPU, seed 0): fg-IoU 0.533 +- 0.037 vs 0.416 +- 0.044, mIoU 0.522 vs 0.383, FB-IoU 0.679
    # vs 0.578 (after 100 steps the gap is only ~0.05). Same episodes for both, so the gap is paired.
    assert record.mean > base["random_init_mean"] + 0.07
    assert record.metrics["miou"] > base["random_init_miou"] + 0.07
    assert record.metrics["fb_iou"] > base["random_init_fb_iou"]
