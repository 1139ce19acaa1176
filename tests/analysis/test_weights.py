"""The analysis math against known answers and an independent float64 numpy reference."""

import math

import numpy as np
import pytest
import torch

from wadi.analysis.weights import (
    angle_change,
    block_type,
    cumulative_energy,
    direction_change,
    energy_at_fraction,
    layer_stats,
    norm_change,
    rank_at_fraction,
    rank_for_energy,
    residual_energy_spectrum,
    residual_singular_values,
    summarize,
    swap,
    swap_direction,
    swap_norm,
)

from .reference import (
    cumulative_energy_ref,
    direction_change_ref,
    norm_change_ref,
    rotate_rows_ref,
)

SHAPES = [(12, 10), (6, 4, 3, 3)]  # a Linear and a Conv2d weight


@pytest.mark.parametrize("shape", SHAPES)
def test_pure_rotation_has_zero_norm_change_and_known_direction_change(shape):
    rng = np.random.default_rng(0)
    wt = rng.standard_normal(shape)
    phi = rng.uniform(0.01, 1.2, size=shape[0])
    ws = rotate_rows_ref(wt, phi, rng)
    t, s = torch.from_numpy(wt), torch.from_numpy(ws)
    np.testing.assert_allclose(norm_change(t, s).numpy(), 0.0, atol=1e-14)
    np.testing.assert_allclose(direction_change(t, s).numpy(), 1 - np.cos(phi), rtol=1e-10)
    stats = layer_stats("blk.attn1.to_q", t, s)
    assert stats.norm_change_mean == pytest.approx(0.0, abs=1e-12)
    assert stats.direction_change_mean == pytest.approx(np.mean(1 - np.cos(phi)) * 100, rel=1e-10)
    assert stats.direction_change_std == pytest.approx(np.std(1 - np.cos(phi)) * 100, rel=1e-9)
    assert stats.kind == ("conv" if len(shape) == 4 else "linear")
    assert stats.rows == shape[0] and stats.zero_rows == 0


def test_lorad_rotation_keeps_norms_exactly():
    """A student made with the LoRaD rotation itself: norm change 0, direction change = reference."""
    from wadi.lorad import rotate_pairs

    rng = np.random.default_rng(1)
    wt = torch.from_numpy(rng.standard_normal((16, 9)))  # odd fan-in: last column untouched
    theta = torch.from_numpy(rng.uniform(-0.3, 0.3, size=(16, 4)))
    ws = rotate_pairs(wt, theta)
    np.testing.assert_allclose(norm_change(wt, ws).numpy(), 0.0, atol=1e-14)
    np.testing.assert_allclose(
        direction_change(wt, ws).numpy(), direction_change_ref(wt.numpy(), ws.numpy()), atol=1e-14
    )
    assert float(direction_change(wt, ws).min()) > 0


@pytest.mark.parametrize("shape", SHAPES)
def test_pure_scaling_has_zero_direction_change_and_known_norm_change(shape):
    rng = np.random.default_rng(2)
    wt = rng.standard_normal(shape)
    c = rng.uniform(0.5, 1.5, size=shape[0])
    ws = wt * c.reshape((-1,) + (1,) * (len(shape) - 1))
    t, s = torch.from_numpy(wt), torch.from_numpy(ws)
    np.testing.assert_allclose(norm_change(t, s).numpy(), np.abs(c - 1), rtol=1e-12)
    np.testing.assert_allclose(direction_change(t, s).numpy(), 0.0, atol=1e-15)
    stats = layer_stats("x", t, s)
    assert stats.norm_change_mean == pytest.approx(np.mean(np.abs(c - 1)) * 100, rel=1e-10)
    assert stats.norm_change_std == pytest.approx(np.std(np.abs(c - 1)) * 100, rel=1e-9)
    assert stats.direction_change_mean == pytest.approx(0.0, abs=1e-12)


