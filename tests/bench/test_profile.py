"""The profile summary (bench/profile.py): phases and kinds of work, on the CPU for real and on made-up GPU events."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType
from torch.autograd.profiler_util import Kernel

from internvl_tune.bench.profile import describe, kind_of, profile_step, summarize


@pytest.mark.parametrize("name, kind", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off", "matmul"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNN", "matmul"),
    ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8>", "matmul"),
    ("void flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>, true>", "attention"),
    ("fmha_cutlassF_bf16_aligned_64x128_rf_sm80", "attention"),
    ("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0", "fused"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>", "elementwise"),
    ("void at::native::multi_tensor_apply_kernel<at::native::FusedAdamMathFunctor>", "optimizer"),
    ("Memcpy HtoD (Pinned -> Device)", "copy"),
    ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", "communication"),
    ("aten::mm", "matmul"), ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("aten::copy_", "copy"), ("aten::mul", "elementwise"), ("something new", "other"),
])
def test_kernel_kinds(name, kind):
    assert kind_of(name) == kind


def _launch(kernel: str, us: float, *ranges: str):
    parent = None
    for name in reversed(ranges):  # outermost last in the chain
        parent = SimpleNamespace(name=name, cpu_parent=parent)
    return SimpleNamespace(name="cudaLaunchKernel", device_type=DeviceType.CPU, cpu_parent=parent,
                           kernels=[Kernel(kernel, 0, us)], self_cpu_time_total=1.0)


def test_gpu_events_by_phase_kind_and_the_recompute_estimate():
    """The GPU path on made-up events: kernels credited to the CPU op that launched them, phase from its ranges."""
    backward = "autograd::engine::evaluate_function: MmBackward0"
    events = [
        _launch("sm90_gemm_fwd", 300.0, "aten::mm", "aten::linear"),
        _launch("flash_fwd_kernel", 100.0, "aten::_flash_attention_forward"),
        _launch("sm90_gemm_bwd", 900.0, "aten::mm", "MmBackward0", backward),
        _launch("triton_poi_fused_mul_0", 50.0, "CompiledFunctionBackward", backward),
        _launch("multi_tensor_apply_kernel<FusedAdam>", 40.0, "aten::_fused_adamw_", "Optimizer.step#AdamW.step"),
        SimpleNamespace(name="sm90_gemm_fwd", device_type=DeviceType.CUDA, kernels=[], cpu_parent=None),  # no double count
    ]
    s = summarize(events, cuda=True, wall_s=0.002, forward_flops=3e9, backward_flops=6e9)
    assert s["phases"]["forward"]["by_kind_ms"] == {"matmul": 0.3, "attention": 0.1}
    assert s["phases"]["backward"]["by_kind_ms"] == {"matmul": 0.9, "fused": 0.05}
    assert s["phases"]["optimizer"]["ms"] == pytest.approx(0.04)
    assert s["busy_ms"] == pytest.approx(1.39) and s["share_by_kind"]["matmul"] == pytest.approx(1.2 / 1.39)
    # forward: 0.3 ms for 3 GFLOP; the backward's 6 GFLOP would take 0.6 ms: 0.3 ms more is recomputation
    assert s["recompute"]["recompute_matmul_ms"] == pytest.approx(0.3)
    assert s["recompute"]["share_of_backward"] == pytest.approx(0.3 / 0.95)
    assert s["top"][0]["name"] == "sm90_gemm_bwd" and s["top"][0]["phase"] == "backward"
    assert "recompute ~32% of the backward" in describe(s)


def test_a_real_cpu_step_has_all_three_phases():
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randn(8, 16)

    def step():
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()

    s = profile_step(step, torch.device("cpu"), {"first": model[0]})
    assert all(s["phases"][p]["ms"] > 0 for p in ("forward", "backward", "optimizer"))
    assert s["phases"]["forward"]["by_kind_ms"]["matmul"] > 0 and s["phases"]["backward"]["by_kind_ms"]["matmul"] > 0
    regions = s["forward_regions"]
    assert set(regions) == {"first", "other"} and regions["first"] > 0  # the second Linear and the sum: other
    assert sum(regions.values()) == pytest.approx(s["phases"]["forward"]["ms"])
    assert not model[0]._forward_hooks and not model[0]._forward_pre_hooks  # the marks are removed
