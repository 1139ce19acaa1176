import pytest
import torch

from wadi.backbones import TextCondition


def _cond(batch=4, masked=True):
    embeds = torch.arange(batch * 3 * 2, dtype=torch.float32).reshape(batch, 3, 2)
    mask = torch.tensor([[1, 1, 0]] * batch) if masked else None
    return TextCondition(embeds, mask)


def test_len_and_indexing_keep_the_batch_dimension():
    c = _cond()
    assert len(c) == 4
    assert c[1].embeds.shape == (1, 3, 2) and torch.equal(c[1].embeds[0], c.embeds[1])
    assert torch.equal(c[-1].embeds[0], c.embeds[3])
    assert len(c[1:3]) == 2
    keep = torch.tensor([True, False, True, False])
    assert torch.equal(c[keep].embeds, c.embeds[[0, 2]])
    assert torch.equal(c[torch.tensor([3, 0])].mask, c.mask[[3, 0]])
    assert torch.equal(c[[2, 1]].embeds, c.embeds[[2, 1]])


def test_to_changes_only_embedding_dtype():
    c = _cond().to(dtype=torch.float16)
    assert c.embeds.dtype == torch.float16 and c.mask.dtype == torch.int64


def test_cat_and_where():
    a, b = _cond(2), _cond(3)
    both = TextCondition.cat([a, b])
    assert len(both) == 5 and torch.equal(both.mask[2:], b.mask)
    null = TextCondition(torch.full((1, 3, 2), -1.0), torch.tensor([[1, 0, 0]]))
    keep = torch.tensor([True, False, True, False])
    mixed = _cond().where(keep, null)
    assert torch.equal(mixed.embeds[0], _cond().embeds[0])
    assert torch.equal(mixed.embeds[1], null.embeds[0])
    assert mixed.mask[1].tolist() == [1, 0, 0] and mixed.mask[0].tolist() == [1, 1, 0]
    unmasked = _cond(2, masked=False).where(
        torch.tensor([False, True]), TextCondition(torch.zeros(1, 3, 2))
    )
    assert unmasked.mask is None and unmasked.embeds[0].abs().sum() == 0


def test_shape_errors():
    with pytest.raises(ValueError, match="must be \\(B, L, D\\)"):
        TextCondition(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="mask must be"):
        TextCondition(torch.zeros(2, 3, 4), torch.ones(2, 4))
    with pytest.raises(ValueError, match="with and without"):
        TextCondition.cat([_cond(1), _cond(1, masked=False)])
    with pytest.raises(ValueError, match="entries"):
        _cond(2).where(torch.tensor([True]), _cond(1))


def _full(batch=2, fill=0.0):
    return TextCondition(
        torch.full((batch, 3, 2), fill),
        torch.ones(batch, 3, dtype=torch.long),
        pooled=torch.full((batch, 5), fill),
        extras={"time_ids": torch.full((batch, 6), fill)},
    )


def test_pooled_and_extras_follow_every_batch_operation():
    c = TextCondition.cat([_full(2, 1.0), _full(1, 2.0)])
    assert c.pooled.shape == (3, 5) and c.extras["time_ids"].shape == (3, 6)
    assert c[2].pooled[0, 0] == 2.0 and c[[0]].extras["time_ids"][0, 0] == 1.0
    null = _full(1, -1.0)
    mixed = c.where(torch.tensor([True, False, True]), null)
    assert mixed.pooled[:, 0].tolist() == [1.0, -1.0, 2.0]
    assert mixed.extras["time_ids"][:, 0].tolist() == [1.0, -1.0, 2.0]
    assert null.expand(4).pooled.shape == (4, 5)
    half = c.to(dtype=torch.float16)
    assert half.pooled.dtype == torch.float16 and half.mask.dtype == torch.long
    with pytest.raises(ValueError, match="pooled"):
        TextCondition.cat([_full(1), TextCondition(torch.zeros(1, 3, 2), torch.ones(1, 3))])
    with pytest.raises(ValueError, match="pooled must be"):
        TextCondition(torch.zeros(2, 3, 2), pooled=torch.zeros(3, 5))
    with pytest.raises(ValueError, match="extras"):
        TextCondition(torch.zeros(2, 3, 2), extras={"time_ids": torch.zeros(1, 6)})