def test_negative_scaling_is_a_full_direction_flip():
    w = torch.randn(3, 5, dtype=torch.float64)
    np.testing.assert_allclose(direction_change(w, -2 * w).numpy(), 2.0, rtol=1e-14)
    np.testing.assert_allclose(norm_change(w, -2 * w).numpy(), 1.0, rtol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_generic_pair_matches_numpy_reference(dtype):
    rng = np.random.default_rng(3)
    wt = torch.from_numpy(rng.standard_normal((20, 3, 3, 3))).to(dtype)
    ws = (wt.double() + 0.1 * torch.from_numpy(rng.standard_normal((20, 3, 3, 3)))).to(dtype)
    ref_t, ref_s = wt.double().numpy(), ws.double().numpy()  # the values the tool sees
    np.testing.assert_allclose(
        norm_change(wt, ws).numpy(), norm_change_ref(ref_t, ref_s), rtol=1e-9
    )
    np.testing.assert_allclose(
        direction_change(wt, ws).numpy(), direction_change_ref(ref_t, ref_s), rtol=1e-8, atol=1e-15
    )
    stats = layer_stats("x", wt, ws)
    nc = norm_change_ref(ref_t, ref_s) * 100
    dc = direction_change_ref(ref_t, ref_s) * 100
    assert stats.norm_change_mean == pytest.approx(nc.mean(), rel=1e-9)
    assert stats.norm_change_std == pytest.approx(nc.std(), rel=1e-8)
    assert stats.direction_change_mean == pytest.approx(dc.mean(), rel=1e-8)
    assert stats.direction_change_std == pytest.approx(dc.std(), rel=1e-7)
    rel = np.linalg.norm(ref_s - ref_t) / np.linalg.norm(ref_t) * 100
    assert stats.residual_relative_norm == pytest.approx(rel, rel=1e-10)


def test_rank_k_residual_holds_all_energy_at_rank_k():
    rng = np.random.default_rng(4)
    out, inp, k = 30, 20, 3
    wt = rng.standard_normal((out, inp))
    ws = wt + rng.standard_normal((out, k)) @ rng.standard_normal((k, inp))
    t, s = torch.from_numpy(wt), torch.from_numpy(ws)
    energy = cumulative_energy(residual_singular_values(t, s))
    np.testing.assert_allclose(energy.numpy(), cumulative_energy_ref(wt, ws), rtol=1e-10)
    fast = cumulative_energy(residual_energy_spectrum(t, s), squared=True)
    np.testing.assert_allclose(fast.numpy(), cumulative_energy_ref(wt, ws), atol=1e-13)
    assert float(energy[k - 1]) == pytest.approx(1.0, abs=1e-12)
    assert float(fast[k - 1]) == pytest.approx(1.0, abs=1e-12)
    assert float(energy[k - 2]) < 1.0 - 1e-6
    assert rank_for_energy(energy, 1.0) == k
    assert rank_for_energy(fast, 1.0) == k
    assert rank_for_energy(energy, 0.9) <= k
    assert rank_for_energy(energy, 0.9) == int(np.argmax(cumulative_energy_ref(wt, ws) >= 0.9)) + 1
    # 15 % of full rank 20 is rank 3: all the energy; 10 % is rank 2: less
    assert energy_at_fraction(energy, inp, 0.15) == pytest.approx(1.0, abs=1e-12)
    assert energy_at_fraction(energy, inp, 0.10) < 1.0 - 1e-6
    stats = layer_stats("x", t, s, energy_fraction=0.15, energy_target=0.9)
    assert stats.full_rank == inp
    assert stats.energy_at_fraction == pytest.approx(100.0, abs=1e-9)
    assert stats.rank_for_energy == rank_for_energy(energy, 0.9)
    assert stats.energy_curve[-1] == pytest.approx(100.0) and stats.energy_curve[0] == 0.0


def test_rank_at_fraction_rounds_up_and_is_at_least_one():
    assert rank_at_fraction(10, 0.3) == 3  # not 4 from 0.3 * 10 = 3.0000000000000004
    assert rank_at_fraction(1280, 0.3) == 384
    assert rank_at_fraction(7, 0.3) == 3
    assert rank_at_fraction(3, 0.01) == 1
    assert rank_at_fraction(5, 1.0) == 5
    with pytest.raises(ValueError, match="fraction"):
        rank_at_fraction(5, 0.0)


def test_unchanged_layer_and_zero_rows():
    w = torch.randn(4, 6, dtype=torch.float64)
    stats = layer_stats("x", w, w.clone())
    assert stats.energy_at_fraction is None and stats.rank_for_energy == 0
    assert stats.norm_change_mean == 0.0 and stats.direction_change_mean == 0.0
    assert stats.residual_relative_norm == 0.0
    s = w.clone()
    s[0] *= 1.1
    t = w.clone()
    t[2] = 0.0  # a dead teacher neuron has no direction: left out and counted
    stats = layer_stats("x", t, s)
    assert stats.zero_rows == 1
    live = [0, 1, 3]
    nc = norm_change_ref(t.numpy()[live], s.numpy()[live]) * 100
    dc = direction_change_ref(t.numpy()[live], s.numpy()[live]) * 100
    assert stats.norm_change_mean == pytest.approx(nc.mean(), rel=1e-12)
    assert stats.direction_change_mean == pytest.approx(dc.mean(), abs=1e-12)
    assert math.isnan(float(norm_change(t, s)[2])) and math.isnan(float(direction_change(t, s)[2]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_swaps_exchange_norms_and_directions(dtype):
    rng = np.random.default_rng(5)
    t = torch.from_numpy(rng.standard_normal((8, 2, 3, 3))).to(dtype)
    s = torch.from_numpy(rng.standard_normal((8, 2, 3, 3))).to(dtype)
    tol = {torch.float64: 1e-13, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
    n = swap_norm(t, s)
    d = swap_direction(t, s)
    for out in (n, d):
        assert out.dtype == dtype and out.shape == s.shape
    tt, ss = t.double().numpy(), s.double().numpy()
    # norm swap: teacher's norms, student's directions
    np.testing.assert_allclose(norm_change_ref(tt, n.double().numpy()), 0, atol=tol)
    np.testing.assert_allclose(direction_change_ref(ss, n.double().numpy()), 0, atol=tol)
    # direction swap: student's norms, teacher's directions
    np.testing.assert_allclose(norm_change_ref(ss, d.double().numpy()), 0, atol=tol)
    np.testing.assert_allclose(direction_change_ref(tt, d.double().numpy()), 0, atol=tol)
    assert torch.equal(swap("norm", t, s), n)
    with pytest.raises(ValueError, match="unknown swap"):
        swap("angle", t, s)


def test_swaps_of_a_pure_rotation_and_pure_scaling():
    """Norm swap undoes a pure scaling; direction swap undoes a pure rotation."""
    rng = np.random.default_rng(6)
    t = rng.standard_normal((5, 7))
    scaled = t * rng.uniform(0.5, 2.0, size=(5, 1))
    rotated = rotate_rows_ref(t, rng.uniform(0.1, 1.0, size=5), rng)
    tt = torch.from_numpy(t)
    np.testing.assert_allclose(swap_norm(tt, torch.from_numpy(scaled)).numpy(), t, rtol=1e-12)
    np.testing.assert_allclose(swap_direction(tt, torch.from_numpy(rotated)).numpy(), t, rtol=1e-12)


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="differ in shape"):
        norm_change(torch.zeros(3, 4), torch.zeros(4, 3))


def test_summary_means_and_ratio():
    rng = np.random.default_rng(7)
    layers = []
    for i in range(3):
        t = torch.from_numpy(rng.standard_normal((10, 8)))
        s = t + 0.05 * (i + 1) * torch.from_numpy(rng.standard_normal((10, 8)))
        layers.append(layer_stats(f"l{i}", t, s))
    layers.append(layer_stats("same", t, t.clone()))  # unchanged: counts for the change means
    summary = summarize(layers)
    norm = np.mean([x.norm_change_mean for x in layers])
    direction = np.mean([x.direction_change_mean for x in layers])
    assert summary["layers_count"] == 4 and summary["changed_layers_count"] == 3
    assert summary["norm_change_mean"] == pytest.approx(norm)
    assert summary["direction_change_mean"] == pytest.approx(direction)
    assert summary["ratio"] == pytest.approx(direction / norm)
    energy = np.mean([x.energy_at_fraction for x in layers[:3]])  # the unchanged one has none
    assert summary["energy_at_fraction_mean"] == pytest.approx(energy)
    assert summarize([layers[-1]])["ratio"] is None  # 0 / 0


@pytest.mark.parametrize(
    "name, kind",
    [
        ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "self-attention"),
        ("up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", "cross-attention"),
        ("mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj", "feed-forward"),
        ("down_blocks.0.attentions.0.proj_in", "proj in/out"),
        ("down_blocks.0.resnets.0.time_emb_proj", "time"),
        ("down_blocks.0.resnets.0.conv1", "resnet"),
        ("down_blocks.0.downsamplers.0.conv", "resample"),
        ("time_embedding.linear_1", "time"),
        ("adaln_single.linear", "time"),
        ("conv_in", "in/out"),
        ("caption_projection.linear_1", "condition"),
        ("something_else", "other"),
    ],
)
def test_block_types(name, kind):
    assert block_type(name) == kind


def test_direction_change_is_stable_for_tiny_angles():
    """0.5 * ||u - v||^2 keeps precision where 1 - cos would cancel."""
    rng = np.random.default_rng(8)
    t = rng.standard_normal((4, 50))
    phi = np.full(4, 1e-6)
    s = rotate_rows_ref(t, phi, rng)
    got = direction_change(torch.from_numpy(t), torch.from_numpy(s)).numpy()
    np.testing.assert_allclose(got, 1 - np.cos(phi), rtol=1e-4)
    assert math.isfinite(float(got.sum()))


def test_natural_layer_order():
    from wadi.analysis.report import natural_key

    names = ["up_blocks.10.a", "up_blocks.2.a", "down_blocks.0.b", "conv_in", "up_blocks.2"]
    assert sorted(names, key=natural_key) == [
        "conv_in",
        "down_blocks.0.b",
        "up_blocks.2",
        "up_blocks.2.a",
        "up_blocks.10.a",
    ]


@pytest.mark.parametrize("shape", SHAPES)
def test_angle_is_the_rotation_angle_and_first_order(shape):
    """The angle equals the known rotation (also at 1e-6 rad, where arccos(cos) loses it)."""
    rng = np.random.default_rng(3)
    wt = rng.standard_normal(shape)
    phi = np.concatenate([rng.uniform(0.01, 3.0, size=shape[0] - 2), [1e-6, 2e-7]])
    ws = rotate_rows_ref(wt, phi, rng)
    t, s = torch.from_numpy(wt), torch.from_numpy(ws)
    np.testing.assert_allclose(angle_change(t, s).numpy(), phi, rtol=1e-8)
    stats = layer_stats("blk.attn1.to_q", t, s)
    assert stats.angle_mean == pytest.approx(np.mean(phi) * 100, rel=1e-9)
    assert stats.angle_std == pytest.approx(np.std(phi) * 100, rel=1e-8)
    # where 1 - cos underflows to about eps (phi = 2e-7: 2e-14), the angle is still resolved
    assert float(angle_change(t, s)[-1]) == pytest.approx(2e-7, rel=1e-6)


def test_summary_reports_angle_ratio_beside_one_minus_cos_ratio():
    """A change with angle == relative norm change: angle/norm ~ 1, (1 - cos)/norm ~ angle / 2."""
    from wadi.analysis.weights import summarize

    rng = np.random.default_rng(4)
    wt = rng.standard_normal((32, 24))
    phi = np.full(32, 0.02)
    ws = rotate_rows_ref(wt, phi, rng) * 1.02  # norm +2 %, angle 0.02 rad
    stats = layer_stats("blk.attn1.to_q", torch.from_numpy(wt), torch.from_numpy(ws))
    summary = summarize([stats])
    assert summary["angle_ratio"] == pytest.approx(1.0, rel=1e-9)
    assert summary["ratio"] == pytest.approx((1 - np.cos(0.02)) / 0.02, rel=1e-9)
    assert summary["ratio"] < 0.011
