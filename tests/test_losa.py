"""LoSA pure parts: masked merge keeps the exact zero pattern, schedules, exact rank rounding."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from losa_deploy.errors import UserError
from losa_deploy.compress.losa.adapter import MaskedLoRA, check_zero_pattern, merge_into, set_rank, unmerge_from
from losa_deploy.compress.losa.ranks import allocate_ranks, uniform_ranks
from losa_deploy.compress.losa.schedule import rank_schedule, sparsity_schedule
from losa_deploy.compress.losa.train import split_slices


@settings(max_examples=40, deadline=None)
@given(out_f=st.integers(1, 24), in_f=st.integers(1, 24), r_max=st.integers(1, 6), seed=st.integers(0, 10_000),
       density=st.floats(0.0, 1.0), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_masked_merge_keeps_exact_zero_pattern(out_f, in_f, r_max, seed, density, dtype):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(out_f, in_f, generator=g) < density
    w = (torch.randn(out_f, in_f, generator=g) * mask).to(dtype)
    a = MaskedLoRA(in_f, out_f, r_max, alpha=16.0, dropout=0.0, mask=mask, generator=g)
    with torch.no_grad():
        a.B.normal_(generator=g)
    a.rank = 1 + seed % r_max
    delta = a.delta().detach()
    assert bool((delta[~mask] == 0).all())
    merge_into(w, a)
    assert bool((w[~mask] == 0).all())  # pruned positions stay exactly zero
    check_zero_pattern(w, mask)
    unmerge_from(w, a)
    assert bool((w[~mask] == 0).all())
    set_rank(w, a, 1 + (seed + 1) % r_max)
    assert bool((w[~mask] == 0).all())


def test_masked_adapter_forward_and_merge_agree():
    torch.manual_seed(0)
    mask = torch.rand(6, 10) > 0.5
    lin = torch.nn.Linear(10, 6, bias=False)
    with torch.no_grad():
        lin.weight.mul_(mask)
    a = MaskedLoRA(10, 6, 4, alpha=8.0, dropout=0.0, mask=mask)
    with torch.no_grad():
        a.B.normal_()
    a.rank = 3
    x = torch.randn(5, 10)
    y_adapter = lin(x) + a(x)
    # hand formula: y = W x + (alpha/r)((B A) ⊙ M) x
    manual = x @ (lin.weight + (8.0 / 3) * (a.B[:, :3] @ a.A[:3]) * mask).T
    torch.testing.assert_close(y_adapter, manual, rtol=1e-5, atol=1e-5)
    merge_into(lin.weight.data, a)
    torch.testing.assert_close(lin(x), manual, rtol=1e-5, atol=1e-5)
    assert bool((lin.weight[~mask] == 0).all())


def test_fused_adapter_equals_hook_form_in_output_and_gradients():
    """Without dropout the adapter is fused into the linear's weight (one matmul); outputs and the gradients of
    A, B and the input must equal those of the two-matmul hook form, enabled or not, and removal restores it."""
    from losa_deploy.compress.losa.adapter import _FusedForward, _hook, attach_adapters

    torch.manual_seed(0)
    mask = torch.rand(6, 10) > 0.5
    results = []
    for fused in (True, False):
        lin = torch.nn.Linear(10, 6, bias=True)
        torch.manual_seed(1)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(6, 10) * mask)
            lin.bias.copy_(torch.randn(6))
        lin.requires_grad_(False)
        aset = attach_adapters({"w": (0, lin)}, r_max=4, alpha=8.0, dropout=0.0, seed=3)
        a = aset.adapters["w"]
        assert isinstance(aset.handles[0], _FusedForward)
        if not fused:  # swap in the hook form on the very same adapter
            aset.remove()
            aset.handles = [lin.register_forward_hook(_hook(a))]
        with torch.no_grad():
            a.mask.copy_(mask)
            a.B.normal_(generator=torch.Generator().manual_seed(5))
        a.rank = 3
        x = torch.randn(7, 10, generator=torch.Generator().manual_seed(9), requires_grad=True)
        y = lin(x)
        (y * torch.arange(6.0)).sum().backward()
        a.enabled = False
        y_off = lin(x).detach()
        results.append((y.detach(), x.grad.clone(), a.A.grad.clone(), a.B.grad.clone(), y_off))
        aset.remove()
        assert "forward" not in lin.__dict__ and not lin._forward_hooks
    for f, h in zip(*results):
        torch.testing.assert_close(f, h, rtol=1e-5, atol=1e-5)
    # dropout keeps the hook form (the adapter reads a dropped-out input)
    lin = torch.nn.Linear(10, 6)
    aset = attach_adapters({"w": (0, lin)}, r_max=4, alpha=8.0, dropout=0.1)
    assert not isinstance(aset.handles[0], _FusedForward) and lin._forward_hooks


def test_set_rank_keeps_function():
    torch.manual_seed(1)
    mask = torch.rand(8, 12) > 0.3
    w = torch.randn(8, 12) * mask
    a = MaskedLoRA(12, 8, 6, alpha=16.0, dropout=0.0, mask=mask)
    with torch.no_grad():
        a.B.normal_()
    a.rank = 5
    before = w + a.delta().detach()
    set_rank(w, a, 2)
    torch.testing.assert_close(w + a.delta().detach(), before, rtol=1e-5, atol=1e-5)
    assert bool((a.B[:, 2:] == 0).all())
    set_rank(w, a, 6)  # re-activated components start from a zero update
    torch.testing.assert_close(w + a.delta().detach(), before, rtol=1e-5, atol=1e-5)


def test_check_zero_pattern_catches_leak():
    mask = torch.tensor([[True, False], [False, True]])
    w = torch.tensor([[1.0, 0.0], [1e-30, 2.0]])
    with pytest.raises(AssertionError):
        check_zero_pattern(w, mask)
    assert check_zero_pattern(torch.tensor([[0.0, 0.0], [0.0, 2.0]]), mask) == 1  # one kept weight is 0 (regrown)


def test_cubic_schedule_hand_values():
    assert [round(s, 3) for s in sparsity_schedule(0.7, 5)] == [0.342, 0.549, 0.655, 0.694, 0.700]
    assert sparsity_schedule(0.7, 5)[-1] == 0.7
    assert sparsity_schedule(0.5, 1) == [0.5]
    with pytest.raises(UserError):
        sparsity_schedule(0.5, 0)


def test_rank_schedule_hand_values():
    assert rank_schedule(6, 10, 5) == [6.0, 7.0, 8.0, 9.0, 10.0]
    assert rank_schedule(6, 10, 1) == [10.0]
    assert rank_schedule(4, 8, 3) == [4.0, 6.0, 8.0]


def test_rank_rounding_hand_case():
    # L=4, Omega=5 -> total 20; ideal 20*e/sum(e) = [2, 4, 6, 8] exactly
    assert allocate_ranks([1, 2, 3, 4], 5, 16) == [2, 4, 6, 8]
    # ideal [1.5, 3, 4.5, 11] with cap 8 -> 8 fixed, rest 12 spread 1:2:3 -> [2, 4, 6] (exact)
    assert allocate_ranks([1, 2, 3, 7.3333333], 5, 8) == [2, 4, 6, 8]
    # remainders: ideal 9 * [1,1,1]/3 = 3 each with L*Omega = 9
    assert allocate_ranks([1, 1, 1], 3, 16) == [3, 3, 3]
    # 10 * [0.5, 0.25, 0.25] over L=3 Omega=10/3 -> [5, 2.5, 2.5]: one .5 goes up (tie -> earlier block)
    assert allocate_ranks([2, 1, 1], 10 / 3, 16) == [5, 3, 2]


def test_rank_floor_and_cap_redistribution():
    # a block with zero error still gets rank 1; what it takes is removed from the others; mean exact
    r = allocate_ranks([0.0, 1.0, 1.0, 1.0], 6, 16)
    assert r[0] == 1 and sum(r) == 24
    r = allocate_ranks([100, 1, 1, 1], 10, 16)
    assert r[0] == 16 and sum(r) == 40 and max(r) <= 16


@settings(max_examples=100, deadline=None)
@given(errs=st.lists(st.floats(0.0, 10.0), min_size=1, max_size=40), cap=st.integers(1, 32), frac=st.floats(0, 1))
def test_rank_rounding_mean_exact_and_caps(errs, cap, frac):
    L = len(errs)
    omega = 1 + round(frac * (cap - 1) * L) / L  # L*omega is an integer in [L, L*cap]
    r = allocate_ranks(errs, omega, cap)
    assert sum(r) == round(L * omega)
    assert all(1 <= x <= cap for x in r)
    if sum(errs) > 0:  # monotone in the error
        order = sorted(range(L), key=lambda i: errs[i])
        assert all(r[order[i]] <= r[order[i + 1]] + 1 for i in range(L - 1))


def test_uniform_ranks_and_errors():
    assert uniform_ranks(4, 8, 16) == [8, 8, 8, 8]
    assert sum(uniform_ranks(3, 7.0, 16)) == 21
    with pytest.raises(UserError):
        allocate_ranks([1, 2], 20, 16)
    with pytest.raises(UserError):
        allocate_ranks([1, 2], 1, 0)


def test_split_slices_disjoint():
    sl = split_slices(10, 3)
    assert sl == [(0, 4), (4, 7), (7, 10)]
    covered = [i for a, b in sl for i in range(a, b)]
    assert covered == list(range(10))


def test_split_slices_weighted_hand_cases():
    """Shares proportional to the weights, largest remainder (ties to the earlier slice), one sample at least.
    cpu-70pct's schedule with power 2: S_t^2 = 0.1167, 0.3012, 0.4293, 0.4822, 0.4900 (sum 1.8194) of 512 samples is
    32.84, 84.76, 120.81, 135.70, 137.90 -> floors 32, 84, 120, 135, 137 (508); the 4 left go to the largest
    remainders .90, .84, .81, .76 (slices 5, 1, 3, 2)."""
    assert split_slices(10, 3, [1, 1, 2]) == [(0, 3), (3, 5), (5, 10)]  # 2.5, 2.5, 5 -> the tie goes to the first
    assert split_slices(10, 3, [0, 0, 1]) == [(0, 1), (1, 2), (2, 10)]  # every step trains on something
    assert split_slices(10, 3, [2, 2, 2]) == split_slices(10, 3)
    shares = [s ** 2 for s in sparsity_schedule(0.7, 5)]
    assert split_slices(512, 5, shares) == [(0, 33), (33, 118), (118, 239), (239, 374), (374, 512)]
    with pytest.raises(ValueError):
        split_slices(10, 3, [1, 2])


def _lr_factors(total: int, **kw) -> list[float]:
    from losa_deploy.compress.losa.train import make_optimizer

    p = torch.nn.Parameter(torch.zeros(1))
    opt, sched = make_optimizer([p], 1.0, total, **kw)
    out = []
    for _ in range(total):
        out.append(round(opt.param_groups[0]["lr"], 6))
        opt.step()
        sched.step()
    return out


def test_lr_schedules_hand_values():
    """10 updates, warmup 0.3 -> 3 warmup updates (1/3, 2/3, 1). linear: decay over the other 7 from the peak;
    wsd with the last step's 4 updates: hold the peak until update 6, then 4/4, 3/4, 2/4, 1/4."""
    third = round(1 / 3, 6)
    assert _lr_factors(10) == [third, round(2 / 3, 6), 1.0] + [round(x / 7, 6) for x in range(7, 0, -1)]
    assert _lr_factors(10, decay_from=6) == [third, round(2 / 3, 6), 1.0, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25]
    assert _lr_factors(10, decay_from=1) == _lr_factors(10)  # a decay cannot start inside the warmup


