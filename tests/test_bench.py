"""`deltalearn bench`: the model benchmark's measurements, its JSON, ratios and errors, at a minute
size (1 layer, d = 32, vocab 256), and the operator benchmark still answering."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from deltalearn.bench import timing
from deltalearn.cli import main as cli_main

MINUTE = [
    *("--set", "hidden_size=32", "--set", "num_heads=1", "--set", "num_layers=1"),
    *("--set", "vocab_size=256"),
    *("--batch", "2", "--seq", "16", "--repeats", "1"),
    *("--gen-prompt", "4", "--gen-tokens", "2"),
]
VARIANTS = ["baseline", "ddl", "ddl-tc"]
RATIOS = ["train_ratio", "infer_ratio", "generate_ratio", "memory_ratio"]


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    """`python benchmarks/<script> <args>` from the repository root; asserts it succeeded."""
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, f"benchmarks/{script}", *args]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def run_bench(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli_main(["bench", *argv])
    return code, out.getvalue()


@pytest.fixture(scope="module")
def model_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "model.json"
    code, out = run_bench(["model", *MINUTE, "--variants", ",".join(VARIANTS), "--json", str(path)])
    assert code == 0
    return out, json.loads(path.read_text())


def test_every_measurement_is_a_positive_figure_per_variant(model_run):
    _, report = model_run
    assert [r["variant"] for r in report["rows"]] == VARIANTS
    for row in report["rows"]:
        for key in ("train_tokens_per_s", "infer_tokens_per_s", "generate_tokens_per_s"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["variant"], key)
        assert row["step_peak_MB"] > 0 and row["resident_MB"] > 0
        assert row["params_M"] > 0
    ddl, baseline = report["rows"][1], report["rows"][0]
    assert ddl["params_M"] > baseline["params_M"]  # DDL adds its heads to the same backbone


def test_json_names_machine_torch_date_and_settings(model_run):
    _, report = model_run
    assert report["benchmark"] == "model" and report["reference"] == "baseline"
    assert report["machine"] and report["torch"] == torch.__version__
    assert report["cpu_allocator"] in ("keep", "default")  # recorded: it moves CPU speeds
    assert len(report["date"]) >= 10 and report["date"][4] == "-"
    settings = report["settings"]
    assert settings["overrides"] == {
        "hidden_size": 32,
        "num_heads": 1,
        "num_layers": 1,
        "vocab_size": 256,
    }
    assert (settings["batch"], settings["seq"], settings["gen_tokens"]) == (2, 16, 2)
    assert settings["impl"] == "default" and settings["dtype"] == "float32"
    assert "memory" in report["notes"]


def test_machine_line_names_the_cpu_generation_and_vector_instructions(tmp_path):
    """A virtual machine's CPUs may all be "AMD EPYC": the family and model tell a Zen 3 from a
    Zen 4, whose C kernels (-march=native) differ; the first processor's block is read."""
    cpuinfo = tmp_path / "cpuinfo"
    block = "processor\t: {}\ncpu family\t: {}\nmodel\t\t: {}\nmodel name\t: AMD EPYC\n"
    cpuinfo.write_text(block.format(0, 25, 1) + "\n" + block.format(1, 26, 2))
    assert timing.cpu_name(str(cpuinfo)) == "AMD EPYC (family 25, model 1)"
    assert timing.cpu_name(str(tmp_path / "missing"))  # the platform's answer instead
    line = timing.machine(torch.device("cpu"))
    assert torch.backends.cpu.get_cpu_capability() in line
    assert line.endswith(f", {torch.get_num_threads()} threads")


def test_baseline_ratio_to_itself_is_one_and_others_are_ratios(model_run):
    _, report = model_run
    base = report["rows"][0]
    assert all(base[k] == 1.0 for k in RATIOS)
    for row in report["rows"][1:]:
        assert row["train_ratio"] == pytest.approx(
            row["train_tokens_per_s"] / base["train_tokens_per_s"]
        )
        assert row["memory_ratio"] == pytest.approx(row["step_peak_MB"] / base["step_peak_MB"])


