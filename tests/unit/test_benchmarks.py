"""The benchmark table's arithmetic (benchmarks/report.py, toolkit/train/metrics.py) and a CPU smoke run of the
training benchmark (the GPU numbers themselves come from benchmarks/run_gpu_matrix.sh)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.profiling import busy_and_gaps, kernel_kind, summarize_events
from benchmarks.report import _floor, card, card_suffix, fa4_rates, generate_table, train_table
from toolkit.model import resolve_dit_config
from toolkit.train.metrics import (
    ATTENTION_FORWARD_BACKWARD_RATE,
    ATTENTION_FORWARD_RATE,
    MATMUL_RATE,
    kernel_floor_seconds,
    sample_flops,
)

ROOT = Path(__file__).resolve().parents[2]


def test_kernel_floor_by_hand():
    flops = sample_flops(resolve_dit_config("2B"), 84_480)
    attention = 4 * 84_480**2 * 2048 * 28 + 4 * 84_480 * 512 * 2048 * 28
    linear = 2 * 14 * 2048**2 * 28 * 84_480
    assert kernel_floor_seconds(flops, "forward") == pytest.approx(attention / ATTENTION_FORWARD_RATE + linear / MATMUL_RATE)
    assert kernel_floor_seconds(flops, "lora") == pytest.approx(3.5 * attention / ATTENTION_FORWARD_BACKWARD_RATE + 2 * linear / MATMUL_RATE)
    assert kernel_floor_seconds(flops, "full") > kernel_floor_seconds(flops, "lora")
    assert 10.0 < kernel_floor_seconds(flops, "lora") < 11.5  # 2B 720p: attention-bound, ~10.9 s per sample


def _row(gpu, world, seconds, **extra):
    return {"mode": "lora", "size": "2B", "resolution": "720", "tokens": 84_480, "dp": 1, "sp": world, "world_size": world,
            "zero_stage": 2, "checkpointing": "selective", "attention_backend": "cudnn", "median_s_per_iter": seconds,
            "samples_per_s": 1 / seconds, "tokens_per_s_per_gpu": 84_480 / seconds / world, "mfu": 0.4, "first_loss": 1.0,
            "gpu": gpu, **extra}


def test_cards_scaling_and_ceiling_fraction():
    assert card("NVIDIA H100 80GB HBM3") == "H100" and card("NVIDIA H200") == "H200" and card(None) == "cpu"
    assert card_suffix("NVIDIA H100 80GB HBM3") == "" and card_suffix("NVIDIA H200") == "_h200"
    floor = kernel_floor_seconds(sample_flops(resolve_dit_config("2B"), 84_480), "lora")
    rows = [_row("NVIDIA H100 80GB HBM3", 1, 12.0), _row("NVIDIA H100 80GB HBM3", 2, 6.25),
            _row("NVIDIA H200", 2, 6.0, compile="elementwise"), _row("NVIDIA H100 80GB HBM3", 1, 11.0, attention_backend="fa4"),
            _row("NVIDIA H100 80GB HBM3", 2, 5.0, attention_backend="fa4"),
            _row("NVIDIA H100 80GB HBM3", 4, 12.5, sp=1, dp=4, samples_per_s=4 / 12.5, tag="dp")]
    assert _floor(rows[0], "train") == pytest.approx(floor / 12.0)
    lines = train_table(rows)
    h100_sp2 = next(line for line in lines if line.startswith("| H100") and "| 2 | 2 |" in line and "| cudnn |" in line)
    assert "| 96% |" in h100_sp2  # 12.0 / (2 x 6.25): scaling against the same card's (and compile's) 1-GPU row
    fa4_sp2 = next(line for line in lines if line.startswith("| H100") and "| 2 | 2 |" in line and "| fa4 |" in line)
    assert "| 110% |" in fa4_sp2  # 11.0 / (2 x 5.0): and the same attention kernel's
    dp = next(line for line in lines if line.endswith("| dp |"))
    assert "| 96% |" in dp  # 4 samples per 12.5 s on 4 GPUs against one per 12.0 s on one: per sample
    h200 = next(line for line in lines if line.startswith("| H200"))
    assert "| elementwise |" in h200 and h200.split("|")[16].strip() == "-"  # no H200 1-GPU row: no scaling figure
    assert not any("†" in line for line in lines)


def test_scaling_falls_back_to_another_compile_mode_of_the_same_zero_stage_marked():
    h100 = "NVIDIA H100 80GB HBM3"
    rows = [_row(h100, 1, 12.0, compile="elementwise"), _row(h100, 1, 6.0, compile="none", zero_stage=3),
            _row(h100, 4, 2.5, compile="block")]
    lines = train_table(rows)
    block = next(line for line in lines if "| block |" in line)
    assert "| 120%† |" in block  # 12.0 / (4 x 2.5): the ZeRO-2 elementwise row, not the faster ZeRO-3 one
    assert any(line.startswith("† against the fastest 1-GPU row") for line in lines)


def test_a_block_row_that_captured_no_graph_shows_and_scales_as_eager():
    """A `block` row whose Dynamo captured no graph ran its blocks eagerly (the 14B's 480p defaults row): the table
    says so and does not take it as the 1-GPU base of block rows."""
    h100 = "NVIDIA H100 80GB HBM3"
    rows = [_row(h100, 1, 10.0, compile="block", compiled_graphs=0), _row(h100, 1, 12.0, compile="block", compiled_graphs=2),
            _row(h100, 2, 6.0, compile="block", compiled_graphs=2)]
    lines = train_table(rows)
    assert sum("| none (block captured no graph) |" in line for line in lines) == 1
    sp2 = next(line for line in lines if "| 2 | 2 |" in line)
    assert "| 100% |" in sp2  # 12.0 / (2 x 6.0): against the block row that compiled, not the 10.0 s one


def test_scaling_without_a_one_gpu_row_is_against_the_fewest_gpus_of_the_same_configuration():
    """The 14B at 720p fits no single H100 with its base replicated: its SP=4 rows scale against its SP=2 row of the
    same policy, kernels and compile mode, per GPU-second, marked; another policy's SP=4 row gets no figure."""
    h100 = "NVIDIA H100 80GB HBM3"
    rows = [_row(h100, 2, 27.0, size="14B", checkpointing="full", compile="block"),
            _row(h100, 4, 14.0, size="14B", checkpointing="full", compile="block"),
            _row(h100, 4, 11.0, size="14B", checkpointing="selective", compile="block")]
    lines = train_table(rows)
    sp2, sp4 = (next(line for line in lines if f"| {n} | {n} | 2 | full |" in line) for n in (2, 4))
    assert sp2.split("|")[16].strip() == "-" and "| 96%‡ |" in sp4  # (2 x 27.0) / (4 x 14.0)
    assert next(line for line in lines if "| selective |" in line).split("|")[16].strip() == "-"
    assert any(line.startswith("‡ against the fastest row on the fewest GPUs") for line in lines)
    assert not any(line.startswith("†") for line in lines)


def test_baseline_line_gives_the_kernel_floor_at_each_attention_rate():
    flops = sample_flops(resolve_dit_config("2B"), 84_480)
    assert kernel_floor_seconds(flops, "lora", ATTENTION_FORWARD_BACKWARD_RATE) == kernel_floor_seconds(flops, "lora")
    faster = kernel_floor_seconds(flops, "lora", 2 * ATTENTION_FORWARD_BACKWARD_RATE)
    assert faster < kernel_floor_seconds(flops, "lora") and kernel_floor_seconds(flops, "forward", 1e15) < kernel_floor_seconds(flops, "forward")
    baseline = _row("NVIDIA H100 80GB HBM3", 1, 20.0, mode="diffusers", attention_backend="sdpa-default")
    kernels = [{"gpu": "NVIDIA H100 80GB HBM3", "rows": [
        {"shape": "2B 720p", "kernel": "fa4_op", "forward_backward_tflops": 1140.0},
        {"shape": "2B 720p", "kernel": "cudnn", "forward_backward_tflops": 590.0}]}]
    assert fa4_rates(kernels) == {("H100", "2B 720p"): 1140e12}
    line = train_table([_row("NVIDIA H100 80GB HBM3", 1, 12.5), baseline], fa4_rates(kernels))[-1]
    assert line.startswith("H100: our 2B 720p step on one GPU is 1.60x faster") and "2x would need 10.00 s" in line
    assert f"floor is {kernel_floor_seconds(flops, 'lora'):.2f} s at the kernel ceiling's rates, {faster:.2f} s at " in line
    assert "measured 1140 TFLOP/s" in line
    assert train_table([_row("NVIDIA H100 80GB HBM3", 1, 12.5), baseline])[-1].endswith("at the kernel ceiling's rates.")


def test_generate_table_ceiling_uses_two_forwards_per_guided_step():
    flops = sample_flops(resolve_dit_config("2B"), 24 * 44 * 80)
    step = 2 * kernel_floor_seconds(flops, "forward")
    row = {"size": "2B", "resolution": "720", "world_size": 1, "latent": [16, 24, 88, 160], "seconds_per_guided_step": step,
           "vae_encode_s": 1.0, "vae_decode_s": 1.0, "video_s_extrapolated": 100.0, "attention_backend": "cudnn", "gpu": "NVIDIA H100"}
    assert "| 100% |" in generate_table([row])[-1] and "| 228.8 |" in generate_table([row])[-1]


def test_generate_table_columns_match_and_label_whole_clip_rows():
    row = {"size": "2B", "resolution": "720", "world_size": 1, "latent": [16, 24, 88, 160], "seconds_per_guided_step": 6.0,
           "vae_encode_s": 3.5, "vae_decode_s": 5.0, "video_s_extrapolated": 224.5, "attention_backend": "cudnn"}
    header, separator, old = generate_table([row])
    assert header.count("|") == separator.count("|") == old.count("|")
    assert "| 3.50 (whole clip) |" in old and old.split("|")[12].strip() == "-"
    new = generate_table([{**row, "vae_encode_frames": 1, "video_s_measured": 223.0}])[-1]
    assert "| 3.50 |" in new and new.split("|")[12].strip() == "223.0"
    train_header, train_separator = train_table([_row("NVIDIA H100 80GB HBM3", 1, 12.0)])[:2]
    assert train_header.count("|") == train_separator.count("|")


def test_kernel_kinds_and_busy_time():
    assert kernel_kind("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x128x128") == "attention"
    assert kernel_kind("nvjet_tst_256x128_64x4_1x2_h_bz_coopA_NNT") == "matmul"
    assert kernel_kind("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_ndhwc") == "convolution"
    assert kernel_kind("triton_poi_fused_add_mul_0") == "triton"
    assert kernel_kind("ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)") == "communication"
    assert kernel_kind("void at::native::vectorized_elementwise_kernel<4>") == "other"
    span, busy, gaps = busy_and_gaps([(0, 10), (5, 12), (20, 25), (30, 31)])
    assert (span, busy, gaps) == (31, 18, [8, 5])


def test_profile_summary_counts_an_nccl_kernel_once():
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    def event(name, start, end, device=DeviceType.CUDA, annotation=False):
        return SimpleNamespace(name=name, device_type=device, is_user_annotation=annotation,
                               time_range=SimpleNamespace(start=start, end=end))

    events = [event("ncclDevKernel_SendRecv", 0, 2000), event("nccl:all_to_all", 0, 2000, annotation=True),
              event("nvjet_sm90_gemm", 3000, 4000), event("cudaStreamSynchronize", 4000, 4100, DeviceType.CPU)]
    summary = summarize_events(events)
    assert summary["profile_kernel_ms"] == {"communication": 2.0, "matmul": 1.0}
    assert summary["profile_gpu_busy_ms"] == 3.0 and summary["profile_gpu_idle_ms"] == 1.0
    assert summary["profile_syncs"] == {"cudaStreamSynchronize": 1}


def test_generate_benchmark_runs_on_cpu(tmp_path):
    out = tmp_path / "row.json"
    cmd = [sys.executable, "-m", "benchmarks.generate_throughput", "--size", "tiny", "--measured_steps", "1",
           "--full_video", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    row = json.loads(out.read_text())
    assert row["video_guided_calls"] == 36 and set(row["video_timings"]) == {"vae_encode", "sampling", "vae_decode"}
    assert row["video_s_measured"] == pytest.approx(sum(row["video_timings"].values()))
    assert row["vae_encode_frames"] == 1 and len(row["step_times"]) == 1 and row["compile"] == "none"
    assert "profile_syncs" not in row


def test_train_benchmark_runs_on_cpu(tmp_path):
    """A tiny run of the training benchmark, with PyAV made unimportable: training on shards of latents (and the
    benchmark) must not need it, since `launch/make_wheelhouse.sh --minimal` leaves it out for air-gapped GPU nodes."""
    out = tmp_path / "row.json"
    without_av = "import runpy, sys; sys.modules['av'] = None; runpy.run_module('benchmarks.train_throughput', run_name='__main__')"
    cmd = [sys.executable, "-c", without_av, "--size", "tiny", "--resolution", "480", "--steps", "1",
           "--warmup", "1", "--checkpointing", "selective", "--profile", "--alternate", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    row = json.loads(out.read_text())
    assert row["compile"] == "none" and row["checkpointing"] == "selective" and row["attention_backend"] == "cpu-default"
    assert row["zero_stage"] == 3 and row["max_live_parameters"] > 0  # the plan's check reads the row's live budget
    assert len(row["times"]) == 1 and len(row["losses"]) == 2 and row["first_loss"] > 0
    assert "profile_syncs" not in row  # the profiler check needs CUDA
    assert "gpu_s_per_iter" not in row  # so does --host_lead_ms
    assert {k: len(v) for k, v in row["alternate_times"].items()} == {"configured": 1, "before": 1}
    assert all(len(v) == 2 and all(x > 0 for x in v) for v in row["alternate_losses"].values())  # warm-up + measured
    assert row["gc"] == "auto" and row["gc_ms_per_step_max_rank"] >= row["gc_ms_per_step"] >= 0 and len(row["gc_collections"]) == 3
    assert row["lora_fused_layers"] == [0, 20]  # the fused forward is back after alternating (ZeRO-3 here: PEFT's runs)


def test_sequence_exchange_benchmark_runs_on_cpu(tmp_path):
    from tests.distributed.launch import run

    out = tmp_path / "exchange.json"
    run(["-m", "benchmarks.sequence_exchange", "--sizes", "2B", "--resolutions", "480", "--num_frames", "5", "--iters", "1",
         "--out", str(out)], nproc=2)
    row = json.loads(out.read_text())["rows"][0]
    assert row["same_result"] is True and row["sp"] == 2 and row["tokens"] == 2 * 27 * 48
    assert row["message_mb"] == pytest.approx(row["tokens"] / 2 * 2048 * 4 / 1e6)
    assert row["fused_ms"] > 0 and row["deepspeed_ms"] > 0 and row["step_exchange_s_fused"] == pytest.approx(row["fused_ms"] * 28 / 1e3)



def test_memory_plan_against_every_measured_row():
    from benchmarks.memory_table import RESULTS, against_results

    measured = {p.stem for p in RESULTS.glob("train_lora_*.json") if "peak_allocated_gib" in json.loads(p.read_text())}
    lines = against_results()[2:]
    assert {line.split("|")[1].strip() for line in lines} == measured and measured
    for line in lines:
        compile_mode, estimate, peak, error = (cell.strip() for cell in line.split("|")[3:7])
        assert compile_mode in ("none", "elementwise", "block", "block, eager step 1", "block, all-to-alls kept") and float(estimate) > 0 and float(peak) > 0
        assert error[0] in "+-" and error.endswith("%")


def test_attention_kernel_benchmark_runs_on_cpu_and_renders(tmp_path):
    from benchmarks import attention_kernels
    from benchmarks.report import attention_table

    out = tmp_path / "kernels.json"
    assert attention_kernels.main(["--shapes", "tiny", "--repeats", "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [(r["shape"], r["kernel"]) for r in data["rows"]] == [("tiny", "math"), ("tiny cross", "math")]
    cross = data["rows"][1]
    assert cross["key_tokens"] == 32 and cross["forward_s"] > 0 and cross["forward_backward_s"] > 0
    assert cross["forward_tflops"] == pytest.approx(4 * 256 * 32 * 2 * 128 / cross["forward_s"] / 1e12)
    # the float32 reference is the math kernel itself here: no error; the first kernel is its own reference
    assert cross["max_abs_err_vs_fp32"] == cross["max_abs_grad_err_vs_fp32"] == cross["max_abs_grad_diff_vs_first"] == 0
    header, separator, *lines = attention_table([data])
    assert header.count("|") == separator.count("|") == lines[1].count("|") and "| 256 x 32 | 2 | math |" in lines[1]
    assert lines[1].endswith("| 0.0e+00 / 0.0e+00 | 0.0e+00 / 0.0e+00 |") and lines[1].startswith("| cpu | all kernels |")


def test_attention_kernel_filters(tmp_path, capsys):
    from benchmarks import attention_kernels

    out = tmp_path / "kernels.json"
    assert attention_kernels.main(["--shapes", "tiny", "--only", "tiny_cross", "--kernels", "math", "--repeats", "1",
                                   "--out", str(out)]) == 0
    assert [r["shape"] for r in json.loads(out.read_text())["rows"]] == ["tiny cross"]
    for flag, value, message in (("--only", "huge", "no shape huge"), ("--kernels", "fa5", "fa5 not available")):
        with pytest.raises(SystemExit):
            attention_kernels.main(["--shapes", "tiny", flag, value, "--out", str(out)])
        assert message in capsys.readouterr().err


def test_host_overhead_benchmark_runs_on_cpu(tmp_path, capsys):
    from benchmarks import host_overhead

    out = tmp_path / "host.json"
    host_overhead.main(["--modes", "none", "--blocks", "1", "3", "--steps", "2", "--out", str(out)])
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert result["device"] == "cpu" and row["compile"] == "none" and row["blocks"] == [1, 3]
    assert row["lora_fused_layers"] == [10, 30]  # every LoRA Linear (self, cross, MLP) takes the fused forward
    assert row["ms_per_block"] == pytest.approx((row["step_ms"][1] - row["step_ms"][0]) / 2)
    assert row["ms_per_2b_step"] == pytest.approx(28 * row["ms_per_block"])
    assert row["aten_calls_per_block"] > 100 and row["aten_calls_per_block"] == int(row["aten_calls_per_block"])
    assert "| none |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--blocks 3 1"):
        host_overhead.main(["--modes", "none", "--blocks", "3", "1", "--out", str(out)])