@pytest.mark.parametrize("kernel", ["torch", "native"])
def test_chunked_head_losses_equal_the_logits_form_in_value_and_gradient(tiny_dir, monkeypatch, kernel):
    """TrainLoss (hidden states, a chunk of tokens at a time, the head's gradient formed in the forward) gives the
    transformers loss ("lm"), the logits-form KL to a teacher ("distill") and that KL plus the normalised MSE of
    every block's output written out from transformers' hidden states ("squarehead"), with the same adapter
    gradients, with padded rows (IGNORE labels, attention 0) and over several chunks (7 tokens each here), with
    PyTorch's ops and with the fused C rows."""
    import copy

    from losa_deploy.compress.losa import head_loss as hl
    from losa_deploy.compress.losa.adapter import attach_adapters
    from losa_deploy.compress.losa.train import IGNORE
    from losa_deploy.models import load_model

    monkeypatch.setattr(hl, "_CHUNK", 7)
    monkeypatch.setenv(hl.HEAD_KERNEL_ENV, kernel)
    m, _ = load_model(str(tiny_dir))
    m.requires_grad_(False)
    teacher = copy.deepcopy(m)
    with torch.no_grad():  # a teacher that differs from the student, including its head
        for p in teacher.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7)) * 0.02)
    linears = {f"{n}.weight": (0, mod) for n, mod in m.named_modules()
               if isinstance(mod, torch.nn.Linear) and n.startswith("model.layers")}
    aset = attach_adapters(linears, r_max=4, alpha=8.0, dropout=0.0, seed=0)
    with torch.no_grad():
        for a in aset.adapters.values():
            a.B.normal_(std=0.05, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(2))
    att = torch.ones_like(ids)
    att[1, 9:] = 0
    labels = ids.clone()
    labels[1, 9:] = IGNORE
    labels[2, :4] = IGNORE
    batch = {"input_ids": ids, "attention_mask": att, "labels": labels}
    assert hl.head_loss_applies(m)

    def distill_ref(b):
        with torch.no_grad():
            t = teacher(input_ids=ids, attention_mask=att, use_cache=False).logits
        return hl.distill_loss(m(input_ids=ids, attention_mask=att, use_cache=False).logits, t, att.bool())

    def squarehead_ref(b):
        with torch.no_grad():
            t = teacher(input_ids=ids, attention_mask=att, use_cache=False, output_hidden_states=True)
        s = m(input_ids=ids, attention_mask=att, use_cache=False, output_hidden_states=True)
        feat = sum(((hs - ht).square().sum(-1) * att).sum() / (ht.square().sum(-1) * att).sum()
                   for hs, ht in zip(s.hidden_states[1:], t.hidden_states[1:]))
        return hl.distill_loss(s.logits, t.logits, att.bool()) + feat

    cases = {"lm": (lambda b: m(**b, use_cache=False).loss, hl.TrainLoss(m, "lm", None, None)),
             "distill": (distill_ref, hl.TrainLoss(m, "distill", teacher, None)),
             "squarehead": (squarehead_ref, hl.TrainLoss(m, "squarehead", teacher, None))}
    for objective, fns in cases.items():
        assert fns[1].form == "chunked-head" and fns[1].kernel == kernel
        grads = []
        for loss_fn in fns:
            for p in aset.parameters():
                p.grad = None
            loss = loss_fn(batch)
            loss.backward()
            grads.append((loss.detach(), [p.grad.clone() for p in aset.parameters()]))
        assert float(grads[0][0]) > 1e-3, objective
        torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-6)
        for ref, new in zip(grads[0][1], grads[1][1]):
            torch.testing.assert_close(ref, new, rtol=1e-4, atol=1e-6)
    aset.remove()
    m.lm_head.weight.requires_grad_(True)  # a trainable head keeps the logits form
    assert not hl.head_loss_applies(m) and hl.TrainLoss(m, "lm", None, None).form == "logits"


