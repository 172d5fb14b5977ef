"""The benchmark scripts' code paths, on a tiny model of the same architecture, so they stay runnable."""

import json
import os
import subprocess
import sys

from conftest import ROOT


def _run(script, *args):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def _train_throughput_module():
    """benchmarks/train_throughput.py imported as a module (its siblings on the path while it loads)."""
    import importlib.util

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("train_throughput", ROOT / "benchmarks" / "train_throughput.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return module


def test_generation_benchmark_tiny(tmp_path):
    out = tmp_path / "g.json"
    _run(
        "generation_throughput.py",
        "--tiny",
        "--model_dir",
        tmp_path / "m",
        "--out",
        out,
        "--original_examples",
        2,
        "--stride_4bit",
        500,
        "--stride_merged",
        500,
        "--batch_sizes_4bit",
        8,
        "--batch_sizes_merged",
        8,
        "--batch_sizes_plain",
        8,
        "--stride_plain",
        1000,
        "--profile_examples",
        8,
        "--profile_loop",
        "static",
        "--adapter_in_compute_dtype",
        "--fused_lora_inference",
        "--static_max_batch_tokens",
        1024,
        "--fused_max_batch_tokens",
        1024,
    )
    result = json.loads(out.read_text())
    profile = result["profile_engine_4bit"]
    assert profile["examples"] == 8 and profile["busy_seconds"] > 0 and profile["by_kind_seconds"]
    assert profile["loop"] == "static" and set(profile["ranges"]) == {"prefill", "decode"}  # the loop's named ranges
    runs = result["runs"]
    assert set(runs) == {
        "original_one_at_a_time_4bit",
        "engine_4bit_batch8",
        "engine_4bit_batch8_stop_check_every4",
        "engine_static_4bit_batch8",
        "plain_generate_4bit_batch8",
        "engine_merged_bf16_batch8",
        "engine_static_4bit_batch8_adapter_in_compute_dtype",
        "engine_static_4bit_batch8_fused_lora_inference",
        "engine_static_4bit_batch8_max_batch_tokens1024",
        "engine_static_4bit_batch8_fused_lora_inference_max_batch_tokens1024",
    }
    # Another loop's answers on random weights are compared, not required equal: bitsandbytes' 4-bit CPU kernels
    # compute in bf16 on CPUs with AVX512-BF16, where the loops' last-bit differences can flip a near-tie.
    # test_generation requires the loops' answers equal in fp32.
    static = runs["engine_static_4bit_batch8"]["identical_to_engine"]
    assert 0 <= static <= 1 and 0 <= runs["engine_static_4bit_batch8_fused_lora_inference"]["identical_to_engine"] <= 1
    # the CPU computes in fp32, as peft keeps the adapter: nothing to cast, the static loop's answers unchanged
    adapter = runs["engine_static_4bit_batch8_adapter_in_compute_dtype"]
    assert adapter["lora_tensors_cast"] == 0 and adapter["identical_to_engine"] == static
    smaller = runs["engine_static_4bit_batch8_max_batch_tokens1024"]  # 16 prompts of ~190 tokens: several batches
    assert smaller["max_batch_tokens"] == 1024 and 0 <= smaller["identical_to_engine"] <= 1
    smaller_fused = runs["engine_static_4bit_batch8_fused_lora_inference_max_batch_tokens1024"]
    assert smaller_fused["max_batch_tokens"] == 1024 and 0 <= smaller_fused["identical_to_engine"] <= 1
    assert runs["plain_generate_4bit_batch8"]["examples"] == 8  # every 1,000th of the 7,507 prompts
    assert runs["engine_4bit_batch8_stop_check_every4"]["identical_to_engine"] == 1.0
    assert 0 <= runs["plain_generate_4bit_batch8"]["identical_to_engine"] <= 1
    assert runs["engine_4bit_batch8"]["examples"] == 16 and runs["engine_4bit_batch8"]["speedup_vs_original"] > 0


def test_generation_benchmark_liger_kernels_refused_without_a_gpu(tmp_path):
    """Liger's kernels are Triton: asked for (QLORA_KIT_INFERENCE_KERNELS=liger, as evaluation reads it) without
    liger-kernel or without a GPU, the benchmark stops before any run, saying which, and writes nothing; so does a
    value that is no choice."""
    out = tmp_path / "g.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "generation_throughput.py"), "--tiny", "--model_dir",
               str(tmp_path / "m"), "--out", str(out), "--fused_max_batch_tokens", "1024"]  # fmt: skip
    for variable, expected in [
        ("liger", "QLORA_KIT_INFERENCE_KERNELS=liger: "),
        ("triton", "QLORA_KIT_INFERENCE_KERNELS=triton: leave it unset"),
    ]:
        env = {**os.environ, "QLORA_KIT_INFERENCE_KERNELS": variable}
        refused = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
        assert refused.returncode != 0 and refused.stderr.strip().splitlines()[-1].startswith(expected)
        assert "Traceback" not in refused.stderr and not out.exists()


