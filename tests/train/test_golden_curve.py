"""A 10-step `tiny` tokenizer run on real footage: the loss drops, and follows the golden curve.

The golden curve (tests/assets/tokenizer_tiny_curve.json) catches silent changes to the model, the
losses, the data order or the optimiser. To change it on purpose, regenerate and review the diff:
    EVATOK_UPDATE_GOLDEN=1 python -m pytest tests/train/test_golden_curve.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from evatok_cli.train.tokenizer import train_tokenizer

GOLDEN = Path(__file__).resolve().parents[1] / "assets" / "tokenizer_tiny_curve.json"


def test_tiny_tokenizer_golden_loss_curve(footage, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same reduction order on every machine
    try:
        train_tokenizer(
            stage="proxy",
            preset="tiny",
            data=[str(footage["carphone"])],
            out=tmp_path / "run",
            steps=10,
            batch_size=2,
            workers=0,
            log_every=1,
            warmup=1,
            lr=2e-3,
            discriminator=False,
            seed=0,
        )
    finally:
        torch.set_num_threads(threads)
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    curve = [round(r["loss"], 6) for r in recs]
    assert len(curve) == 10
    assert sum(curve[-3:]) < 0.9 * sum(curve[:3]), curve  # it learns
    if os.environ.get("EVATOK_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps({"loss": curve}, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())["loss"]
    assert curve == pytest.approx(golden, rel=0.05), (curve, golden)
