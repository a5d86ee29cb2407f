"""Hand-computed checks of pruning scores, masks and SparseGPT (no model, no I/O)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from losa_deploy.errors import UserError
from losa_deploy.pruning import (
    Pattern,
    magnitude_scores,
    mask_from_scores,
    mixed_n_per_block,
    nm_mask,
    parse_pattern,
    prune_count,
    sparsegpt_prune,
    unstructured_row_mask,
    wanda_scores,
)

# ------------------------------------------------------------------------------------------- scores


def test_magnitude_and_wanda_scores_by_hand():
    w = torch.tensor([[1.0, -2.0, 3.0], [-4.0, 5.0, -6.0]], dtype=torch.bfloat16)
    assert magnitude_scores(w).dtype == torch.float32
    assert torch.equal(magnitude_scores(w), torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
    # sum_t x_tj^2 = [4, 9, 0] -> norms [2, 3, 0]; a -1e-9 round-off is clamped, not NaN
    sq = torch.tensor([4.0, 9.0, -1e-9])
    expected = torch.tensor([[2.0, 6.0, 0.0], [8.0, 15.0, 0.0]])
    assert torch.allclose(wanda_scores(w, sq), expected)
    # Wanda's scaler_row (sum / n_tokens) ranks identically within rows
    a = unstructured_row_mask(wanda_scores(w, sq), 0.34)
    b = unstructured_row_mask(wanda_scores(w, sq / 7.0), 0.34)
    assert torch.equal(a, b)
    with pytest.raises(ValueError):
        wanda_scores(w, torch.ones(4))


# --------------------------------------------------------------------------------------- row masks


def test_unstructured_row_mask_by_hand():
    scores = torch.tensor(
        [
            [5.0, 1.0, 4.0, 2.0, 3.0],
            [0.1, 0.5, 0.3, 0.2, 0.4],
            [7.0, 7.0, 7.0, 7.0, 7.0],  # all tied: lowest indices are pruned first, exactly 2
        ]
    )
    # the layer prunes round(0.5 * 15) = 8: 2 per row, and the 2 left over go to the rows whose third-lowest
    # score is lowest (row 1: 0.3, row 0: 3.0; row 2's is 7.0)
    mask = unstructured_row_mask(scores, 0.5)
    expected = torch.tensor(
        [
            [True, False, True, False, False],
            [False, True, False, False, True],
            [False, False, True, True, True],
        ]
    )
    assert mask.dtype == torch.bool
    assert torch.equal(mask, expected)
    assert torch.equal(unstructured_row_mask(scores, 0.0), torch.ones_like(mask))
    assert not unstructured_row_mask(scores, 1.0).any()


def test_prune_count_is_robust_to_float_round_off():
    # 0.7 * 10 = 7.000000000000001 and 0.57 * 100 = 56.99999999999999 in binary floating point
    assert prune_count(0.7, 10) == 7
    assert prune_count(0.57, 100) == 57
    assert prune_count(0.3, 10) == 3
    assert prune_count(0.5, 5) == 2
    z = torch.zeros(3, 100)  # all tied at zero: a threshold would prune everything
    assert int((~unstructured_row_mask(z, 0.57)).sum(dim=1).unique()) == 57


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 6),
    cols=st.integers(1, 40),
    s=st.floats(0.0, 1.0),
    seed=st.integers(0, 10_000),
)
def test_row_mask_prunes_exact_count_even_with_ties(rows, cols, s, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 3, (rows, cols), generator=g).float()  # many ties
    mask = unstructured_row_mask(scores, s)
    k = math.floor(s * cols + 1e-9)
    per_row = (~mask).sum(dim=1)
    assert int(per_row.sum()) == math.floor(s * rows * cols + 0.5 + 1e-9)  # the layer is exact
    assert bool(((per_row == k) | (per_row == k + 1)).all())  # each row within one weight of s * cols
    # every pruned score <= every kept score in its row
    for r in range(rows):
        if 0 < int(per_row[r]) < cols:
            assert scores[r][~mask[r]].max() <= scores[r][mask[r]].min()


# --------------------------------------------------------------------------------------------- N:M


def test_two_four_on_a_hand_written_4x8_matrix():
    scores = torch.tensor(
        [
            [1.0, 9.0, 3.0, 2.0, 8.0, 7.0, 1.0, 0.5],
            [4.0, 3.0, 2.0, 1.0, 1.0, 2.0, 3.0, 4.0],
            [0.0, 0.0, 5.0, 0.0, 6.0, 6.0, 6.0, 6.0],  # ties: the lower index is pruned first
            [-1.0, -2.0, -3.0, -4.0, 10.0, -10.0, 0.0, 0.1],
        ]
    )
    T, F = True, False
    expected = torch.tensor(
        [
            [F, T, T, F, T, T, F, F],
            [T, T, F, F, F, F, T, T],
            [F, F, T, T, F, F, T, T],
            [T, T, F, F, T, F, F, T],
        ]
    )
    mask = nm_mask(scores, 2, 4)
    assert torch.equal(mask, expected)
    assert torch.equal(mask_from_scores(scores, 0.123, Pattern("nm", 2, 4)), expected)
    # NVIDIA convention: N counts kept weights. 1:4 keeps one, 3:4 keeps three.
    assert torch.equal(nm_mask(scores, 1, 4).reshape(4, 2, 4).sum(-1), torch.ones(4, 2, dtype=torch.long))
    assert torch.equal(nm_mask(scores, 3, 4).reshape(4, 2, 4).sum(-1), torch.full((4, 2), 3))
    assert torch.equal(nm_mask(scores, 3, 4)[0], torch.tensor([F, T, T, T, T, T, T, F]))
    assert not nm_mask(scores, 0, 4).any() and nm_mask(scores, 4, 4).all()


def test_nm_requires_divisible_inputs_and_names_the_layer():
    with pytest.raises(UserError, match=r"model\.layers\.3\.mlp\.down_proj.*4x10.*2:4"):
        nm_mask(torch.rand(4, 10), 2, 4, name="model.layers.3.mlp.down_proj")
    with pytest.raises(UserError, match="4x10"):
        mask_from_scores(torch.rand(4, 10), 0.5, parse_pattern("2:4"))
    with pytest.raises(UserError):
        nm_mask(torch.rand(4, 8), 5, 4)


def test_parse_pattern():
    assert parse_pattern("2:4") == Pattern("nm", 2, 4)
    assert parse_pattern(" 4:8 ") == Pattern("nm", 4, 8)
    assert parse_pattern("mixed:8") == Pattern("mixed", 0, 8)
    assert parse_pattern("Unstructured") == Pattern("unstructured", 0, 0)
    assert str(parse_pattern("2:4")) == "2:4" and str(parse_pattern("mixed:8")) == "mixed:8"
    assert parse_pattern("2:4").fixed_sparsity == 0.5
    for bad in ["", "2", "5:4", "-1:4", "0:4", "4:4", "a:b", "2:0", "mixed:x", "mixed:1", "2:4:8", "sparse"]:
        with pytest.raises(UserError):
            parse_pattern(bad)


def test_mask_from_scores_mixed_uses_the_block_n():
    scores = torch.rand(3, 16)
    m = mask_from_scores(scores, 0.0, Pattern("mixed", 0, 8), n=3)
    assert torch.equal(m.reshape(3, 2, 8).sum(-1), torch.full((3, 2), 3))
    # without n, the rate must mean a whole N: 0.75 of 8 -> N = 2
    m2 = mask_from_scores(scores, 0.75, Pattern("mixed", 0, 8))
    assert torch.equal(m2, nm_mask(scores, 2, 8))
    with pytest.raises(UserError):
        mask_from_scores(scores, 0.7, Pattern("mixed", 0, 8))
    u = mask_from_scores(scores, 0.5, Pattern("unstructured"))
    assert torch.equal(u, unstructured_row_mask(scores, 0.5))


# ---------------------------------------------------------------------------------------- mixed N:M


def test_mixed_n_per_block_by_hand():
    # ideal N = (1 - r) * 8 = 3.2, 2.4, 1.6, 0.8; 0.8 is below the floor of 1, so a common shift t
    # with 3*(x+t) summed + 1 = 8 gives t = -1/15: 3.133, 2.333, 1.533, 1 -> floors 3, 2, 1, 1 (sum 7)
    # and the one missing unit goes to the largest remainder (1.533): [3, 2, 2, 1], mean N = 2 = 8 * 0.25.
    assert mixed_n_per_block([0.6, 0.7, 0.8, 0.9], 8, 0.75) == [3, 2, 2, 1]
    # uniform rates with a non-integer ideal: largest remainder, ties to earlier (shallower) blocks
    assert mixed_n_per_block([0.7] * 5, 8, 0.7) == [3, 3, 2, 2, 2]  # 5 * 8 * 0.3 = 12
    # rates whose mean is not exactly the target are shifted to meet it
    ns = mixed_n_per_block([0.5, 0.5, 0.9, 0.9], 8, 0.75)
    assert sum(ns) == 8 and ns[0] >= ns[2]


def test_mixed_n_per_block_unreachable_targets_say_what_works():
    # 3 blocks * 8 * (1 - 0.7) = 7.2 kept per group-slot is not an integer
    with pytest.raises(UserError, match=r"0\.708333 or 0\.666667"):
        mixed_n_per_block([0.7, 0.7, 0.7], 8, 0.7)
    # at least 1 of 8 kept in every block: sparsity above 7/8 is unreachable
    with pytest.raises(UserError, match="reachable range"):
        mixed_n_per_block([0.95] * 4, 8, 0.9375)
    assert mixed_n_per_block([0.95] * 4, 8, 0.9375, min_n=0) == [1, 1, 0, 0]


def test_mixed_n_per_block_with_block_weights():
    ns = mixed_n_per_block([0.6, 0.8, 0.8], 8, 0.75, weights=[2.0, 1.0, 1.0])
    assert sum(w * n for w, n in zip([2, 1, 1], ns)) == 8 and ns == [3, 1, 1]
    # budget (1 - 0.85) * 8 * (3 + 2) = 6 = 3a + 2b has no solution with a, b >= 1
    with pytest.raises(UserError, match=r"block sizes; nearest reachable targets: 0\.875 or 0\.825"):
        mixed_n_per_block([0.85, 0.85], 8, 0.85, weights=[3.0, 2.0])


@settings(max_examples=40, deadline=None)
@given(data=st.data(), L=st.integers(1, 8), m=st.sampled_from([4, 8]))
def test_mixed_n_weighted_budget_is_met_whenever_reachable(data, L, m):
    """Block sizes differ (e.g. --ignore on some blocks): any reachable target is met exactly."""
    w = data.draw(st.lists(st.integers(1, 5), min_size=L, max_size=L))
    n_star = data.draw(st.lists(st.integers(1, m), min_size=L, max_size=L))
    budget = sum(a * b for a, b in zip(w, n_star))
    target = 1.0 - budget / (m * sum(w))
    rates = data.draw(st.lists(st.floats(0.0, 0.95), min_size=L, max_size=L))
    ns = mixed_n_per_block(rates, m, target, weights=[float(x * 1000) for x in w])
    assert sum(a * b for a, b in zip(w, ns)) == budget
    assert all(1 <= n <= m for n in ns)


@settings(max_examples=40, deadline=None)
@given(
    L=st.integers(1, 40),
    m=st.sampled_from([4, 8, 16]),
    k=st.integers(0, 10_000),
    seed=st.integers(0, 10_000),
)
def test_mixed_n_mean_is_exact_property(L, m, k, seed):
    total = L + k % (L * (m - 1) + 1)  # an integer total kept in [L, L*m]
    target = 1.0 - total / (L * m)
    g = torch.Generator().manual_seed(seed)
    rates = (target + 0.1 * (torch.rand(L, generator=g) - 0.5)).clamp(0, 0.999).tolist()
    ns = mixed_n_per_block(rates, m, target)
    assert sum(ns) == total
    assert all(1 <= n <= m for n in ns)


# ---------------------------------------------------------------------------------------- SparseGPT


def _spd(k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(k, k, generator=g, dtype=torch.float64)
    return a @ a.T + 0.5 * torch.eye(k, dtype=torch.float64)


def test_sparsegpt_matches_obs_for_the_first_column():
    """Pruning w_0 of a 1xK row: the update must be OBS's -H^-1 e_q w_q / [H^-1]_qq."""
    K = 5
    H = _spd(K, 0)
    w = torch.tensor([[0.01, 1.0, -2.0, 1.5, 3.0]], dtype=torch.float64)
    new, mask, info = sparsegpt_prune(w.float(), H.float(), 0.2, percdamp=0.0)
    assert mask.tolist() == [[False, True, True, True, True]]
    Hinv = torch.linalg.inv(H)
    expected = w[0] - Hinv[:, 0] * w[0, 0] / Hinv[0, 0]
    assert expected[0].abs() < 1e-12
    assert torch.allclose(new[0].double(), expected, atol=1e-5)
    assert new[0, 0] == 0 and info["damping_retries"] == 0 and info["dead_inputs"] == 0
    # OBS loss estimate: w_q^2 / [H^-1]_qq / 2
    assert math.isclose(info["obs_loss"], float(w[0, 0] ** 2 / Hinv[0, 0] / 2), rel_tol=1e-4)


