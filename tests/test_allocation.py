"""Hand-computed checks of the layer-wise allocations (uniform, ATP, OWL, RMI) and their LP."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linprog

from losa_deploy.allocation import (
    atp_beta_range,
    atp_rates,
    linear_cka_matrix,
    owl_outlier_ratio,
    owl_rates,
    rmi_delta,
    rmi_importance,
    rmi_rates,
    solve_box_lp,
    uniform_rates,
    weighted_mean,
)
from losa_deploy.errors import UserError


def _close(a, b, tol=1e-12):
    return len(a) == len(b) and all(abs(x - y) <= tol for x, y in zip(a, b))


def test_uniform():
    assert uniform_rates(3, 0.7) == [0.7, 0.7, 0.7]
    with pytest.raises(UserError):
        uniform_rates(3, 1.0)
    with pytest.raises(UserError):
        uniform_rates(0, 0.5)


# --------------------------------------------------------------------------------------------- ATP


def test_atp_by_hand():
    assert atp_beta_range(4, 0.5) == (0.0, pytest.approx(1 / 3))
    assert atp_beta_range(4, 0.3) == (0.0, pytest.approx(0.2))
    assert atp_beta_range(1, 0.5) == (0.0, 0.0)
    # s_i = S - beta (L-1)/2 + beta (i-1): 0.5 - 0.15 + 0.1 (i-1)
    assert _close(atp_rates(4, 0.5, 0.1), [0.35, 0.45, 0.55, 0.65])
    assert _close(atp_rates(4, 0.3, 0.2), [0.0, 0.2, 0.4, 0.6])  # the legal maximum for S < 0.5
    assert atp_rates(4, 0.5, 0.0) == [0.5] * 4  # beta = 0 is uniform
    # weighted: the progression is shifted so the parameter-weighted mean is S
    # (0.35 + 0.45 + 0.55 + 3 * 0.65) / 6 = 0.55 -> shift -0.05
    assert _close(atp_rates(4, 0.5, 0.1, weights=[1, 1, 1, 3]), [0.3, 0.4, 0.5, 0.6])


def test_atp_out_of_range_beta_states_the_legal_range():
    with pytest.raises(UserError, match=r"0 <= beta <= 0\.333333"):
        atp_rates(4, 0.5, 0.4)
    with pytest.raises(UserError, match="out of range"):
        atp_rates(4, 0.5, -0.01)
    # at S >= 0.5 the maximum would make the deepest block 100% sparse
    with pytest.raises(UserError, match=r"beta < 0\.333333"):
        atp_rates(4, 0.5, 1 / 3)


def test_atp_mean_is_exact_for_a_real_model_size():
    lo, hi = atp_beta_range(30, 0.7)
    for beta in np.linspace(0, hi * 0.999, 7):
        r = atp_rates(30, 0.7, float(beta))
        assert abs(math.fsum(r) / 30 - 0.7) <= 1e-12
        assert all(0 <= x < 1 for x in r) and r == sorted(r)


# --------------------------------------------------------------------------------------------- OWL


def test_owl_outlier_ratio_by_hand():
    scores = torch.tensor([1.0] * 9 + [100.0])  # mean 10.9, 5 x mean = 54.5: one score above
    assert owl_outlier_ratio(scores) == pytest.approx(0.1)
    # pooled over a block's linears, as the reference concatenates them
    assert owl_outlier_ratio([torch.ones(2, 2), torch.tensor([[1.0] * 5 + [100.0]])]) == pytest.approx(0.1)
    assert owl_outlier_ratio(scores, m=20.0) == 0.0


def test_owl_rates_by_hand():
    # a = (r - 0.01) / 0.04 * 0.16 = [0, 0.04, 0.08, 0.16], mean 0.07; rate = 0.7 - (a - 0.07)
    rates = owl_rates([0.01, 0.02, 0.03, 0.05], 0.7, lam=0.08)
    assert _close(rates, [0.77, 0.73, 0.69, 0.61], tol=1e-12)
    assert abs(math.fsum(rates) / 4 - 0.7) <= 1e-12
    # percentages instead of fractions give the same rates (the map is scale-free)
    assert _close(owl_rates([1, 2, 3, 5], 0.7), rates)
    assert owl_rates([0.02] * 3, 0.5) == [0.5] * 3
    with pytest.raises(UserError, match="smaller lambda"):
        owl_rates([0.01, 0.02, 0.03, 0.05], 0.05, lam=0.08)  # 0.05 - 0.09 < 0
    w = [1.0, 2.0, 3.0, 4.0]
    assert abs(weighted_mean(owl_rates([0.01, 0.02, 0.03, 0.05], 0.7, weights=w), w) - 0.7) <= 1e-12


# ---------------------------------------------------------------------------------------------- LP


def test_box_lp_by_hand():
    cost = [3.0, 1.0, 2.0, 4.0]
    # budget 4 * (0.5 - 0.4) = 0.4: the two cheapest blocks (1, then 2) go to 0.6
    assert _close(solve_box_lp(cost, 0.5, 0.4, 0.6), [0.4, 0.6, 0.6, 0.4])
    # budget 0.3: block 1 full, block 2 half way
    assert _close(solve_box_lp(cost, 0.475, 0.4, 0.6), [0.4, 0.6, 0.5, 0.4])
    assert _close(solve_box_lp(cost, 0.4, 0.4, 0.6), [0.4] * 4)
    assert _close(solve_box_lp(cost, 0.6, 0.4, 0.6), [0.6] * 4)
    # weighted: sum w s = 0.5 * 5 with w = [1, 2, 1, 1]; budget 5 * 0.1 = 0.5; block 1 takes 2 * 0.2 = 0.4,
    # block 2 takes the remaining 0.1 -> 0.5
    s = solve_box_lp(cost, 0.5, 0.4, 0.6, weights=[1, 2, 1, 1])
    assert _close(s, [0.4, 0.6, 0.5, 0.4])
    # ties in cost: the deeper block is raised first
    assert _close(solve_box_lp([1.0, 1.0], 0.45, 0.4, 0.6), [0.4, 0.5])
    with pytest.raises(UserError, match="outside"):
        solve_box_lp(cost, 0.7, 0.4, 0.6)


@settings(max_examples=30, deadline=None)
@given(
    cost=st.lists(st.floats(0.01, 10.0), min_size=1, max_size=12),
    frac=st.floats(0.0, 1.0),
    use_w=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_box_lp_is_optimal_against_scipy(cost, frac, use_w, seed):
    L = len(cost)
    lo, hi = 0.62, 0.68
    mean = lo + frac * (hi - lo)
    w = (np.random.default_rng(seed).integers(1, 5, L).astype(float)).tolist() if use_w else None
    s = solve_box_lp(cost, mean, lo, hi, weights=w)
    wv = np.ones(L) if w is None else np.array(w)
    assert abs(float(np.dot(wv, s) / wv.sum()) - mean) <= 1e-12
    assert all(lo - 1e-15 <= x <= hi + 1e-15 for x in s)
    ref = linprog(
        c=wv * np.array(cost), A_eq=[wv], b_eq=[mean * wv.sum()], bounds=[(lo, hi)] * L, method="highs"
    )
    assert ref.status == 0
    ours = float(np.dot(wv * np.array(cost), s))
    # HiGHS meets the equality only to its feasibility tolerance (1e-7), so its optimum may sit that far below ours
    assert ours <= ref.fun + 1e-7 * max(1.0, abs(ref.fun)) * max(cost) * wv.sum()


# --------------------------------------------------------------------------------------------- CKA


def _feature_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Kornblith et al.'s feature-space linear CKA: ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)."""
    xc = x.double() - x.double().mean(0)
    yc = y.double() - y.double().mean(0)
    return float((yc.T @ xc).norm() ** 2 / ((xc.T @ xc).norm() * (yc.T @ yc).norm()))