@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.bfloat16])
def test_fused_head_rows_match_pytorch_and_ignore_thread_count(teacher_dtype):
    """The C rows (sp_kl_rows / sp_ce_rows) give PyTorch's loss and dLoss/dlogits on a vocabulary that is not a
    multiple of the 16 lanes, with logits far apart (a peaked row) and an ignored row (weight 0: zero gradient);
    one thread and two give the same bits; a target outside the vocabulary is refused."""
    from losa_deploy.compress.losa import head_loss as hl
    from losa_deploy.sparse_cpu import _lib

    g = torch.Generator().manual_seed(3)
    rows, vocab = 9, 1003
    s = torch.randn(rows, vocab, generator=g) * 4
    s[2, 17] = 60.0  # a peaked row: every other probability underflows towards 0
    t = (torch.randn(rows, vocab, generator=g) * 4).to(teacher_dtype)
    valid = torch.ones(rows, dtype=torch.bool)
    valid[4] = False
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[4] = hl.IGNORE
    teacher_w = torch.eye(vocab, dtype=teacher_dtype)  # identity head: the teacher's "hidden" are its logits
    for make in (lambda native: hl.kl_chunks(t, teacher_w, valid, native=native),
                 lambda native: hl.cross_entropy_chunks(targets, native=native)):
        ref, out = s.clone(), s.clone()
        loss_ref, loss = make(False)(0, rows, ref), make(True)(0, rows, out)
        torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-7)
        assert torch.all(out[4] == 0)
        before = _lib.get_threads()
        try:
            _lib.set_threads(1)
            one = s.clone()
            loss_one = make(True)(0, rows, one)
        finally:
            _lib.set_threads(before)
        assert torch.equal(one, out) and torch.equal(loss_one, loss)
    bad = torch.full((rows,), vocab)
    with pytest.raises(RuntimeError, match="code -3"):
        hl.cross_entropy_chunks(bad, native=True)(0, rows, s.clone())