def test_sparsegpt_later_column_is_obs_over_the_remaining_columns_across_tiles():
    """Pruning column q: earlier columns are frozen, later ones get the OBS update of the sub-problem.

    blocksize=2 makes the update of columns 2..5 go through the between-tile path Err @ U.
    """
    K, q = 6, 1
    H = _spd(K, 1)
    w = torch.tensor([[2.0, 0.01, -1.0, 1.5, 3.0, -2.5]], dtype=torch.float64)
    new, mask, _ = sparsegpt_prune(w.float(), H.float(), 1 / 6, blocksize=2, percdamp=0.0)
    assert mask.tolist() == [[True, False, True, True, True, True]]
    sub_inv = torch.linalg.inv(H[q:, q:])
    expected = w[0].clone()
    expected[q:] -= sub_inv[:, 0] * w[0, q] / sub_inv[0, 0]
    assert torch.allclose(new[0].double(), expected, atol=1e-5)
    # and it is the least-squares optimum: the update minimises d^T H d with d_q = -w_q, d_{<q} = 0
    d = (new[0].double() - w[0])
    d_free = d[q + 1 :].clone().requires_grad_(True)
    full = torch.cat([d[: q + 1], d_free])
    (full @ H @ full).backward()
    assert d_free.grad.abs().max() < 1e-4