def test_linear_cka():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 40, generator=g, dtype=torch.float64)
    y = torch.randn(16, 30, generator=g, dtype=torch.float64)
    kx, ky = x @ x.T, y @ y.T
    cka = linear_cka_matrix([kx, kx, 3.5 * kx, ky])
    assert cka.dtype == torch.float64 and cka.shape == (4, 4)
    assert torch.allclose(cka[0, 1], torch.tensor(1.0, dtype=torch.float64))  # identical
    assert torch.allclose(cka[0, 2], torch.tensor(1.0, dtype=torch.float64))  # scaled
    assert torch.allclose(cka, cka.T)
    assert math.isclose(float(cka[0, 3]), _feature_cka(x, y), rel_tol=1e-9)
    # invariant to an orthogonal transform of the features and to adding a constant to every sample
    q, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))
    xq = x @ q + 5.0
    assert math.isclose(float(linear_cka_matrix([kx, xq @ xq.T])[0, 1]), 1.0, rel_tol=1e-9)
    # a block whose samples are all identical has no centred signal: CKA 0 with the others
    const = torch.ones(16, 16, dtype=torch.float64)
    c2 = linear_cka_matrix([kx, const])
    assert c2[0, 1] == 0 and c2[1, 1] == 1
    with pytest.raises(UserError, match="at least 2 calibration samples"):
        linear_cka_matrix([torch.ones(1, 1)])