def test_head_kernel_setting(monkeypatch):
    from losa_deploy.compress.losa import head_loss as hl
    from losa_deploy.errors import UserError

    monkeypatch.setenv(hl.HEAD_KERNEL_ENV, "torch")
    assert hl.head_kernel() == "torch"
    monkeypatch.setenv(hl.HEAD_KERNEL_ENV, "native")
    assert hl.head_kernel() == "native"  # CI and every supported machine have a C compiler
    monkeypatch.setenv(hl.HEAD_KERNEL_ENV, "cuda")
    with pytest.raises(UserError, match="LOSA_DEPLOY_HEAD_KERNEL"):
        hl.head_kernel()
    # a library that cannot be built: auto falls back to PyTorch (once, not at every slice), native says why
    from losa_deploy.sparse_cpu import _lib

    calls = []

    def no_compiler(path=None):
        calls.append(1)
        raise UserError("no C compiler 'gcc' found")

    monkeypatch.setattr(_lib, "load", no_compiler)
    monkeypatch.setattr(hl, "_AUTO_FAILED", False)
    monkeypatch.setenv(hl.HEAD_KERNEL_ENV, "auto")
    assert hl.head_kernel() == "torch" and hl.head_kernel() == "torch" and len(calls) == 1
    monkeypatch.setenv(hl.HEAD_KERNEL_ENV, "native")
    with pytest.raises(UserError, match="no C compiler"):
        hl.head_kernel()


