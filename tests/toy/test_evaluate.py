import numpy as np
import pytest
import torch
from PIL import Image

from wadi.toy.data import load_digits_split
from wadi.toy.evaluate import (
    balanced_digits,
    evaluate_images,
    evaluator_features,
    grid_image,
    real_digits_floor,
    save_grid,
)
from wadi.toy.evaluator import accuracy, load_evaluator


def test_real_heldout_digits_score_like_the_evaluator():
    _, _, test_x, test_y = load_digits_split()
    result = evaluate_images(test_x, test_y)
    assert result["accuracy"] == pytest.approx(accuracy(load_evaluator(), test_x, test_y))
    assert result["fd"] < 1e-6  # identical sets


def test_fd_separates_real_halves_from_noise():
    train_x, train_y, test_x, _ = load_digits_split()
    half_a, half_b = test_x[0::2], test_x[1::2]
    fd_real = evaluate_images(half_a, torch.zeros(len(half_a)), reference=half_b)["fd"]
    gen = torch.Generator().manual_seed(0)
    noise = torch.rand(180, 1, 16, 16, generator=gen) * 2 - 1
    fd_noise = evaluate_images(noise, torch.zeros(180), reference=half_b)["fd"]
    assert fd_real < 0.05 * fd_noise
    # training digits are close to held-out ones too
    fd_train = evaluate_images(train_x[:360], train_y[:360])["fd"]
    assert fd_train < 0.1 * fd_noise


def test_features_are_float64_and_deterministic():
    _, _, test_x, _ = load_digits_split()
    a = evaluator_features(test_x[:20])
    b = evaluator_features(test_x[:20], batch_size=3)
    assert a.dtype == np.float64 and a.shape == (20, 64)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="digits"):
        evaluate_images(torch.zeros(4, 1, 16, 16), [1, 2])
    with pytest.raises(ValueError, match="16"):
        evaluate_images(torch.zeros(4, 1, 8, 8), [1, 2, 3, 4])
    with pytest.raises(ValueError):
        balanced_digits(0)
    with pytest.raises(ValueError, match="at least 10"):
        grid_image({"x": torch.zeros(3, 1, 16, 16)})


def test_save_grid_writes_a_png_row_per_generator(tmp_path):
    _, _, test_x, test_y = load_digits_split()
    by_digit = torch.stack([test_x[test_y == d][0] for d in range(10)])
    rows = {"real": by_digit, "blank": -torch.ones(10, 1, 16, 16)}
    path = save_grid(rows, tmp_path / "out" / "grid.png", scale=4)
    img = Image.open(path)
    assert img.format == "PNG"
    assert img.size == (120 + 10 * 66 + 2, 2 * 66 + 2)
    pixels = np.asarray(img)
    # the blank row's first cell is black; the real row's first cell is the digit upscaled 4x
    assert pixels[68 : 68 + 64, 122 : 122 + 64].max() == 0
    first = ((by_digit[0, 0] + 1) * 127.5).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(pixels[2:66, 122:186], np.kron(first, np.ones((4, 4), np.uint8)))
    assert list(tmp_path.joinpath("out").iterdir()) == [path]


def test_real_digits_floor_is_a_seeded_draw_capped_at_the_training_set():
    a, b = real_digits_floor(40, seed=3), real_digits_floor(40, seed=3)
    assert a == b and a["samples"] == 40
    assert real_digits_floor(40, seed=4)["fd"] != a["fd"]  # another draw
    train_x, train_y, _, _ = load_digits_split()
    everything = real_digits_floor(10**6)
    assert everything["samples"] == len(train_x)
    # all of them in any order: the same FD as the whole split in order
    assert everything["fd"] == pytest.approx(evaluate_images(train_x, train_y)["fd"], rel=1e-6)
