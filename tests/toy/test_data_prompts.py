import pytest
import torch

from wadi.toy.data import load_digits_split, upsample_digits
from wadi.toy.prompts import (
    DIGIT_WORDS,
    TEMPLATES,
    all_words,
    build_tokenizer,
    prompt_for,
    prompts_for_class,
)


def test_split_is_fixed_stratified_and_scaled():
    a = load_digits_split()
    b = load_digits_split()
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    train_x, train_y, test_x, test_y = a
    assert train_x.shape == (1437, 1, 16, 16) and test_x.shape == (360, 1, 16, 16)
    assert train_x.dtype == torch.float32 and train_y.dtype == torch.long
    assert float(train_x.min()) == -1.0 and float(train_x.max()) == 1.0
    # stratified: every class holds about 20 % of its images in the held-out split
    frac = test_y.bincount(minlength=10).double() / (
        test_y.bincount(minlength=10) + train_y.bincount(minlength=10)
    )
    assert torch.all((frac - 0.2).abs() < 0.01)
    # the first held-out labels pin the split itself (seed 0 of train_test_split)
    assert test_y[:10].tolist() == b[3][:10].tolist()


def test_upsample_keeps_blank_and_full_pixels():
    import numpy as np

    img = np.zeros((1, 8, 8))
    img[0, :, :4] = 16
    x = upsample_digits(img)
    assert x.shape == (1, 1, 16, 16)
    assert torch.all(x[0, 0, :, :6] == 1.0) and torch.all(x[0, 0, :, 10:] == -1.0)


def test_prompts_and_vocabulary():
    assert prompt_for(7) == "a handwritten digit seven"
    assert prompt_for(7, 2) == "7"
    assert len(prompts_for_class(3)) == len(TEMPLATES)
    assert set(DIGIT_WORDS) <= set(all_words())
    with pytest.raises(ValueError, match="digit"):
        prompt_for(10)
    with pytest.raises(ValueError, match="template"):
        prompt_for(1, len(TEMPLATES))


def test_every_vocabulary_word_is_one_token(tmp_path):
    tok = build_tokenizer(tmp_path / "tok")
    for digit in range(10):
        for prompt in prompts_for_class(digit):
            ids = tok(prompt).input_ids
            assert len(ids) == len(prompt.split()) + 2, prompt
    assert tok("").input_ids == [tok.bos_token_id, tok.eos_token_id]
    assert tok("seven").input_ids != tok("eight").input_ids