def test_table_has_machine_line_and_a_row_per_variant(model_run):
    out, report = model_run
    assert report["machine"] in out and torch.__version__ in out
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    assert len(lines) == 1 + len(VARIANTS)  # header + rows
    assert "train tok/s" in lines[0] and "decode tok/s" in lines[0] and "step peak MB" in lines[0]
    for variant, line in zip(VARIANTS, lines[1:], strict=True):
        assert line.startswith(f"| {variant} |")


def test_report_names_the_fast_path_switches_it_ran_with(tmp_path, monkeypatch):
    """Two runs that differ in one switch (the device check's A/B stages) say which is which."""
    for unset in ("DELTALEARN_EPILOGUE", "DELTALEARN_UPDATE_KERNEL", "DELTALEARN_REBUILD_STATES"):
        monkeypatch.delenv(unset, raising=False)
    monkeypatch.setenv("DELTALEARN_COMPILED_KERNELS", "on")
    monkeypatch.setenv("DELTALEARN_FUSED_READ", "off")
    monkeypatch.delenv("DELTALEARN_COMPILED_REBUILD", raising=False)
    path = tmp_path / "m.json"
    argv = ["model", *MINUTE, "--variants", "baseline", "--measure", "infer", "--json", str(path)]
    code, out = run_bench(argv)
    assert code == 0
    assert json.loads(path.read_text())["fast_paths"] == {
        "backend": "auto",
        "update_kernel": "on",
        "fused_read": "off",
        "rebuild_states": "on",
        "compiled_kernels": "on",
        "compiled_rebuild": "off",
    }
    assert "fast paths: backend auto, update_kernel on, fused_read off," in out


def test_table_says_when_steps_were_replayed_as_cuda_graphs(model_run):
    """The JSON keeps `cuda_graphs` in its settings, and the table's settings line names it."""
    from deltalearn.bench.model import format_model_report

    out, report = model_run
    assert report["settings"]["cuda_graphs"] is False and "CUDA graphs" not in out
    replayed = {**report, "settings": {**report["settings"], "cuda_graphs": True}}
    assert "train and infer replayed as CUDA graphs" in format_model_report(replayed)


def test_measure_selects_columns(tmp_path):
    path = tmp_path / "m.json"
    argv = ["model", *MINUTE, "--variants", "baseline,ddl", "--measure", "infer", "--json"]
    assert run_bench([*argv, str(path)])[0] == 0
    row = json.loads(path.read_text())["rows"][1]
    assert "infer_tokens_per_s" in row and "infer_ratio" in row
    assert not {"train_tokens_per_s", "generate_tokens_per_s", "step_peak_MB"} & set(row)


def test_ratios_come_with_their_quartiles_round_by_round(tmp_path):
    path = tmp_path / "m.json"
    argv = ["model", *MINUTE, "--variants", "baseline,ddl", "--measure", "infer,generate"]
    code, out = run_bench([*argv, "--repeats", "3", "--json", str(path)])
    assert code == 0
    base, ddl = json.loads(path.read_text())["rows"]
    for measure in ("infer", "generate"):
        assert base[f"{measure}_ratio_quartiles"] == [1.0, 1.0, 1.0]
        q1, median, q3 = ddl[f"{measure}_ratio_quartiles"]
        assert 0 < q1 <= median <= q3
        rounds = [base[f"{measure}_seconds_by_round"], ddl[f"{measure}_seconds_by_round"]]
        ratios = sorted(b / d for b, d in zip(*rounds, strict=True))
        assert len(ratios) == 3 and median == pytest.approx(ratios[1])
    header = next(line for line in out.splitlines() if line.startswith("| "))
    assert header.count("by round") == 2 and "1.000 (1.000–1.000)" in out


def test_paired_quartiles_cancel_a_slow_round():
    from deltalearn.bench.timing import paired_ratio_quartiles

    # The second round ran ten times slower for both sides: its ratio is the same.
    assert paired_ratio_quartiles([1.0, 10.0, 1.0], [2.0, 20.0, 2.0]) == (0.5, 0.5, 0.5)
    assert paired_ratio_quartiles([1.0, 2.0, 3.0, 4.0, 5.0], [1.0] * 5) == (2.0, 3.0, 4.0)
    # Two rounds far apart (a loaded machine): the quartiles stay between them, never below 0.
    q1, median, q3 = paired_ratio_quartiles([1.0, 10.0], [10.0, 1.0])
    assert 0.1 <= q1 <= median <= q3 <= 10.0 and median == pytest.approx(5.05)
    assert paired_ratio_quartiles([1.0], [2.0]) is None
    with pytest.raises(ValueError, match="rounds differ: 2 against 1"):
        paired_ratio_quartiles([1.0, 2.0], [1.0])


