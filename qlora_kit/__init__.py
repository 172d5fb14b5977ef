"""QLoRA fine-tuning and evaluation of chat LLMs on 20 Newsgroups and SAMSum.

The modules, in the order a run goes through them (the top-level scripts are thin entry points into these):

  what a run is
    settings        training settings: one typed object; defaults < recipe file (recipes/*.yaml) < flags
    cli             the flags, made from the settings; train_cli / eval_cli: the scripts' shared bodies
    tasks           a task in one place: columns, cleaning, prompts, answers, metrics, defaults
    run_folder      every path of a run's folder
  training
    data            loading, validating and cleaning rows (local files or the Hub)
    formatting      rows to token ids: prompts from prompts.py, rendered in a style, shortened to fit
    modeling        model sources (Hub id, folder, .gguf), tokenizer fix-ups, 4-bit loading, LoRA targets
    packing         several examples in one row, each attending only to itself
    memory_budget   the largest micro-batch under --max_memory_gb
    sft_trainer     trl's SFTTrainer set up for a recipe
    fused_lora      LoRA layers trained as one autograd function each (--fused_lora); for evaluation,
                    the adapter's product added in place
    training        train(): the stages of a training run, one function each
    selection       scoring each checkpoint on validation while training; the best one marked
  evaluation
    evaluation      a trained run or a zero/few-shot baseline: data, prompts, generation, metrics, files
    generation      the batched greedy engine (growing key/value cache, shared prompt prefix prefilled once),
                    out-of-memory halving
    static_decoding the engine's static-cache loop, replayed as CUDA graphs (the default on a GPU)
    label_likelihood classification by the most probable whole label answer (--decoding likelihood)
    inference_kernels fused element-wise kernels (Liger's) in evaluation's forwards (a 7B-wide 4-bit model on a GPU)
    metrics         label parsing and metrics: small pure functions
    compare         two evaluations of the same items, compared pairwise
  around them
    report          tables, CSV and plots from result files
    results         JSON / JSONL result files, written atomically
    sweep           the shell sweeps' runs: train then evaluate, skipping finished ones
    export          a run's adapter merged into a standalone 16-bit model
    distributed     several processes: the main one, waiting, gathering, closing the group
    console, errors what the console shows; one-line errors instead of tracebacks
"""

__version__ = "0.2.0"