# --------------------------------------------------------------------------------------------- RMI


def test_rmi_delta():
    assert rmi_delta(0.3) == 0.01 and rmi_delta(0.5) == 0.01
    assert rmi_delta(0.55) == 0.02 and rmi_delta(0.6) == 0.02
    assert rmi_delta(0.7) == 0.03


def test_rmi_rates_prune_redundant_blocks_more_and_keep_the_mean():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(12, 50, generator=g)
    feats = [torch.randn(12, 50, generator=g)]  # block 0: unlike the others -> least redundant
    feats += [base + 0.1 * k * torch.randn(12, 50, generator=g) for k in range(1, 6)]
    grams = [f @ f.T for f in feats]
    cka, red, imp = rmi_importance(grams)
    assert abs(math.fsum(red) - 1.0) < 1e-12
    assert imp[0] == max(imp)  # least redundant = most important
    S = 0.7
    rates = rmi_rates(grams, S)
    d = rmi_delta(S)
    assert abs(math.fsum(rates) / 6 - S) <= 1e-12
    assert all(S - d - 1e-15 <= r <= S + d + 1e-15 for r in rates)
    assert rates[0] == pytest.approx(S - d)  # the most important block sits at the lower bound
    # exactly as the LP says: three cheapest-importance blocks at S + d, the others at S - d
    order = sorted(range(6), key=lambda i: imp[i])
    assert all(rates[i] == pytest.approx(S + d) for i in order[:3])
    assert all(rates[i] == pytest.approx(S - d) for i in order[3:])
    # weighted mean with block sizes, and a custom delta
    w = [1.0, 1.0, 2.0, 2.0, 1.0, 1.0]
    rw = rmi_rates(grams, 0.5, delta=0.05, weights=w)
    assert abs(weighted_mean(rw, w) - 0.5) <= 1e-12
    assert all(0.45 - 1e-15 <= r <= 0.55 + 1e-15 for r in rw)
    # bounds are clipped to [0, 1): a tiny target stays non-negative
    small = rmi_rates(grams, 0.005)
    assert min(small) >= 0 and abs(math.fsum(small) / 6 - 0.005) <= 1e-12


def test_linear_rates_spare_the_offset_kinds_and_keep_the_block_mean():
    from losa_deploy.allocation import linear_kind, linear_rates

    sizes = {"attn.q_proj": 4000, "attn.k_proj": 2000, "attn.v_proj": 2000, "mlp.up_proj": 8000}
    r = linear_rates(0.5, sizes, {"k_proj": -0.25, "v_proj": -0.25})
    # k, v at 0.25 (500 weights each); the other 12000 weights hold 8000 - 1000 = 7000: 7/12, in whole weights
    # 2333 (q) and 4667 (up, the largest, which takes the rounding remainder)
    assert r["attn.k_proj"] == r["attn.v_proj"] == 0.25
    assert r["attn.q_proj"] == 2333 / 4000 and r["mlp.up_proj"] == 4667 / 8000
    assert round(sum(r[n] * sizes[n] for n in sizes)) == 8000
    assert linear_rates(0.5, sizes, {}) == {n: 0.5 for n in sizes}
    # an offset below 0 floors at 0 and the rest absorbs it: 0.1 * 16000 pruned among the other 14000 weights
    low = linear_rates(0.1, sizes, {"k_proj": -0.3})
    assert low["attn.k_proj"] == 0.0 and low["attn.q_proj"] == pytest.approx(1600 / 14000, abs=1e-3)
    assert round(sum(low[n] * sizes[n] for n in sizes)) == 1600
    assert linear_kind("model.layers.3.self_attn.k_proj.weight") == "k_proj"


def test_linear_rates_refuse_what_cannot_keep_the_block_rate():
    from losa_deploy.allocation import linear_rates

    with pytest.raises(UserError, match="leave one"):
        linear_rates(0.5, {"a.k_proj": 2, "a.v_proj": 2}, {"k_proj": -0.1, "v_proj": -0.1})
    with pytest.raises(UserError, match="cannot keep a block"):
        linear_rates(0.9, {"a.k_proj": 8, "a.up_proj": 8}, {"k_proj": -0.9})