def test_step_peak_is_deterministic_and_grows_with_the_batch():
    from deltalearn.bench.model import ModelBench, build_variant, step_peak_bytes

    def peak(batch: int) -> int:
        bench = ModelBench(
            variants=["ddl-cc"],
            overrides=dict(hidden_size=32, num_heads=1, num_layers=1, vocab_size=256),
            batch=batch,
            seq=16,
        )
        run = build_variant(bench, "ddl-cc")
        run.train_step()  # AdamW state exists: later steps start from the resident level
        return step_peak_bytes(run.train_step, torch.device("cpu"))

    first = peak(2)
    assert first > 0 and peak(2) == first
    assert peak(4) > 1.5 * first  # activations and logits scale with the batch


def test_greedy_decode_uses_the_cache_correctly():
    """The decode loop (one token per call, with the cache) gives the tokens of a greedy loop
    that re-reads the whole prefix each step, for a model with conv histories (EC + TC)."""
    from deltalearn.bench.model import ModelBench, build_variant, greedy_decode

    bench = ModelBench(
        variants=["ddl-tc"], overrides=dict(hidden_size=32, num_heads=1, num_layers=2)
    )
    model = build_variant(bench, "ddl-tc").model.eval()
    prompt = torch.randint(0, model.config.vocab_size, (2, 5))
    ids, seconds = greedy_decode(model, prompt, 6)
    assert ids.shape == (2, 5 + 1 + 6) and seconds > 0
    expected = prompt
    with torch.no_grad():
        for _ in range(7):
            nxt = model(expected).logits[:, -1].argmax(-1, keepdim=True)
            expected = torch.cat([expected, nxt], dim=1)
    assert torch.equal(ids, expected)


def test_decoding_takes_turns_on_copies_of_each_model(monkeypatch):
    """Each timed decode runs on the next of `gen_instances` copies (same weights, other memory),
    and the copies decode the same tokens."""
    from deltalearn.bench import model as bench_model

    bench = bench_model.ModelBench(
        variants=["ddl-tc"], overrides=dict(hidden_size=32, num_heads=1, num_layers=1)
    )
    run = bench_model.build_variant(bench, "ddl-tc")
    assert run.gen_instances == 3
    used, outputs = [], []
    real = bench_model.greedy_decode

    def recorded(model, prompt, new_tokens):
        used.append(model)
        outputs.append(real(model, prompt, new_tokens))
        return outputs[-1]

    monkeypatch.setattr(bench_model, "greedy_decode", recorded)
    for _ in range(4):
        assert run.decode_seconds() > 0
    assert used[0] is run.model and used[3] is run.model
    assert len({id(m) for m in used}) == 3
    assert used[1].embed.weight.data_ptr() != run.model.embed.weight.data_ptr()
    assert all(torch.equal(ids, outputs[0][0]) for ids, _ in outputs)


@pytest.mark.parametrize("impl, fused", [("default", True), ("reference", False)])
def test_impl_switches_every_delta_update(impl, fused):
    from deltalearn.bench.model import ModelBench, build_variant
    from deltalearn.nn import DeltaUpdate

    bench = ModelBench(variants=["ddl-cc"], overrides=dict(num_layers=2), impl=impl)
    updates = [
        m for m in build_variant(bench, "ddl-cc").model.modules() if isinstance(m, DeltaUpdate)
    ]
    assert len(updates) == 4 and all(u.fused is fused for u in updates)


def test_width_256_preset_keeps_head_dim_32():
    from deltalearn.bench.model import ModelBench, build_config

    bench = ModelBench(overrides=dict(hidden_size=256, num_heads=8))
    cfg = build_config(bench, "ddl")
    assert (cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.num_layers) == (256, 8, 32, 4)