def test_hidden_mse_hand_case():
    """Two layers, one padded position: layer 1 err 1 / energy 4, layer 2 err 0 / energy 1 -> 0.25."""
    from losa_deploy.compress.losa.head_loss import hidden_mse

    t1 = torch.tensor([[[2.0, 0.0], [0.0, 0.0], [9.0, 9.0]]])
    s1 = torch.tensor([[[2.0, 1.0], [0.0, 0.0], [0.0, 0.0]]])  # the last position is padding: its error is ignored
    t2 = torch.tensor([[[1.0, 0.0], [0.0, 0.0], [5.0, 5.0]]])
    valid = torch.tensor([[True, True, False]])
    assert float(hidden_mse([s1, t2], [t1, t2], valid)) == pytest.approx(0.25)


def test_low_precision_base_matches_the_fp32_form_under_autocast():
    """Inside AdapterSet.training(bf16) a fused linear reads bf16 copies of its base weight and mask made once;
    under bf16 autocast it gives the fp32 form's output and adapter gradients up to bf16 rounding, and the copies
    are gone on exit (outside training, or without autocast, the fp32 form runs)."""
    from losa_deploy.compress.losa.adapter import attach_adapters

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=False)
    mask = torch.rand(48, 64) > 0.6
    with torch.no_grad():
        lin.weight.mul_(mask)
    lin.requires_grad_(False)
    aset = attach_adapters({"w": (0, lin)}, r_max=8, alpha=16.0, dropout=0.0, seed=3)
    a = aset.adapters["w"]
    with torch.no_grad():
        a.mask.copy_(mask)
        a.B.normal_(std=0.1, generator=torch.Generator().manual_seed(5))
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(9))
    out = []
    for lp in (False, True):
        a.A.grad = a.B.grad = None
        ctx = aset.training(torch.bfloat16 if lp else None)
        with ctx, torch.autocast("cpu", dtype=torch.bfloat16):
            assert (a.base_lp is not None) == lp
            y = lin(x)
            (y.float() * torch.linspace(-1, 1, 48)).sum().backward()
        out.append((y.float().detach(), a.A.grad.clone(), a.B.grad.clone()))
        assert a.base_lp is None and not a.training
    for ref, new in zip(*out):
        torch.testing.assert_close(new, ref, rtol=0.03, atol=0.03 * float(ref.abs().max()))
