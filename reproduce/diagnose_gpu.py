"""Print what the GPU machine offers and time the basic steps, to find where training time goes.

Usage: python reproduce/diagnose_gpu.py [MODEL]   (default: the embedded SmolLM2-135M-Instruct)
"""

import subprocess
import sys
import time

import torch

sys.path.insert(0, ".")
from qlora_kit import modeling  # noqa: E402


def timed(fn, repeat=5):
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat


def main():
    name = sys.argv[1] if len(sys.argv) > 1 else modeling.EMBEDDED_MODEL
    print(subprocess.run([sys.executable, "-m", "bitsandbytes"], capture_output=True, text=True).stdout[-1500:])
    source = modeling.resolve_model_source(name)
    from peft import LoraConfig, get_peft_model

    ids = torch.randint(100, 1000, (4, 512), device="cuda")
    for four_bit in (True, False):
        model = modeling.load_model(source, load_in_4bit=four_bit)
        model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
        for checkpointing in (True, False):
            if checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                model.enable_input_require_grads()
            else:
                model.gradient_checkpointing_disable()
            model.train()

            def step(model=model):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = model(input_ids=ids, labels=ids).loss
                loss.backward()

            print(f"4bit={four_bit} checkpointing={checkpointing}: fwd+bwd batch 4x512 {timed(step) * 1000:.1f} ms")
        model.eval()
        with torch.inference_mode():
            print(
                f"4bit={four_bit}: forward 4x512 {timed(lambda m=model: m(input_ids=ids)) * 1000:.1f} ms, one token "
                f"for 64 rows {timed(lambda m=model: m(input_ids=ids[:1, :1].repeat(64, 1))) * 1000:.2f} ms"
            )
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        ) as prof:
            with torch.inference_mode():
                model(input_ids=ids[:1, :1].repeat(64, 1))
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