@pytest.mark.parametrize(
    "extra, names",
    [
        (["--set", "hiden_size=32"], "hiden_size"),
        (["--set", "hidden_size=256"], "hidden_size"),
        (["--set", "hidden_size"], "KEY=VALUE"),
        (["--variants", "baseline,ddl-xx"], "ddl-xx"),
        (["--measure", "train,speed"], "speed"),
        (["--gen-instances", "0"], "--gen-instances"),
        (["--cuda-graphs", "--device", "cpu"], "--cuda-graphs records the eager step on a CUDA"),
    ],
)
def test_bad_settings_are_one_line_errors(capsys, extra, names):
    assert cli_main(["bench", "model", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("deltalearn: error: ") and "\n" not in err
    assert names in err


def test_operator_benchmark_still_runs(tmp_path):
    path = tmp_path / "op.json"
    argv = ["--batch", "1", "--seq", "4", "--dim", "8", "--repeats", "1", "--json", str(path)]
    code, out = run_bench(argv)  # `operator` is the default subcommand
    assert code == 0 and "fused" in out
    report = json.loads(path.read_text())
    assert [r["impl"] for r in report["rows"]] == ["additive", "reference", "fused"]
    assert report["rows"][0]["time_vs_additive"] == 1.0
    assert report["benchmark"] == "operator" and report["machine"]


def test_activation_checkpointing_lowers_the_step_peak():
    """`--activation-checkpointing` measures the model as the trainer's option builds it."""
    from deltalearn.bench.model import ModelBench, build_variant, step_peak_bytes

    def peak(checkpointing: bool) -> int:
        bench = ModelBench(
            variants=["ddl-cc"],
            overrides=dict(hidden_size=64, num_heads=2, num_layers=4, vocab_size=256),
            batch=4,
            seq=64,
            checkpointing=checkpointing,
        )
        run = build_variant(bench, "ddl-cc")
        run.train_step()
        return step_peak_bytes(run.train_step, torch.device("cpu"))

    assert peak(True) < 0.75 * peak(False)


def test_cuda_graphs_train_step_replays_the_trainers_step():
    """`--cuda-graphs` (here `StepGraph`'s CPU stand-in): the first call runs the warm-up steps and
    the recording, each later one a replay; the weights are those of as many eager steps."""
    from deltalearn.bench.model import ModelBench, build_variant
    from deltalearn.train.cuda_graph import WARMUP_CALLS

    def weights(graphs: bool, calls: int) -> list[torch.Tensor]:
        bench = ModelBench(variants=["ddl-cc"], overrides=dict(num_layers=2), batch=2, seq=32)
        bench.cuda_graphs = graphs  # past `check`, which wants a CUDA device for it
        run = build_variant(bench, "ddl-cc")
        for _ in range(calls):
            run.train_step()
        assert graphs == (run._graph is not None and run._graph.calls == WARMUP_CALLS + calls)
        return [p.detach().clone() for p in run.model.parameters()]

    replayed, eager = weights(True, 2), weights(False, WARMUP_CALLS + 2)
    assert all(torch.equal(a, b) for a, b in zip(replayed, eager, strict=True))


def test_cuda_graphs_infer_replays_the_forward():
    """`infer` with `--cuda-graphs` (the CPU stand-in): warm-up forwards and the recording at the
    first call, a replay a call after; the recorded logits are the eager forward's, in eval mode."""
    from deltalearn.bench.model import ModelBench, build_variant
    from deltalearn.train.cuda_graph import WARMUP_CALLS

    bench = ModelBench(variants=["ddl-tc"], overrides=dict(num_layers=2), batch=2, seq=32)
    bench.cuda_graphs = True
    run = build_variant(bench, "ddl-tc")
    run.infer()
    run.infer()
    graph = run._infer_graph
    assert graph is not None and graph.recorded and graph.calls == WARMUP_CALLS + 2
    assert not run.model.training
    with torch.no_grad():
        eager = run.model(run.ids).logits
    assert torch.equal(graph._outputs[0], eager)


# ---- model FLOPs and MFU -------------------------------------------------------------------------


def test_achieved_flops_are_tokens_per_s_times_the_analytic_count(model_run):
    """GFLOP/s = tokens/s × `flops_per_token` (forward + backward for train, forward for infer);
    on a CPU without --peak-tflops there is no MFU."""
    from deltalearn.bench.model import ModelBench, build_config
    from deltalearn.models.flops import flops_per_token

    _, report = model_run
    bench = ModelBench(overrides=report["settings"]["overrides"])
    for row in report["rows"]:
        count = flops_per_token(build_config(bench, row["variant"]), 16)
        assert row["train_flops_per_token"] == count.train
        assert row["infer_flops_per_token"] == count.forward
        for measure in ("train", "infer"):
            want = row[f"{measure}_tokens_per_s"] * row[f"{measure}_flops_per_token"] / 1e9
            assert row[f"{measure}_gflops_per_s"] == pytest.approx(want, rel=1e-12)
        assert "train_mfu" not in row and "infer_mfu" not in row
    assert report["peak_tflops"] is None and "--peak-tflops" in report["peak_source"]
    assert "flops" in report["notes"]


def test_peak_tflops_gives_mfu_in_json_and_table(tmp_path):
    path = tmp_path / "m.json"
    argv = ["model", *MINUTE, "--variants", "baseline,ddl", "--measure", "train"]
    code, out = run_bench([*argv, "--peak-tflops", "0.5", "--json", str(path)])
    assert code == 0
    report = json.loads(path.read_text())
    assert report["peak_tflops"] == 0.5 and report["peak_source"] == "--peak-tflops"
    for row in report["rows"]:
        assert row["train_mfu"] == pytest.approx(row["train_gflops_per_s"] / 500, rel=1e-12)
        assert 0 < row["train_mfu"] < 1
        assert "infer_gflops_per_s" not in row  # not measured
    header = next(line for line in out.splitlines() if line.startswith("| variant"))
    assert "train GFLOP/s" in header and "train MFU" in header
    assert "peak: 0.5 TFLOP/s (--peak-tflops)" in out


@pytest.mark.parametrize(
    "name, dtype, tf32, peak",
    [
        ("NVIDIA H100 80GB HBM3", "bfloat16", False, 989.4),
        ("NVIDIA H100 PCIe", "bfloat16", False, 756.0),
        ("NVIDIA H200", "float32", False, 67.0),
        ("NVIDIA H200", "float32", True, 494.7),
        ("NVIDIA A100-SXM4-80GB", "bfloat16", False, 312.0),
        ("NVIDIA A100-PCIE-40GB", "float32", True, 156.0),
        ("NVIDIA H100 NVL", "bfloat16", False, None),
        ("NVIDIA H200 MIG 1g.18gb", "bfloat16", False, None),
        ("Tesla T4", "float32", False, None),
    ],
)
def test_known_device_peaks(name, dtype, tf32, peak):
    from deltalearn.bench.model import device_peak_tflops

    assert device_peak_tflops(name, dtype, tf32) == peak


@pytest.mark.parametrize("value", ["0", "-2", "nan"])
def test_bad_peak_tflops_is_a_one_line_error(capsys, value):
    assert cli_main(["bench", "model", *MINUTE, "--peak-tflops", value]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("deltalearn: error: --peak-tflops") and "\n" not in err


def test_compiled_run_reports_each_variants_first_call(tmp_path):
    """With --compile the first call of each variant (trace + compile) is reported apart from the
    medians, and takes longer than a compiled call."""
    path = tmp_path / "m.json"
    argv = ["model", *MINUTE, "--variants", "baseline,ddl", "--measure", "infer", "--compile"]
    code, out = run_bench([*argv, "--json", str(path)])
    assert code == 0
    report = json.loads(path.read_text())
    assert "first_call" in report["notes"] and "infer 1st call s" in out
    for row in report["rows"]:
        per_call = 2 * 16 / row["infer_tokens_per_s"]  # batch 2 x seq 16 tokens a call
        assert row["infer_first_call_s"] > 5 * per_call
        assert "train_first_call_s" not in row  # not measured


def test_host_overhead_script_counts_the_gpu_paths_work():
    """`benchmarks/host_overhead.py` (run in a subprocess: it stubs the kernel launches of the
    process) prints a table per phase with a row per variant: DDL's GPU path has more autograd
    nodes and ATen ops a training step than the baseline's, and more ATen ops a full-sequence
    forward and a decoded token (none of them autograd nodes)."""
    pytest.importorskip("triton")
    variants = ["--variants", "baseline,ddl-cc"]
    phases = ["--layers", "1", "--repeats", "1", "--phase", "train,infer,decode"]
    proc = run_script("host_overhead.py", *variants, *phases)
    rows = re.findall(r"^\| (baseline|ddl-cc) \| (\d+) \| (\d+) \|", proc.stdout, re.M)
    assert [variant for variant, _, _ in rows] == ["baseline", "ddl-cc"] * 3
    (_, base_nodes, base_ops), (_, ddl_nodes, ddl_ops) = rows[:2]
    assert int(ddl_nodes) > int(base_nodes) and int(ddl_ops) > int(base_ops)
    for (_, base_nodes, base_ops), (_, ddl_nodes, ddl_ops) in (rows[2:4], rows[4:6]):
        assert base_nodes == ddl_nodes == "0" and int(ddl_ops) > int(base_ops)
    assert "host ms a forward" in proc.stdout and "host ms a token" in proc.stdout
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "benchmarks/host_overhead.py", *variants, "--phase", "backward"]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    assert proc.returncode != 0 and "backward" in proc.stderr


def test_update_share_script_times_ddl_with_and_without_its_updates():
    """`benchmarks/update_share.py` times the baseline, ddl, and ddl with every update made
    additive: three rows of positive phase times; the additive stand-in returns X + h exactly."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import update_share
    finally:
        sys.path.pop(0)
    from deltalearn import DeltaLM, DeltaLMConfig
    from deltalearn.nn import DeltaUpdate

    model = DeltaLM(DeltaLMConfig.preset("ddl", "tiny", num_layers=1))
    update_share.additive_updates(model)
    update = next(m for m in model.modules() if isinstance(m, DeltaUpdate))
    X, h = torch.randn(2, 3, 128), torch.randn(2, 3, 128)
    assert torch.equal(update(X, h, h, X), X + h)
    proc = run_script("update_share.py", "--rounds", "1")
    rows = re.findall(r"^\| (baseline|ddl|ddl, updates as X \+ h) \|(.*)\|$", proc.stdout, re.M)
    assert [name for name, _ in rows] == ["baseline", "ddl", "ddl, updates as X + h"]
    for _, cells in rows:
        assert all(float(c) > 0 for c in cells.split("|"))


def test_decode_calls_script_times_each_extension_call_a_decoded_token_makes():
    """`benchmarks/decode_calls.py` times the inference extension's calls inside decoding, the
    prefill left out: a `tiny` ddl-cc token makes one update a sublayer, one channel read a block
    plus the final one, one expansion; ddl-tc a token read a sublayer plus the final one."""
    args = ["--variants", "ddl-cc,ddl-tc", "--tokens", "3", "--repeats", "1"]
    proc = run_script("decode_calls.py", *args, "--set", "num_layers=2")
    rows = re.findall(
        r"^\| (ddl-\w+) \| (\w+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", proc.stdout, re.M
    )
    calls = {(variant, name): float(n) for variant, name, n, _, _ in rows}
    assert calls == {
        ("ddl-cc", "update"): 4.0, ("ddl-cc", "channel_read"): 3.0, ("ddl-cc", "expand"): 1.0,
        ("ddl-tc", "update"): 4.0, ("ddl-tc", "token_read"): 5.0, ("ddl-tc", "expand"): 1.0,
    }  # fmt: skip
    assert all(float(us) > 0 for *_, us, _ in rows)


def test_triton_launch_host_script_times_each_kernel_a_step_launches():
    """`benchmarks/triton_launch_host.py` replays a ddl-cc step's launches through Triton's launch
    path without a GPU: a row a distinct launch (the rewrite's forward and backward, the reads'),
    each with a positive time, the backward taking more arguments than the forward."""
    pytest.importorskip("triton")
    proc = run_script("triton_launch_host.py", "--calls", "5")
    rows = re.findall(r"^\| (_\w+) \| (\d+) \| \d+ \| ([\d.]+) \|$", proc.stdout, re.M)
    names = {name for name, _, _ in rows}
    assert {"_fwd_kernel", "_bwd_kernel", "_read_fwd_kernel", "_read_bwd_kernel"} <= names
    assert all(float(us) > 0 for _, _, us in rows)
    args = {name: int(n) for name, n, _ in rows}
    assert args["_bwd_kernel"] > args["_fwd_kernel"]


def test_host_overhead_count_runs_its_marked_steps_and_needs_valgrind(tmp_path):
    """`benchmarks/host_overhead.py --count`: the process callgrind watches runs its marked steps
    to the end (here without valgrind, the forward under bf16 autocast), and the script says
    plainly when valgrind is missing."""
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    script = [sys.executable, "benchmarks/host_overhead.py"]
    child = [*script, "--child", "ddl-cc", "--layers", "1", "--steps", "2", "--autocast"]
    proc = subprocess.run(child, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    no_valgrind = {**os.environ, "PATH": str(tmp_path)}  # python by its full path; no valgrind
    proc = subprocess.run([*script, "--count"], cwd=root, env=no_valgrind, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode != 0 and "valgrind not found" in proc.stderr


def test_decode_instructions_script_runs_its_decodes_and_needs_valgrind(tmp_path):
    """`benchmarks/decode_instructions.py`: the process callgrind watches runs to its end (here
    without valgrind, on the portable kernels it asks for); the script itself says plainly when
    valgrind is missing."""
    root = Path(__file__).resolve().parents[1]
    script = [sys.executable, "benchmarks/decode_instructions.py"]
    child = [*script, "--child", "ddl-cc", "--tokens", "2"]
    child += ["--set", "num_layers=1", "--set", "hidden_size=32", "--set", "num_heads=1"]
    proc = subprocess.run(child, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    no_valgrind = {**os.environ, "PATH": str(tmp_path)}  # python by its full path; no valgrind
    proc = subprocess.run(script, cwd=root, env=no_valgrind, capture_output=True, text=True)
    assert proc.returncode != 0 and "valgrind not found" in proc.stderr


def test_gpu_path_memory_script_counts_the_peaks_and_what_recomputing_c_saves():
    """`benchmarks/gpu_path_memory.py` (a subprocess: it stubs the kernel launches and sets the
    allocator) prints each variant's step peak on the GPU path and what is alive at it; and the
    rewrite that recomputes its normed input keeps two bf16 row tensors a sublayer fewer (c and
    u, d_v = 4) than one that keeps copies of them, for one fp32 number a row — exactly those
    bytes at the peak."""
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    shape = ["--size", "tiny", "--batch", "1", "--seq", "64", "--set", "num_layers=2"]
    cmd = [sys.executable, "benchmarks/gpu_path_memory.py", "--variants", "baseline,ddl-cc"]
    proc = subprocess.run(
        [*cmd, *shape, "--top", "3", "--gpu-baseline-gb", "1.0"],
        cwd=root, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(
        r"^\| ddl-cc \| [\d.]+ \| [+-][\d.]+ \| [\d.]+ \| [\d.]+ \|$", proc.stdout, re.M
    )
    assert "ddl-cc: alive at the peak" in proc.stdout
    probe = textwrap.dedent(
        """
        import sys
        sys.path.insert(0, "benchmarks")
        from gpu_path_memory import measure
        from deltalearn.bench.model import ModelBench
        from deltalearn.nn import residual
        bench = ModelBench(variants=["ddl-cc"], size="tiny", batch=1, seq=64, dtype="bfloat16",
                           overrides={"num_layers": 2})
        recomputed = measure(bench)["ddl-cc"][0]
        residual.rms_norm_parameters = lambda norm, u: None
        print(measure(bench)["ddl-cc"][0] - recomputed)
        """
    )
    proc = subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    sublayers, tokens, width = 4, 64, 128
    copies, rstd = 2 * tokens * width * 2, tokens * 4  # bf16 c and u; its fp32 1/rms a row
    assert int(proc.stdout.split()[-1]) == sublayers * (copies - rstd)


@pytest.mark.slow  # two variants' forward and backward graphs through Inductor: ~40 s
def test_compiled_graph_script_counts_kernels_and_ddl_adds_no_library_call():
    """`benchmarks/compiled_graph.py` counts each variant's compiled training graphs (kernels,
    library calls among them, bytes); ddl's gate and value projections, their backward and the
    readout are reductions Inductor fuses, so its graphs call the libraries (matrix products,
    attention) exactly as often as the baseline's."""
    root = Path(__file__).resolve().parents[1]
    shape = ["--size", "tiny", "--batch", "1", "--seq", "32", "--set", "num_layers=1"]
    cmd = [sys.executable, "benchmarks/compiled_graph.py", "--variants", "baseline,ddl", *shape]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = r"^\| {} \| (\d+) \((\d+)\) \| (\d+) \((\d+)\) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| \d+ \|$"
    base = re.search(row.format("baseline"), proc.stdout, re.M)
    ddl = re.search(row.format("ddl"), proc.stdout, re.M)
    assert base and ddl, proc.stdout
    assert float(base.group(5)) == 1.0 and float(ddl.group(7)) > 0
    assert (ddl.group(2), ddl.group(4)) == (base.group(2), base.group(4))


def test_a_variant_that_fails_is_reported_and_the_others_still_measured(tmp_path, monkeypatch):
    """A long run (minutes of compiling a variant on a GPU lease) keeps what it measured when one
    variant raises: that row names the error, the others have their figures, the command exits 1."""
    from deltalearn.bench import model as bench_model

    built = bench_model.build_variant

    def build(bench, variant):
        run = built(bench, variant)
        if variant == "ddl":

            def broken_step():
                raise RuntimeError("invalid gradient at index 24")

            run.train_step = broken_step
        return run

    monkeypatch.setattr(bench_model, "build_variant", build)
    path = tmp_path / "m.json"
    argv = ["model", *MINUTE, "--variants", "baseline,ddl,ddl-tc", "--measure", "train,memory"]
    code, out = run_bench([*argv, "--json", str(path)])
    assert code == 1
    rows = {row["variant"]: row for row in json.loads(path.read_text())["rows"]}
    assert rows["ddl"]["error"] == "train: RuntimeError: invalid gradient at index 24"
    assert "train_tokens_per_s" not in rows["ddl"] and "step_peak_MB" not in rows["ddl"]
    for variant in ("baseline", "ddl-tc"):
        assert rows[variant]["train_tokens_per_s"] > 0 and rows[variant]["step_peak_MB"] > 0
        assert "error" not in rows[variant]
    assert rows["ddl-tc"]["train_ratio"] == pytest.approx(
        rows["ddl-tc"]["train_tokens_per_s"] / rows["baseline"]["train_tokens_per_s"]
    )
    assert "invalid gradient at index 24" in out.splitlines()[-2]  # ddl's row, "failed" column


def test_compiled_gradients_script_compares_the_compiled_step_with_the_eager_one(tmp_path):
    """`benchmarks/compiled_gradients.py` (the device check's `compilegrads` and
    `compiledkernels` stages): an eager row, then a row a way asked for, whose gradients match the
    eager ones in fp32; a way it does not know is named."""
    out = tmp_path / "grads.json"
    args = ["--size", "tiny", "--set", "num_layers=1", "--variants", "ddl", "--batch", "1"]
    args += ["--seq", "16", "--dtype", "float32", "--ways", "deltalm-compile"]
    run_script("compiled_gradients.py", *args, "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [row["way"] for row in rows] == ["eager", "deltalm-compile"]
    assert rows[1]["loss"] == pytest.approx(rows[0]["loss"], rel=1e-5)
    assert rows[1]["worst_relative_gradient_difference"] < 1e-4
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "benchmarks/compiled_gradients.py", "--ways", "traced"]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--ways" in proc.stderr and "'traced'" in proc.stderr


def test_compiled_state_chain_script_compares_kept_and_rebuilt_states(tmp_path):
    """`benchmarks/compiled_state_chain.py`: a compiled row per mode, each on the eager gradients;
    a mode it does not know is named."""
    out = tmp_path / "chain.json"
    args = ["--rows", "32", "--width", "16", "--channels", "2", "--layers", "3", "--no-eager"]
    run_script("compiled_state_chain.py", *args, "--repeats", "1", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [(row["mode"], row["compiled"]) for row in rows] == [("saved", True), ("chain", True)]
    for row in rows:
        assert row["worst_gradient_difference"] < 1e-4 and row["step_peak_MB"] > 0
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "benchmarks/compiled_state_chain.py", "--modes", "kept"]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--modes" in proc.stderr and "'kept'" in proc.stderr
    # the kernel modes on a CPU without Triton's interpreter: refused before anything runs
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "benchmarks/compiled_state_chain.py", "--modes", "saved,chain-kernels"]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "chain-kernels" in proc.stderr and "--device cpu" in proc.stderr