def test_train_benchmark_tiny(tmp_path):
    out = tmp_path / "t.json"
    _run(
        "train_throughput.py",
        "--tiny",
        "--model_dir",
        tmp_path / "m",
        "--out",
        out,
        "--steps",
        1,
        "--warmup_steps",
        1,
        "--tasks",
        "summarization",
        "--recipes",
        "bare PyTorch + peft loop, original recipe, all modules",
        "original, all modules",
        "fast, all modules",
        "fast without LoRA dropout, all modules",
        "packed rows x 16, fused AdamW, Liger, all modules",
        "--repeats",
        2,
        "--profile_steps",
        1,
        "--scratch",
        tmp_path / "s",
    )
    result = json.loads(out.read_text())
    tiny = json.loads((tmp_path / "m" / "config.json").read_text())
    assert result["model"]["hidden_size"] == tiny["hidden_size"] and result["model"]["model_type"] == "mistral"
    runs = result["runs"]
    fast = runs["summarization: fast, all modules"]
    # profiled after the timed passes: their windows stay two
    assert fast["profile"]["steps"] == 1 and fast["profile"]["by_kind_seconds"]["matrix products"] > 0
    assert fast["tokens_per_second"] > 0 and fast["speedup_vs_bare_loop_original"] > 0 and fast["group_by_length"]
    assert len(fast["window_seconds"]) == 2 and fast["tokens_per_second_min"] <= fast["tokens_per_second_max"]
    assert fast["which"] == "this project's trainer" and fast["achieved_tflops"] > 0
    bare = runs["summarization: bare PyTorch + peft loop, original recipe, all modules"]
    assert bare["which"].startswith("the baseline") and bare["grad_accum"] == 2 and not bare["group_by_length"]
    # the hand-written loop (and the peer's, which runs the same loop) profiled as the trainer is, after its passes
    assert bare["profile"]["steps"] == 1 and bare["profile"]["by_kind_seconds"]["matrix products"] > 0
    assert len(bare["window_seconds"]) == 2
    # the warm-up's own time (where a compiled runner pays its compiling), beside the timed passes
    assert fast["warmup_seconds"] > 0 and bare["warmup_seconds"] > 0
    # the same rows: the same non-padding tokens per pass for the same rows per step
    assert bare["timed_tokens"] == runs["summarization: original, all modules"]["timed_tokens"]
    assert runs["summarization: original, all modules"]["grad_accum"] == 2
    assert runs["summarization: packed rows x 16, fused AdamW, Liger, all modules"]["examples_per_second"] > 0
    # the peak covers the worst batch: the first step holds the task's longest examples, padded to the longest
    longest = max(
        total for total, _ in json.loads((ROOT / "benchmarks" / "train_lengths.json").read_text())["summarization"]
    )
    assert fast["largest_batch_rows_x_width"] == [fast["batch_size"], longest]
    assert fast["batch_size"] == 32 and fast["learning_rate"] == 8e-4
    # the recipes' LoRA dropout, and a candidate without it, recorded with each run
    no_dropout = runs["summarization: fast without LoRA dropout, all modules"]
    assert (fast["lora_dropout"], no_dropout["lora_dropout"]) == (0.1, 0.0) and no_dropout["tokens_per_second"] > 0