def test_sparsegpt_with_identity_hessian_is_magnitude_pruning():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, 160, generator=g)  # two tiles of 128 and 32 columns
    new, mask, info = sparsegpt_prune(W, torch.eye(160), 0.6)
    assert torch.equal(mask, unstructured_row_mask(W.abs(), 0.6))
    assert torch.equal(new, W * mask)  # kept weights untouched
    new24, mask24, _ = sparsegpt_prune(W, torch.eye(160), 0.0, n=2, m=4)
    assert torch.equal(mask24, nm_mask(W.abs(), 2, 4))
    assert torch.equal(new24, W * mask24)


def _correlated_inputs(tokens: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g) / math.sqrt(dim)
    scale = torch.exp(torch.randn(dim, generator=g))  # uneven feature scales, as in LLM activations
    return (torch.randn(tokens, dim, generator=g) @ mix) * scale


@pytest.mark.parametrize("row_budget", ["adaptive", "refresh", "even"])
def test_sparsegpt_rows_are_exact_and_beat_wanda_and_magnitude(row_budget):
    X = _correlated_inputs(512, 160, 3)  # [tokens, in]; 160 = one full tile of 128 + a partial one
    g = torch.Generator().manual_seed(4)
    W = torch.randn(48, 160, generator=g, dtype=torch.float32).to(torch.bfloat16)
    H = (2.0 / X.shape[0]) * X.T @ X
    Wf = W.float()

    def out_err(Wp: torch.Tensor) -> float:
        return float(((Wf - Wp.float()) @ X.T).norm())

    for s in (0.5, 0.7):
        new, mask, info = sparsegpt_prune(W, H, s, row_budget=row_budget)
        assert new.dtype == torch.bfloat16 and new.shape == W.shape
        k = math.floor(s * 160 + 1e-9)
        assert torch.equal((~mask).sum(dim=1), torch.full((48,), k))
        assert (new[~mask] == 0).all()
        wanda = Wf * unstructured_row_mask(wanda_scores(Wf, (X**2).sum(0)), s)
        mag = Wf * unstructured_row_mask(magnitude_scores(Wf), s)
        e_sgpt, e_wanda, e_mag = out_err(new), out_err(wanda), out_err(mag)
        assert e_sgpt < 0.95 * e_wanda and e_sgpt < e_mag, (s, e_sgpt, e_wanda, e_mag)

    new, mask, _ = sparsegpt_prune(W, H, 0.0, n=2, m=4)
    assert torch.equal(mask.reshape(48, 40, 4).sum(-1), torch.full((48, 40), 2))
    wanda24 = Wf * nm_mask(wanda_scores(Wf, (X**2).sum(0)), 2, 4)
    assert out_err(new) < out_err(wanda24)


