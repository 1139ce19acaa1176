import json

import pytest
import torch

from wadi.toy import EVALUATOR_DIR
from wadi.toy.data import load_digits_split
from wadi.toy.evaluator import (
    CONFIG_NAME,
    DigitClassifier,
    EvaluatorTrainConfig,
    accuracy,
    load_evaluator,
    save_evaluator,
    train_evaluator,
)


def test_shipped_evaluator_classifies_heldout_digits():
    reported = json.loads((EVALUATOR_DIR / CONFIG_NAME).read_text())["heldout_accuracy"]
    model = load_evaluator()
    _, _, test_x, test_y = load_digits_split()
    acc = accuracy(model, test_x, test_y)
    assert acc >= 0.95
    assert acc >= reported - 0.005  # the shipped weights give what the config reports
    feats = model.features(test_x[:7])
    assert feats.shape == (7, model.feature_dim) and torch.isfinite(feats).all()
    assert model.classify(test_x[:7]).shape == (7, 10)


def test_evaluator_rejects_wrong_shapes():
    model = DigitClassifier()
    with pytest.raises(ValueError, match="shape"):
        model.features(torch.zeros(2, 3, 16, 16))


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = DigitClassifier(channels=(4, 8, 8), feature_dim=16).eval()
    save_evaluator(model, tmp_path / "ev")
    again = load_evaluator(tmp_path / "ev")
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    assert torch.equal(model.classify(x), again.classify(x))
    with pytest.raises(FileNotFoundError, match="no evaluator"):
        load_evaluator(tmp_path / "missing")


def test_short_training_learns_something(tmp_path):
    summary = train_evaluator(tmp_path / "ev", EvaluatorTrainConfig(epochs=2), progress=False)
    assert summary["heldout_accuracy"] > 0.5  # chance is 0.1
    assert load_evaluator(tmp_path / "ev").feature_dim == 64