def test_step_anatomy_names_the_source_and_pass_of_every_operation(tmp_path):
    """One training step recorded operation by operation: what the recipe changes shows where it should."""
    out = tmp_path / "a.json"
    default, lean = "fast, all modules", "fast without LoRA dropout, fused LoRA, all modules"
    common = ("--tiny", "--model_dir", tmp_path / "m", "--batch_size", 4, "--scratch", tmp_path / "s")
    _run("step_anatomy.py", *common, "--full_layers", 8, "--recipes", default, lean, "--out", out)
    runs = json.loads(out.read_text())["runs"]
    summary = {name: run["summary"]["per_position"] for name, run in runs.items()}
    operations = runs[default]["operations"]
    # every pass of a checkpointed step, and almost every byte with the module that asked for it
    assert {"pass: forward", "pass: recompute", "pass: backward"} <= set(summary[default])
    unattributed = sum(row["bytes"] for row in operations if row["module"] == "-" and row["phase"] != "no grad")
    assert unattributed < 0.01 * sum(row["bytes"] for row in operations)
    # a custom autograd Function's forward (bitsandbytes' 4-bit product) runs without gradients: still the forward
    assert not [row for row in operations if row["phase"] == "no grad" and row["module"] != "-"]
    # the tiny model's 2 layers scaled to 8: a layer's rows count 4 times, the head's once
    assert runs[default]["summary"]["layer_rows_scaled_by"] == 4
    # LoRA's dropout masks each adapted layer's input in the default, and is gone without it
    assert summary[default]["source: LoRA dropout"]["bytes_outside_matrix_products"] > 0
    assert "source: LoRA dropout" not in summary[lean]
    # peft copies, scales and sums each adapted layer's output; the fused layers add the adapter in place
    copies = "source: peft's copy, scaling and sum around an adapted layer"
    assert (
        summary[lean][copies]["bytes_outside_matrix_products"]
        < 0.5 * summary[default][copies]["bytes_outside_matrix_products"]
    )
    # a fused layer's backward (its own autograd node) belongs to the adapted layer, not to the next operation
    products = [row for row in runs[lean]["operations"] if row["phase"] == "backward" and row["op"] == "mm"]
    fused = "fused LoRA layer's products (4-bit base + adapter)"
    assert products and {row["source"] for row in products} <= {fused, "embedding, head and loss"}
    # the same matrix products either way (the model's FLOPs do not depend on how the adapter is added)
    flops = {name: value["all"]["matrix_product_flops"] for name, value in summary.items()}
    assert 0.9 < flops[lean] / flops[default] < 1.1 and flops[default] > 0
    # the operations moving data, counted by source: fewer with the fused layers, none of peft's adapter products
    operations = {name: value["all"]["operations_per_step"] for name, value in summary.items()}
    assert 0 < operations[lean] < operations[default]
    assert summary[default]["source: LoRA adapter products"]["operations_per_step"] > 0
    assert "source: LoRA adapter products" not in summary[lean]
    table = _run("step_anatomy.py", "--table", out, "--operations").stdout
    assert f"| **all** | {operations[default]:,} | {operations[lean]:,} |" in table


def test_fused_rms_norms_compute_the_llama_norm_and_its_gradients(tiny_model):
    """The benchmark's fused-RMSNorm lever: every norm of a Llama-form model patched, the same loss and gradients
    (one bf16 rounding less is the only difference; here in fp32)."""
    import torch
    from transformers import AutoModelForCausalLM

    train_throughput = _train_throughput_module()
    models = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        for module in model.modules():  # norms that are not all ones
            if type(module).__name__.endswith("RMSNorm"):
                torch.nn.init.uniform_(module.weight, 0.5, 1.5)
        if fused:
            assert train_throughput.fuse_rms_norms(model) == 2 * model.config.num_hidden_layers + 1
        models.append(model)
    ids = torch.randint(3, models[0].config.vocab_size, (2, 9))
    losses = []
    for model in models:
        losses.append(model(input_ids=ids, labels=ids).loss)
        losses[-1].backward()
    torch.testing.assert_close(losses[0], losses[1])
    for (name, plain), (_, fused) in zip(models[0].named_parameters(), models[1].named_parameters()):
        torch.testing.assert_close(plain.grad, fused.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_train_benchmark_data_parallel_trains_every_process_on_the_rows_of_one(tmp_path):
    """Under two processes every process trains the rows one process would (the same per-device batch): twice
    the tokens per pass; runners other than the project's trainer are refused in one line."""
    from conftest import torchrun_command, torchrun_env

    def launch(*args):
        command = torchrun_command("benchmarks/train_throughput.py", *args)
        return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT, env=torchrun_env())

    common = ["--tiny", "--model_dir", tmp_path / "m", "--steps", 2, "--warmup_steps", 1, "--repeats", 1]
    common += ["--tasks", "summarization", "--scratch", tmp_path / "s"]
    _run("train_throughput.py", *common, "--recipes", "fast, all modules", "--out", tmp_path / "one.json")
    two = launch(*common, "--recipes", "fast, all modules", "--out", tmp_path / "two.json")
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-4000:]
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert (one["processes"], two["processes"]) == (1, 2)
    run_one, run_two = (r["runs"]["summarization: fast, all modules"] for r in (one, two))
    assert run_two["processes"] == 2 and run_two["timed_tokens"] == 2 * run_one["timed_tokens"]
    # each process trained every row once, not half of them or all of them twice
    assert run_two["trained_tokens"] == 2 * run_one["trained_tokens"] > 0
    assert run_two["tokens_per_second"] > 0 and run_two["achieved_tflops"] > 0
    refused = launch(*common, "--recipes", "bare PyTorch + peft loop, original recipe, all modules")
    assert refused.returncode != 0 and "runs in one process only" in refused.stderr