def test_sparsegpt_dead_inputs_and_inputs_not_modified():
    g = torch.Generator().manual_seed(5)
    X = torch.randn(64, 8, generator=g)
    X[:, 3] = 0.0  # an input never active during calibration
    H = (2.0 / 64) * X.T @ X
    W = torch.randn(4, 8, generator=g)
    W0, H0 = W.clone(), H.clone()
    new, mask, info = sparsegpt_prune(W, H, 0.25)
    assert torch.equal(W, W0) and torch.equal(H, H0)
    assert info["dead_inputs"] == 1
    assert (new[:, 3] == 0).all()
    assert torch.equal((~mask).sum(1), torch.full((4,), 2))
    assert not mask[:, 3].any()  # a zero weight has the lowest saliency, so it is pruned first


def test_sparsegpt_retries_cholesky_with_more_damping():
    H = torch.tensor([[1.0, 3.0], [3.0, 1.0]])  # indefinite: eigenvalues 4 and -2
    W = torch.tensor([[1.0, -0.5], [0.3, 2.0]])
    new, mask, info = sparsegpt_prune(W, H, 0.5)
    # damping 0.01, 0.1 and 1 x mean(diag H) leave it indefinite; 10 makes it positive definite
    assert info["damping_retries"] == 3 and math.isclose(info["damp"], 10.0)
    assert torch.isfinite(new).all()
    with pytest.raises(UserError, match="could not factor the Hessian for q_proj"):
        sparsegpt_prune(W, H, 0.5, max_retries=1, name="q_proj")
    with pytest.raises(UserError, match="NaN"):
        sparsegpt_prune(W, torch.full((2, 2), float("nan")), 0.5)
    with pytest.raises(UserError, match="2x6 cannot be pruned 2:4"):
        sparsegpt_prune(torch.ones(2, 6), torch.eye(6), 0.5, n=2, m=4)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 5),
    cols=st.integers(1, 40),
    blocksize=st.sampled_from([3, 8, 128]),
    s=st.floats(0.0, 1.0),
    budget=st.sampled_from(["adaptive", "refresh", "even"]),
    seed=st.integers(0, 1000),
)
def test_sparsegpt_row_counts_are_exact_property(rows, cols, blocksize, s, budget, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(3 * cols + 2, cols, generator=g)
    H = (2.0 / X.shape[0]) * X.T @ X
    W = torch.randn(rows, cols, generator=g)
    new, mask, _ = sparsegpt_prune(W, H, s, blocksize=blocksize, row_budget=budget)
    k = math.floor(s * cols + 1e-9)
    per_row = (~mask).sum(dim=1)
    assert bool(((per_row == k) | (per_row == k + 1)).all())
    assert int(per_row.sum()) == math.floor(s * rows * cols + 0.5 + 1e-9)
    assert (new[~mask] == 0).all() and torch.isfinite(new).all()


def test_sparsegpt_reference_tile_mode_counts_per_tile():
    g = torch.Generator().manual_seed(7)
    X = torch.randn(100, 20, generator=g)
    W = torch.randn(6, 20, generator=g)
    _, mask, _ = sparsegpt_prune(W, (2.0 / 100) * X.T @ X, 0.5, blocksize=8, row_budget="tile")
    # tiles of 8, 8, 4 columns: floor(0.5 * 6 * width) pruned in each, rows free to differ
    assert [int((~mask[:, a:b]).sum()) for a, b in [(0, 8), (8, 16), (16, 20)]] == [24, 24, 12]
    with pytest.raises(UserError, match="damping"):
        sparsegpt_prune(W, torch.eye(20), 0.5, percdamp=-1.0)
