"""The oneDNN routing of float32 CPU linears: same numbers, only where autograd is not involved, opt-out works."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from losa_deploy.cpu_gemm import cpu_gemm, gram, onednn_usable, resolve_cpu_gemm
from losa_deploy.errors import UserError

needs_onednn = pytest.mark.skipif(not onednn_usable(), reason="this PyTorch build has no usable oneDNN linear")


def _ops(fn) -> set[str]:
    with torch.profiler.profile() as prof:
        fn()
    return {e.key for e in prof.key_averages()}


@needs_onednn
def test_inference_linear_is_routed_and_agrees(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOSA_DEPLOY_CPU_GEMM", raising=False)
    torch.manual_seed(0)
    lin = nn.Linear(96, 80)
    x = torch.randn(2, 33, 96)
    with torch.no_grad():
        ref = nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double())
        with cpu_gemm() as kind:
            assert kind == "onednn"
            y = lin(x)
            ops = _ops(lambda: lin(x))
    assert "mkldnn::_linear_pointwise" in ops
    assert y.dtype == torch.float32 and y.shape == (2, 33, 80)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_autograd_and_autocast_keep_the_default_path() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    x = torch.randn(4, 64)
    with cpu_gemm("onednn"):
        assert "mkldnn::_linear_pointwise" not in _ops(lambda: lin(x).sum().backward())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = lin(x)
    assert lin.weight.grad is not None and y.dtype == torch.bfloat16


def test_default_and_bad_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    lin = nn.Linear(16, 8)
    with torch.no_grad(), cpu_gemm("default") as kind:
        assert kind == "default"
        assert "mkldnn::_linear_pointwise" not in _ops(lambda: lin(torch.randn(3, 16)))
    monkeypatch.setenv("LOSA_DEPLOY_CPU_GEMM", "fast")
    with pytest.raises(UserError, match="LOSA_DEPLOY_CPU_GEMM"):
        resolve_cpu_gemm()
    monkeypatch.setenv("LOSA_DEPLOY_CPU_GEMM", "default")
    assert resolve_cpu_gemm() == "default"


@needs_onednn
def test_gram_matches_inside_and_outside() -> None:
    torch.manual_seed(0)
    x = torch.randn(300, 48)
    ref = x.double().T @ x.double()
    torch.testing.assert_close(gram(x).double(), ref, rtol=1e-5, atol=1e-3)
    with cpu_gemm("onednn"):
        g = gram(x)
        assert "mkldnn::_linear_pointwise" in _ops(lambda: gram(x))
    torch.testing.assert_close(g.double(), ref, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(g, g.T)


def test_machine_rate_probes_report_the_fastest_kernel() -> None:
    from losa_deploy.bench.bounds import measure_bandwidth, measure_peak_flops

    fl = measure_peak_flops(1, n=128, repeats=1)
    assert fl["flops_per_s"] == max(fl["by_kernel"].values()) > 0
    assert "torch.mm" in fl["by_kernel"] and ("onednn" in fl["by_kernel"]) == onednn_usable()
    bw = measure_bandwidth(nbytes=8 * 2**20, repeats=1, threads=1)
    assert bw["bytes_per_s"] == max(bw["by_probe"].values()) > 0 and {"copy", "read"} <= set(bw["by_probe"]) <= {"copy", "read", "sparse-cpu dense gemv"}