def test_per_process_rows_deal_each_process_every_micro_batch():
    train_throughput = _train_throughput_module()
    rows = list(range(6))
    dealt = train_throughput.per_process_rows(rows, 2, 2)
    assert dealt == [0, 1, 0, 1, 2, 3, 2, 3, 4, 5, 4, 5]
    # the loader deals micro-batches in turn: process p takes micro-batches p, p + 2, ...
    for process in range(2):
        mine = [row for index in range(process, len(dealt) // 2, 2) for row in dealt[2 * index : 2 * index + 2]]
        assert mine == rows
    assert train_throughput.per_process_rows(rows, 2, 1) == rows


def test_train_benchmark_rows_follow_the_real_lengths():
    train_throughput = _train_throughput_module()

    lengths = [total for total, _ in json.loads(train_throughput.LENGTHS.read_text())["classification"]]
    real = train_throughput.task_lengths("classification")
    warm, grouped = train_throughput.synthetic_rows(real, 1000, 8, 2, 10, True, False, 512, 0)
    _, shuffled = train_throughput.synthetic_rows(real, 1000, 8, 2, 10, False, False, 512, 0)
    sizes = [len(row["input_ids"]) for row in grouped]
    assert len(warm) == 16 and len(grouped) == 80
    assert [len(row["input_ids"]) for row in warm[:8]] == sorted(lengths)[-8:]
    assert sizes == sorted(sizes, reverse=True)  # length-grouped: each batch holds similar lengths
    assert sorted(len(row["input_ids"]) for row in shuffled) == sorted(sizes)  # same examples, other order
    assert abs(sum(sizes) / len(sizes) - sum(lengths) / len(lengths)) < 0.1 * sum(lengths) / len(lengths)
    _, packed = train_throughput.synthetic_rows(real, 1000, 8, 2, 10, False, True, 512, 0)
    assert len(packed) == 80 and all(len(row["input_ids"]) <= 512 for row in packed)


def test_profile_kinds_name_the_kernels():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import profiling
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert profiling.kind("sm90_xmma_gemm_bf16bf16_bf16f32") == "matrix products"
    assert profiling.kind("aten::mm") == "matrix products"
    assert profiling.kind("void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>") == "4-bit dequantisation"
    assert profiling.kind("pytorch_flash::flash_fwd_kernel") == "attention"
    assert profiling.kind("autograd::engine::evaluate_function: MmBackward0") == "autograd bookkeeping (host)"
    assert profiling.kind("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add>") == (
        profiling.OTHER
    )


def test_profile_counts_the_kernels_and_their_launches():
    """A profile's kernels run and the host's launch calls, counted (a GPU's profile: kernels have device time)."""
    from types import SimpleNamespace

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import profiling
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    def event(key, count, device_us=0.0, cpu_us=1.0):
        return SimpleNamespace(
            key=key, count=count, self_device_time_total=device_us, device_time_total=device_us,
            self_cpu_time_total=cpu_us, cpu_time_total=cpu_us,
        )  # fmt: skip

    events = [
        event("sm90_xmma_gemm_bf16bf16_bf16f32", 6, device_us=60.0),
        event("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add>", 9, device_us=9.0),
        event("aten::mm", 6, device_us=60.0),  # the operator, not a kernel of its own
        event("cudaLaunchKernel", 9),
        event("cuLaunchKernelEx", 4),  # cuBLAS through the driver
        event("cudaGraphLaunch", 1),  # a graph's replay: one launch
    ]
    result = profiling.summary(events, wall_seconds=0.001)
    assert (result["kernels_run"], result["kernel_launches"]) == (15, 14)
    assert "kernels_run" not in profiling.summary([event("aten::mm", 6)], wall_seconds=0.001)  # the CPU: none


def test_flops_per_token_works_the_numbers():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import training_batches as tb
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    weights = 7_000_000_000
    # forward 2P, backward of the activations 2P, the recomputed forward 2P
    assert tb.flops_per_token(weights, 0, 0, 300, checkpointing=True) == 6 * weights
    assert tb.flops_per_token(weights, 0, 0, 300, checkpointing=False) == 4 * weights
    # attention: 4 x hidden per earlier token and layer forward (mean context: half the row), 2x that backward
    assert tb.flops_per_token(0, 2, 10, 100, checkpointing=False) == 4 * 2 * 10 * 50 * 3
    summary = tb.summary([2.0, 1.0, 4.0], tokens=400, examples=8)
    assert summary["tokens_per_second"] == 200 and summary["tokens_per_second_min"] == 100
    assert summary["tokens_per_second_spread_percent"] == 150 and summary["examples_per_second"] == 4


def test_generation_benchmark_on_a_trained_run(trained_run_for_resume, data_dir, tmp_path):
    """generation_real_model.py on a tiny trained run: every way runs, and on the CPU in fp32 the engine, the
    plain path and one-at-a-time greedy give the same answers."""
    out = tmp_path / "g.json"
    _run(
        "generation_real_model.py",
        "--experiment_dir",
        trained_run_for_resume,
        "--test_file",
        data_dir / "news_test.jsonl",
        "--decoding",
        "constrained",
        "--batch_sizes_plain",
        4,
        "--one_at_a_time",
        5,
        "--profile",
        "--static_batch_tokens",
        160,
        "--compact_below",
        0.5,
        "--fused_lora_inference",
        "--static_prefill_tokens",
        16,
        "--recheck_margins",
        "inf",
        "--out",
        out,
    )
    result = json.loads(out.read_text())
    runs = result["runs"]
    merged = {"engine_static_adapter_merged_call1", "engine_static_adapter_merged_call2"}  # the base is 16-bit
    merged |= {
        "engine_static_adapter_merged_compact_below0.5_call1",
        "engine_static_adapter_merged_compact_below0.5_call2",
    }
    ways = {"engine_call1", "engine_call2", "engine_stop_check_every4", "plain_generate_batch4", "one_at_a_time"}
    ways |= {"decode_alone"}  # what a recheck runs, against one at a time
    static = {f"engine_static_check_every{every}_call{call}" for every in (1, 4) for call in (1, 2)}
    # in smaller batches, with the product in place as --fused_lora_inference asks
    static |= {"engine_static_fused_lora_inference_batch_tokens160_call1"}
    static |= {"engine_static_fused_lora_inference_batch_tokens160_call2"}
    # dropping finished rows: the same answers
    static |= {"engine_static_fused_lora_inference_compact_below0.5_call1"}
    static |= {"engine_static_fused_lora_inference_compact_below0.5_call2"}
    static |= {"engine_static_fused_lora_inference_call1", "engine_static_fused_lora_inference_call2"}
    static |= {"engine_static_prefill_tokens16_call1", "engine_static_prefill_tokens16_call2"}  # many small groups
    static |= {"engine_static_recheck_margininf_call1", "engine_static_recheck_margininf_call2"}  # all decoded alone
    assert set(runs) == ways | merged | static
    assert runs["engine_stop_check_every4"]["identical_to_engine"] == 1.0  # the same answers, whatever the check
    assert all(runs[name]["identical_to_engine"] == 1.0 for name in static)  # and whatever the loop
    assert runs["one_at_a_time"]["engine_static_check_every4_identical_share"] == 1.0
    assert runs["engine_static_fused_lora_inference_call2"]["one_at_a_time_identical_share"] == 1.0  # fp32
    assert set(result["profile_engine"]["ranges"]) == {"prefill", "decode"}
    assert result["profile_engine"]["loop"] == "static"  # the default on a GPU
    # merged weights round differently from base + LoRA: near-ties may flip, most answers may not
    assert runs["engine_static_adapter_merged_call1"]["identical_to_engine"] >= 0.9
    dropped = runs["engine_static_adapter_merged_compact_below0.5_call1"]  # merged, finished rows dropped
    assert dropped["metrics"] == runs["engine_static_adapter_merged_call2"]["metrics"]
    assert 0.8 <= runs["engine_static_adapter_merged_call2"]["one_at_a_time_identical_share"] <= 1  # in the file
    assert runs["engine_call1"]["examples"] == 12 and runs["one_at_a_time"]["examples"] == 5
    assert runs["plain_generate_batch4"]["identical_to_engine"] == 1.0
    assert runs["one_at_a_time"]["engine_identical_share"] == 1.0
    # scored against one at a time on its prompts, paired: the same answers in fp32, so no difference either way
    no_difference = {"difference": 0.0, "ci": [0.0, 0.0], "n": 5}
    assert runs["one_at_a_time"]["engine_against_one_at_a_time"]["differences"] == {"accuracy": no_difference}
    later = runs["engine_static_fused_lora_inference_call2"]["against_one_at_a_time"]
    assert later["differences"] == {"accuracy": no_difference} and later["mcnemar"]["p_value"] == 1.0
    assert runs["engine_call1"]["metrics"]["invalid"] == 0  # constrained: always a label
    assert runs["engine_call2"]["metrics"] == runs["engine_call1"]["metrics"]
    # each later call says how many of its first call's answers it repeats (all, on the CPU in fp32)
    assert "identical_to_first_call" not in runs["engine_call1"]
    assert runs["engine_call2"]["identical_to_first_call"] == 1.0
    assert runs["engine_static_check_every1_call2"]["identical_to_first_call"] == 1.0
    # every answer rechecked at an infinite margin; what smaller margins would recheck, from the recorded margins
    assert runs["engine_static_recheck_margininf_call1"]["rechecked"] == 12
    assert runs["decode_alone"]["identical_to_one_at_a_time"] == 1.0 and runs["decode_alone"]["examples"] == 5
    assert "rechecked" not in runs["engine_static_check_every1_call1"]
    ties = runs["one_at_a_time"]["near_ties"]
    assert runs["decode_alone"]["near_ties"] == ties  # decoded alone, the same answers as one at a time
    assert ties["differing_margins"] == []  # fp32: no answer differs
    shares = [ties["by_margin"][f"{m:g}"]["share_rechecked"] for m in (0.0625, 0.125, 0.25, 0.5, 1, 2, 4)]
    assert shares == sorted(shares) and 0 <= shares[0] and shares[-1] <= 1
    assert {grid["identical_share_if_rechecked"] for grid in ties["by_margin"].values()} == {1.0}


def test_generation_benchmark_runs_the_adapter_variants_in_the_loop_asked(trained_run_for_resume, data_dir, tmp_path):
    """--variant_loop dynamic: the in-place adapter product and the merged adapter through the growing cache (the
    CPU's loop), named so; in fp32 their answers are the engine's. --batch_size: every engine way's batches.
    --merged_first: the merged adapter once more, before every other way (--profile_first: its first call profiled,
    the host's largest costs among it). --one_at_a_time 0: none generated one at a time, and no way compared with
    them. --exact_reductions and --sdpa_backend: recorded (on the CPU in fp32 they change nothing). Every call
    records each batch's rows and seconds."""
    out = tmp_path / "g.json"
    _run(
        "generation_real_model.py", "--experiment_dir", trained_run_for_resume, "--test_file",
        data_dir / "news_test.jsonl", "--decoding", "constrained", "--limit", 6, "--engine_calls", 1,
        "--batch_sizes_plain", "--one_at_a_time", 0, "--stop_check_every", 1, "--static_stop_check_every",
        "--fused_lora_inference", "--variant_loop", "dynamic", "--batch_size", 4, "--merged_first",
        "--exact_reductions", "--sdpa_backend", "math", "--profile_first", "--out", out,
    )  # fmt: skip
    result = json.loads(out.read_text())
    assert result["exact_reductions"] and result["sdpa_backend"] == "math"  # the numerics, in the file
    runs = result["runs"]
    variants = {"engine_dynamic_fused_lora_inference_call1", "engine_dynamic_adapter_merged_call1"}
    assert set(runs) == {"engine_call1", "engine_dynamic_adapter_merged_first_call1"} | variants
    assert list(runs)[0] == "engine_dynamic_adapter_merged_first_call1"  # --merged_first: before any other way
    first = runs["engine_dynamic_adapter_merged_first_call1"]
    assert first["metrics"] == runs["engine_dynamic_adapter_merged_call1"]["metrics"]
    assert "identical_to_engine" not in first  # nothing had run to compare with
    assert first["profile"]["host_largest"] and "profile" not in runs["engine_call1"]
    for run in runs.values():  # 6 prompts in batches of at most 4: two batches, each timed
        assert run["batch_rows"] == [4, 2] or run["batch_rows"] == [2, 4]
        assert len(run["batch_seconds"]) == 2 and 0 < sum(run["batch_seconds"]) <= run["seconds"] + 1e-3  # rounded
    assert runs["engine_dynamic_fused_lora_inference_call1"]["identical_to_engine"] == 1.0
    assert not any("one_at_a_time_identical_share" in run for run in runs.values())
    assert runs["engine_call1"]["final_batch_size"] == 4  # the flag's, not the CPU's default


def test_every_recipe_the_lab_names_exists():
    """The GPU stages name benchmark recipes by their full names: a misspelt one would end a sitting's stage."""
    import re

    train_throughput = _train_throughput_module()
    named = set()
    for script in ("gpu_session.sh", "multi_gpu.sh"):
        text = (ROOT / "reproduce" / script).read_text()
        # a recipe name, or a run's key in a result file ("TASK: RECIPE")
        named |= set(
            re.findall(r'"(?:classification: |summarization: )?([^"$]*(?:all modules|every linear layer|q,v))"', text)
        )
    assert len(named) > 15
    assert named <= set(train_throughput.RECIPES), sorted(named - set(train_throughput.RECIPES))


def test_prefill_work_counts_the_positions_a_shared_prefix_saves(tiny_model, data_dir, tmp_path):
    """benchmarks/prefill_work.py on the tiny model and data (laid out as the real data's folders): the few-shot
    prompts share their examples, so prefill computes fewer positions with sharing, and the timed answers with
    and without sharing are the same (fp32)."""
    import gzip
    import shutil

    for task, prefix in (("newsgroups", "news"), ("samsum", "dialogues")):
        (tmp_path / task).mkdir()
        for split in ("train", "test"):
            with open(data_dir / f"{prefix}_{split}.jsonl", "rb") as plain:
                with gzip.open(tmp_path / task / f"{split}.jsonl.gz", "wb") as packed:
                    shutil.copyfileobj(plain, packed)
    out = tmp_path / "work.json"
    common = ["--tokenizer", tiny_model, "--data_dir", tmp_path, "--max_batch_tokens", 0, 2000, "--out", out]
    _run("prefill_work.py", *common, "--formats", "finetune/seed", "few-shot/seed", "--time", 4, "--repeats", 1)
    formats = json.loads(out.read_text())["formats"]
    few_shot = formats["classification: few-shot/seed"]
    assert few_shot["budgets"]["rows only"]["shared_prefix_tokens_per_batch"]["min"] > 16
    for budget in ("rows only", "2000"):  # 2,000 tokens a batch: a batch of one prompt shares nothing
        counted = few_shot["budgets"][budget]
        assert counted["positions_with_sharing"] < 0.7 * counted["positions_without_sharing"]
    assert few_shot["timed"]["same_answers"] == 1.0 and few_shot["timed"]["examples"] == 4
    # the fine-tuning prompts of the original format begin with a few tokens only: nothing shared
    plain = formats["summarization: finetune/seed"]["budgets"]["rows only"]
    assert plain["positions_with_sharing"] == plain["positions_without_sharing"]


def test_inference_overhead_times_an_evaluation_without_generating(trained_run_for_resume, data_dir, tmp_path):
    """inference_overhead.py: the inference script's whole run with instant answers; every stage timed, the run's
    files written (to its own folder, not the run's), nothing generated."""
    out, written = tmp_path / "o.json", tmp_path / "eval"
    _run(
        "inference_overhead.py",
        "--task",
        "classification",
        "--experiment_dir",
        trained_run_for_resume,
        "--test_file",
        data_dir / "news_test.jsonl",
        "--output_dir",
        written,
        "--out",
        out,
    )
    result = json.loads(out.read_text())
    assert result["examples"] == 12 and result["wall_seconds_without_generation"] > 0
    assert all(seconds > 0 for seconds in result["stage_seconds"].values()), result["stage_seconds"]
    metrics = json.loads((written / "metrics.json").read_text())
    assert metrics["invalid"] == 0 and metrics["n"] == 12  # every answer the first label: valid, mostly wrong


def test_inference_overhead_answers_a_summary_with_text_to_score(trained_summarizer, data_dir, tmp_path):
    """For summarization the instant answers are texts of a summary's length (the prompt's own last tokens), so that
    the scoring stage compares real texts: every prediction is non-empty."""
    written = tmp_path / "eval"
    _run(
        "inference_overhead.py",
        "--task",
        "summarization",
        "--experiment_dir",
        trained_summarizer,
        "--test_file",
        data_dir / "dialogues_test.jsonl",
        "--output_dir",
        written,
    )
    predictions = [json.loads(line) for line in (written / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 6 and all(row["output"].strip() for row in predictions), predictions


def test_forward_ops_counts_what_each_way_of_adding_the_adapter_runs(tmp_path):
    """forward_ops.py on the tiny 7B-shaped model with an adapter on every linear layer: the product added in place
    runs fewer operations than peft's layers (no separate scaling and sum), the merged adapter fewer still (none)."""
    out = tmp_path / "ops.json"
    _run("forward_ops.py", "--tiny", "--tiny_dir", tmp_path / "m", "--out", out)
    ways = json.loads(out.read_text())["ways"]
    peft, fused, merged = (ways[name]["operations"] for name in ways)
    assert peft > fused > merged > 0
    adapted = 2 * 7  # two decoder layers of 7 adapted projections ("all-linear" leaves lm_head out)
    assert ways[next(iter(ways))]["by_name"]["aten::linear"] == 3 * adapted + 1  # base, A, B of each; lm_head
    assert list(ways)[1].startswith("adapter's product added in place")
    assert fused == peft - 2 * adapted  # per layer: mm + addmm_ instead of 2 linear, mul and add


def test_batched_against_one_at_a_time(trained_run_for_resume, data_dir, tmp_path):
    """batched_vs_single.py on a tiny trained run: in fp32 batching changes no answer; in bf16 with the logits in
    fp32 it runs and says what it computed in; rechecked at a margin no lead reaches, every answer is decoded alone
    and equals one at a time's, and each answer that differed in the batch has its lead recorded."""
    common = ["--experiment_dir", trained_run_for_resume, "--test_file", data_dir / "news_test.jsonl"]
    common += ["--constrained", "--batch_size", 4]
    _run("batched_vs_single.py", *common, "--out", tmp_path / "fp32.json")
    exact = json.loads((tmp_path / "fp32.json").read_text())
    assert exact["same_output_text_rate"] == 1.0 and exact["examples"] == 12 and exact["dtype"] == "torch.float32"
    bf16 = ["--every", 2, "--bf16", "--lm_head_fp32", "--recheck_margins", 1000]
    _run("batched_vs_single.py", *common, *bf16, "--out", tmp_path / "bf16.json")
    rounded = json.loads((tmp_path / "bf16.json").read_text())
    assert rounded["examples"] == 6 and rounded["dtype"] == "torch.bfloat16" and rounded["lm_head_fp32"]
    assert 0 <= rounded["same_parsed_label_rate"] <= 1
    assert len(rounded["differing_margins"]) == 6 - rounded["same_output_text"]
    assert rounded["rechecked"]["1000"]["decoded_alone"] == 6 and rounded["rechecked"]["1000"]["same_output_text"] == 6


def test_summarize_passes_gives_each_runs_median_and_spread_per_setting(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import summarize_passes
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    for setting, seconds in (("a", [60.0, 50.0, 70.0]), ("b", [40.0, 45.0, 41.0])):
        for number, value in enumerate(seconds, 1):
            runs = {"first": {"seconds": value, "examples_per_second": 100 / value, "peak_gpu_memory_gb": 20.0}}
            if number < 3:  # a run only some passes have is left out
                runs["partial"] = {"seconds": 1.0, "examples_per_second": 1.0, "peak_gpu_memory_gb": None}
            (tmp_path / f"bench_{setting}_pass{number}.json").write_text(json.dumps({"runs": runs}))
    table = summarize_passes.summarize(sorted(tmp_path.glob("*.json")))
    assert set(table) == {"bench_a", "bench_b"} and set(table["bench_a"]) == {"first"}
    assert table["bench_a"]["first"]["seconds"] == {"median": 60.0, "min": 50.0, "max": 70.0, "n": 3}
    assert table["bench_b"]["first"]["examples_per_second"]["median"] == 100 / 41.0
    assert (
        "| bench_b | first | 3 | 41.0 (40.0-45.0) | 2.4 (2.2-2.5) | 20.00 (20.00-20.00) |"
        in summarize_passes.markdown(table)
    )
    (tmp_path / "other.json").write_text("{}")
    bad = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "summarize_passes.py"), str(tmp_path / "other.json")],
        capture_output=True,
        text=True,
    )
    assert (
        bad.returncode == 1
        and bad.stderr.strip() == f"{tmp_path / 'other.json'}: not a pass's file (its name should end in _passN.json)"
    )


def test_near_ties_counts_what_rechecking_would_decode_again_and_repair():
    """Of four answers, the two that differ from one at a time's came within 0.1 and 3 logits of a tie: a margin of
    0.125 rechecks the two answers under it (half) and repairs one of the two differences, 4 both."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import generation_real_model
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    margins = [0.1, 5.0, 3.0, 0.05]
    outputs = [[1], [2], [3], [4]]
    ties = generation_real_model.near_ties(margins, outputs, [0, 1, 2, 3], [[9], [2], [9], [4]])
    assert ties["differing_margins"] == [0.1, 3.0]
    assert ties["by_margin"]["0.125"] == {"share_rechecked": 0.5, "identical_share_if_rechecked": 0.75}
    assert ties["by_margin"]["4"] == {"share_rechecked": 0.75, "identical_share_if_rechecked": 1.0}
    assert ties["by_margin"]["0.0625"] == {"share_rechecked": 0.25, "identical_share_if_rechecked": 0.5}
    # decoded alone, the first answer comes out as neither: rechecking it repairs nothing
    alone = generation_real_model.near_ties(margins, outputs, [0, 1, 2, 3], [[9], [2], [9], [4]], [[7], [2], [9], [4]])
    assert alone["by_margin"]["0.125"] == {"share_rechecked": 0.5, "identical_share_if_rechecked": 0.5}
    assert alone["by_margin"]["4"] == {"share_rechecked": 0.75, "identical_share_if_rechecked": 0.75}


def test_lora_inputs_left_uncast_train_the_same_with_fewer_casts(tiny_model):
    """keep_lora_inputs_uncast: over a bf16 base with an fp32 adapter, under bf16 autocast as training runs, the same
    loss and adapter gradients with fewer cast kernels (peft's cast of each input to fp32, autocast's back)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM

    train_throughput = _train_throughput_module()

    def step(uncast):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16)
        config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, target_modules="all-linear")
        model = get_peft_model(model, config)
        assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
        if uncast:
            assert train_throughput.keep_lora_inputs_uncast(model) > 0
        ids = torch.arange(1, 17).reshape(2, 8)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        casts = sum(event.count for event in prof.key_averages() if event.key == "aten::_to_copy")
        grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
        return loss.detach(), grads, casts

    loss, grads, casts = step(uncast=False)
    loss_uncast, grads_uncast, casts_uncast = step(uncast=True)
    torch.testing.assert_close(loss_uncast, loss)
    for name in grads:
        torch.testing.assert_close(grads_uncast[name], grads[name])
    assert casts_uncast < casts, (casts_uncast, casts)
