"""Uptraining recipe: recover what a conversion lost, from one CPU to many GPUs (accelerate).

    kvslim uptrain out/mqa --teacher src/ --recipe distill --data books/ --tokens 2M -o out/mqa-up
    accelerate launch --config_file recipes/accelerate/ddp.yaml -m kvslim.recipes.uptrain \\
        --config recipes/configs/distill.yaml --set model=out/mqa teacher=src/ data=books/ output=out/mqa-up

Loss = lm * next-token CE + kd * KL(teacher || student) (temperature T) + hidden * MSE of hidden
states. What trains: everything, the attention only, or LoRA adapters on the attention (merged on
save). Checkpoints hold model, optimizer, scheduler, RNG and the data position, so a killed run
resumes where it stopped; a non-finite loss stops the run and keeps the last good checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..convert.adapters import attention_module_names
from ..convert.errors import ConversionError
from ..convert.writer import AtomicDirectory
from .data import DataError, UptrainError, collate, load_documents, packed_rows

CONFIGS = Path(__file__).resolve().parent / "configs"
SUMMARY_FILE = "kvslim_uptrain.json"  # written into every uptrained model: what ran, and its recovery curve


@dataclass
class UptrainConfig:
    model: str = ""
    output: str = ""
    data: list[str] = field(default_factory=list)
    teacher: str | None = None
    eval_data: list[str] = field(default_factory=list)  # default: held-out rows of `data`
    seq_len: int = 512
    tokens: str = "2M"  # training budget; "50M", "500K" or an integer
    micro_batch: int = 8
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    schedule: str = "wsd"  # wsd (warmup-stable-decay) or cosine
    warmup: float = 0.05
    decay: float = 0.2  # wsd: fraction of steps spent decaying
    weight_decay: float = 0.0
    clip: float = 1.0
    lm: float = 1.0
    kd: float = 0.0
    hidden: float = 0.0
    temperature: float = 1.0
    train: str = "all"  # all, attention or lora
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    mixed_precision: str = "no"  # no, bf16, fp16 (where the device supports it)
    gradient_checkpointing: bool = False
    eval_every: int = 50
    eval_rows: int = 16
    checkpoint_every: int = 50
    log_every: int = 10
    report_to: str = "auto"  # also log to: auto (TensorBoard if installed), tensorboard, wandb, all, none
    seed: int = 0
    streaming: bool = False
    overwrite: bool = False  # start fresh: replaces kvslim's earlier output, checkpoints and log of this path
    keep_checkpoints: bool = False  # after a finished run keep every checkpoint, not only the last
    progress: bool = True

    @classmethod
    def load(cls, recipe: str | None = None, overrides: dict | None = None) -> "UptrainConfig":
        import yaml

        values: dict = {}
        if recipe:
            path = Path(recipe) if Path(recipe).suffix in {".yaml", ".yml"} else CONFIGS / f"{recipe}.yaml"
            if not path.is_file():
                names = ", ".join(sorted(p.stem for p in CONFIGS.glob("*.yaml")))
                raise UptrainError(f"Unknown recipe '{recipe}'; available: {names} (or a path to a YAML file).")
            values.update(yaml.safe_load(path.read_text()) or {})
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise UptrainError(f"Unknown setting(s) {', '.join(unknown)}; valid: {', '.join(known)}.")
        for key in ("data", "eval_data"):
            if isinstance(values.get(key), str):
                values[key] = [values[key]]
        return cls(**{key: _typed(key, known[key].type, value) for key, value in values.items()})

    def __post_init__(self) -> None:
        """Refuse values out of range, naming the setting (YAML, --set and the Python API alike)."""
        at_least_one = ("micro_batch", "grad_accum", "eval_every", "eval_rows", "checkpoint_every",
                        "log_every", "lora_r")
        for name in at_least_one:
            if getattr(self, name) < 1:
                raise UptrainError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.seq_len < 2:
            raise UptrainError(f"seq_len must be at least 2 (one token and its target), got {self.seq_len}.")
        if parse_tokens(self.tokens) < 1:
            raise UptrainError(f"tokens must be a positive budget such as 2M or 500K, got '{self.tokens}'.")
        if not self.lr > 0:
            raise UptrainError(f"lr must be positive, got {self.lr}.")
        for name in ("min_lr_ratio", "warmup", "decay", "lora_dropout"):
            if not 0 <= getattr(self, name) <= 1:
                raise UptrainError(f"{name} must be between 0 and 1, got {getattr(self, name)}.")
        for name in ("weight_decay", "clip", "lm", "kd", "hidden"):
            if getattr(self, name) < 0:
                raise UptrainError(f"{name} must not be negative, got {getattr(self, name)}.")
        if not self.temperature > 0:
            raise UptrainError(f"temperature must be positive, got {self.temperature}.")
        for name, valid in CHOICES.items():
            if getattr(self, name) not in valid:
                raise UptrainError(f"{name}='{getattr(self, name)}' is invalid; valid: {', '.join(valid)}.")


CHOICES = {"train": ("all", "attention", "lora"), "schedule": ("wsd", "cosine"),
           "mixed_precision": ("no", "bf16", "fp16")}
# settings that change what a run computes: a resume must use the checkpoint's
NOT_TRAINING_SETTINGS = {"overwrite", "progress", "report_to", "keep_checkpoints", "output"}


def _typed(name: str, annotation: str, value):
    """`value` (from YAML or --set, where 1e-4 reads as a string) as the setting's type."""
    kind = annotation.replace(" ", "").replace("|None", "")
    if value is None:
        return value
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("true", "yes", "on", "1", "false", "no", "off", "0"):
                return text in ("true", "yes", "on", "1")
            raise ValueError
        if kind == "int":
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind == "list[str]":
            return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
        return value if kind != "str" or isinstance(value, str) else str(value)
    except (TypeError, ValueError):
        raise UptrainError(f"Setting {name} must be {'an integer' if kind == 'int' else 'a ' + kind}, "
                           f"got {value!r}.") from None


def parse_tokens(text: str | int) -> int:
    if isinstance(text, int):
        return text
    t = str(text).strip().upper().replace("_", "")
    scale = {"K": 1e3, "M": 1e6, "B": 1e9}.get(t[-1:], 1)
    try:
        return int(float(t[:-1] if scale != 1 else t) * scale)
    except ValueError:
        raise UptrainError(f"Cannot read token budget '{text}'; write it like 2M, 500K or 2000000.") from None


def lr_factor(step: int, total: int, cfg: UptrainConfig) -> float:
    """Multiplier of the peak learning rate at `step` (linear warmup, then WSD or cosine)."""
    warm = max(1, int(cfg.warmup * total))
    if step < warm:
        return (step + 1) / warm
    floor = cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        progress = (step - warm) / max(1, total - warm)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_start = total - max(1, int(cfg.decay * total))
    if step < decay_start:
        return 1.0
    return max(floor, 1.0 - (1.0 - floor) * (step - decay_start + 1) / max(1, total - decay_start))


# ---- model set-up -------------------------------------------------------------------------------


def load_models(cfg: UptrainConfig):
    from .perplexity import load_causal_lm

    for name in ("model", "output"):
        if not getattr(cfg, name):
            raise UptrainError(f"'{name}' is required.")
    student, tokenizer = load_causal_lm(cfg.model)
    limit = getattr(student.config, "max_position_embeddings", None)
    if limit and cfg.seq_len > limit:
        raise UptrainError(f"seq_len {cfg.seq_len} is longer than the model allows ({limit} positions).")
    teacher = None
    if cfg.teacher:
        teacher, teacher_tok = load_causal_lm(cfg.teacher)
        probe = "The quick brown fox jumps over the lazy dog. 12345 ünïcödé"
        if teacher.config.vocab_size != student.config.vocab_size or \
                teacher_tok(probe)["input_ids"] != tokenizer(probe)["input_ids"]:
            raise UptrainError(
                f"The teacher '{cfg.teacher}' uses a different tokenizer than the student: distillation needs "
                "the same vocabulary (use the unconverted source model as teacher).")
        teacher.requires_grad_(False)
    elif cfg.kd or cfg.hidden:
        raise UptrainError("kd/hidden losses need a teacher (--teacher, the unconverted source model).")
    if cfg.gradient_checkpointing:
        student.gradient_checkpointing_enable()
    if cfg.train in ("attention", "lora"):
        attention = tuple(f"{name}." for name in attention_module_names(student))  # the architecture's own names
    if cfg.train == "attention":
        for name, p in student.named_parameters():
            p.requires_grad_(name.startswith(attention))
    elif cfg.train == "lora":
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise UptrainError("train: lora (the lora_distill recipe) needs peft: pip install 'kvslim[peft]'.") from None
        from transformers.pytorch_utils import Conv1D

        targets = sorted(n for n, m in student.named_modules()
                         if n.startswith(attention) and isinstance(m, (torch.nn.Linear, Conv1D)))
        student = get_peft_model(student, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                                     lora_dropout=cfg.lora_dropout, target_modules=targets))
    return student, teacher, tokenizer


def build_data(cfg: UptrainConfig, tokenizer, total_rows: int):
    if not cfg.data:
        raise UptrainError("'data' is required: local files/directories or datasets ids.")
    docs = load_documents(cfg.data, streaming=cfg.streaming)
    if cfg.eval_data:
        eval_rows = packed_rows(load_documents(cfg.eval_data), tokenizer, cfg.seq_len, cfg.eval_rows)
        train_rows = packed_rows(docs, tokenizer, cfg.seq_len, total_rows)
    else:  # hold out the first rows of the training data for evaluation
        rows = packed_rows(docs, tokenizer, cfg.seq_len, total_rows + cfg.eval_rows)
        if len(rows) <= cfg.eval_rows:
            raise DataError(f"The training data makes only {len(rows)} sequences of {cfg.seq_len} tokens; need more "
                            f"than the {cfg.eval_rows} held out for evaluation (give eval_data or more text).")
        eval_rows, train_rows = rows[: cfg.eval_rows], rows[cfg.eval_rows:]
    return train_rows, eval_rows


def epoch_order(n: int, epoch: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()


# ---- losses ---------------------------------------------------------------------------------------


def losses(student, teacher, batch, cfg: UptrainConfig, label_count: torch.Tensor, world: int) -> dict:
    """Token-summed losses divided by the global label count (x world size, since DDP averages
    gradients): the same objective for any split of a global batch over processes."""
    want_hidden = cfg.hidden > 0
    # use_cache=False: Transformers only turns restarting position_ids into a block-causal
    # (per-document) mask when no cache is in play
    out = student(input_ids=batch["input_ids"], position_ids=batch["position_ids"], output_hidden_states=want_hidden,
                  use_cache=False)
    logits = out.logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    valid = labels != -100
    scale = world / label_count.clamp(min=1)
    parts = {"lm": F.cross_entropy(logits[valid], labels[valid], reduction="sum") * scale}
    if teacher is not None and (cfg.kd or cfg.hidden):
        with torch.no_grad():
            t_out = teacher(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                            output_hidden_states=want_hidden, use_cache=False)
        if cfg.kd:
            t = cfg.temperature
            s_logp = F.log_softmax(logits[valid] / t, -1)
            t_logp = F.log_softmax(t_out.logits[:, :-1].float()[valid] / t, -1)
            parts["kd"] = (t_logp.exp() * (t_logp - s_logp)).sum() * scale * t * t
        if cfg.hidden:
            mse = sum(F.mse_loss(s, t_, reduction="none").mean(-1)[:, :-1][valid].sum()
                      for s, t_ in zip(out.hidden_states[1:], t_out.hidden_states[1:]))
            parts["hidden"] = mse / len(out.hidden_states[1:]) * scale
    parts["total"] = sum(getattr(cfg, k) * v for k, v in parts.items())
    return parts


@torch.no_grad()
def evaluate(student, teacher, rows: list[dict], device, micro_batch: int) -> dict:
    student.eval()
    nll, count, agree = 0.0, 0, 0
    for i in range(0, len(rows), micro_batch):
        batch = {k: v.to(device) for k, v in collate(rows[i: i + micro_batch]).items()}
        logits = student(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                         use_cache=False).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        valid = labels != -100
        nll += F.cross_entropy(logits[valid], labels[valid], reduction="sum").item()
        count += int(valid.sum())
        if teacher is not None:
            t_logits = teacher(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                               use_cache=False).logits[:, :-1]
            agree += int((t_logits.argmax(-1) == logits.argmax(-1))[valid].sum())
    student.train()
    result = {"eval_ppl": math.exp(nll / max(count, 1)), "eval_tokens": count}
    if teacher is not None:
        result["teacher_agreement"] = agree / max(count, 1)
    return result


# ---- the run --------------------------------------------------------------------------------------


def run(cfg: UptrainConfig) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    output = Path(cfg.output)
    trackers = resolve_trackers(cfg.report_to)
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum,
                              mixed_precision=cfg.mixed_precision if cfg.mixed_precision != "no" else None,
                              log_with=trackers or None, project_dir=f"{output}.runs")
    set_seed(cfg.seed)
    ckpt_root = Path(f"{output}.checkpoints")
    target = AtomicDirectory(output, overwrite=cfg.overwrite, marker=SUMMARY_FILE)
    try:
        target.check()  # before any training: an output we may not replace is refused now
    except ConversionError as exc:
        raise UptrainError(str(exc)) from None
    student, teacher, tokenizer = load_models(cfg)
    world = accelerator.num_processes
    global_rows = cfg.micro_batch * cfg.grad_accum * world
    total_steps = max(1, parse_tokens(cfg.tokens) // (global_rows * cfg.seq_len))
    train_rows, eval_rows = build_data(cfg, tokenizer, total_steps * global_rows)
    if len(train_rows) < global_rows:
        raise DataError(f"Only {len(train_rows)} training sequences of {cfg.seq_len} tokens; one optimizer step "
                        f"needs {global_rows} (micro_batch x grad_accum x processes).")

    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, cfg))
    # the scheduler is stepped by hand once per optimizer step (a prepared one would step once per
    # process), and registered so checkpoints include it
    student, optimizer = accelerator.prepare(student, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    if teacher is not None:
        teacher = teacher.to(accelerator.device).eval()

    step, history = 0, []
    log_path = Path(f"{output}.log.jsonl")
    if cfg.overwrite and accelerator.is_main_process:  # start fresh: forget kvslim's earlier run at this path
        _remove_run_state(ckpt_root, log_path)
    accelerator.wait_for_everyone()
    resume = checkpoints(ckpt_root)
    if resume:
        state = json.loads((resume[-1] / STATE_FILE).read_text())
        changed = _changed_settings(state["config"], cfg)
        if changed:
            raise UptrainError(
                f"{resume[-1]} was saved with other settings; resuming would mix two runs. Changed: "
                + "; ".join(f"{k}: {old!r} in the checkpoint, {new!r} now" for k, (old, new) in changed.items())
                + ". Rerun with the checkpoint's settings to resume, or pass --overwrite to start fresh.")
        accelerator.load_state(str(resume[-1]))
        step, history = state["step"], state.get("history", [])
        accelerator.print(f"resuming from {resume[-1]} (step {step})")
    if trackers:  # hyperparameters as flat scalars, which every tracker accepts
        accelerator.init_trackers("kvslim-uptrain", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                            for k, v in asdict(cfg).items()})
    log = _open_log(log_path, step) if accelerator.is_main_process else None

    per_epoch = len(train_rows) // global_rows
    student.train()
    bar = tqdm(total=total_steps, initial=step, desc="uptrain", unit="step",
               disable=not (cfg.progress and accelerator.is_main_process))
    started, tokens_done = time.perf_counter(), 0
    if step == 0:  # where recovery starts: the converted model before any training
        history.append({"step": 0, "tokens": 0, **evaluate(accelerator.unwrap_model(student), teacher, eval_rows,
                                                           accelerator.device, cfg.micro_batch)})
    while step < total_steps:
        epoch, index = divmod(step, per_epoch)
        order = epoch_order(len(train_rows), epoch, cfg.seed)
        first = index * global_rows
        chunk = [train_rows[i] for i in order[first: first + global_rows]]
        # this process's share of the global batch, in micro-batches
        mine = chunk[accelerator.process_index * cfg.micro_batch * cfg.grad_accum:][: cfg.micro_batch * cfg.grad_accum]
        label_count = torch.tensor(sum(int((r["labels"][1:] != -100).sum()) for r in chunk), device=accelerator.device)
        for m in range(cfg.grad_accum):
            batch = {k: v.to(accelerator.device) for k, v in collate(mine[m * cfg.micro_batch:(m + 1) * cfg.micro_batch]).items()}
            with accelerator.accumulate(student):
                parts = losses(student, teacher, batch, cfg, label_count, world)
                if not torch.isfinite(parts["total"]):
                    last = resume[-1] if resume else None
                    raise UptrainError(f"The loss became {parts['total'].item()} at step {step}: the run diverged "
                                       f"(lower lr or check the data). Last good checkpoint: {last or 'none'}.")
                accelerator.backward(parts["total"])
                if accelerator.sync_gradients and cfg.clip:
                    accelerator.clip_grad_norm_(params, cfg.clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]  # what this step used (after step() it is the next step's)
        scheduler.step()
        step += 1
        tokens_done += global_rows * cfg.seq_len
        rate = tokens_done / (time.perf_counter() - started)
        values = {k: float(accelerator.reduce(v.detach(), "mean")) for k, v in parts.items()}
        bar.set_postfix(loss=f"{values['total']:.3f}", tok_s=f"{rate:,.0f}")
        bar.update(1)
        record = {"step": step, "tokens": step * global_rows * cfg.seq_len, "lr": lr,
                  **values, "tokens_per_s": rate}
        if step % cfg.eval_every == 0 or step == total_steps:
            record.update(evaluate(accelerator.unwrap_model(student), teacher, eval_rows, accelerator.device, cfg.micro_batch))
            history.append(record)
        if log and (step % cfg.log_every == 0 or "eval_ppl" in record):
            log.write(json.dumps(record) + "\n")
            log.flush()
            if trackers:
                accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
        if step % cfg.checkpoint_every == 0 and step < total_steps:
            path = ckpt_root / f"step-{step}"
            accelerator.save_state(str(path))
            if accelerator.is_main_process:
                (path / STATE_FILE).write_text(json.dumps({"step": step, "config": asdict(cfg), "history": history}))
            resume = [path]
    bar.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(student)
        if cfg.train == "lora":
            model = model.merge_and_unload()
        with target as tmp:
            model.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
            summary = {"config": asdict(cfg), "steps": step, "tokens": step * global_rows * cfg.seq_len,
                       "processes": world, "evaluations": history}
            (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        log.close()
        kept = checkpoints(ckpt_root)
        if kept and not cfg.keep_checkpoints:
            for path in kept[:-1]:
                shutil.rmtree(path, ignore_errors=True)
            accelerator.print(f"kept the last checkpoint, {kept[-1]} (--keep-checkpoints keeps every one)")
    accelerator.wait_for_everyone()
    if trackers:
        accelerator.end_training()  # last: it also ends the process group
    return {"steps": step, "evaluations": history}


STATE_FILE = "kvslim_state.json"  # in every checkpoint: its step, the settings and the evaluations so far


def checkpoints(root: Path) -> list[Path]:
    """kvslim's checkpoints under `root`, oldest first."""
    found = [p for p in root.glob("step-*") if (p / STATE_FILE).is_file() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def _changed_settings(saved: dict, cfg: UptrainConfig) -> dict:
    now = json.loads(json.dumps(asdict(cfg)))  # as the checkpoint stored it (tuples become lists)
    return {k: (saved.get(k), v) for k, v in now.items() if k not in NOT_TRAINING_SETTINGS and saved.get(k) != v}


def _remove_run_state(ckpt_root: Path, log_path: Path) -> None:
    """Remove an earlier run's checkpoints and log, only where kvslim wrote them."""
    for path in checkpoints(ckpt_root):
        shutil.rmtree(path)
    if ckpt_root.is_dir() and not any(ckpt_root.iterdir()):
        ckpt_root.rmdir()
    log_path.unlink(missing_ok=True)


def _open_log(path: Path, step: int):
    """The run's JSONL log for appending, without records past `step` (a killed run may have logged
    steps after its last checkpoint; the resumed run logs them again)."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))
    return open(path, "a")


def resolve_trackers(report_to: str) -> list[str]:
    """Experiment trackers to log to besides the JSONL file (installed ones only for "auto")."""
    import importlib.util

    installed = {name: importlib.util.find_spec(name) is not None for name in ("tensorboard", "wandb")}
    wanted = {"none": [], "auto": ["tensorboard"], "all": ["tensorboard", "wandb"]}.get(report_to, [report_to])
    unknown = [w for w in wanted if w not in installed]
    if unknown:
        raise UptrainError(f"Unknown report_to '{report_to}'; valid: auto, tensorboard, wandb, all, none.")
    if report_to not in ("auto", "all"):
        missing = [w for w in wanted if not installed[w]]
        if missing:
            raise UptrainError(f"report_to={report_to} needs the '{missing[0]}' package: pip install {missing[0]}.")
    return [w for w in wanted if installed[w]]


def parse_overrides(items: list[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise UptrainError(f"--set expects key=value, got '{item}'.")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="kvslim uptraining recipe (run directly or with accelerate launch)")
    parser.add_argument("--config", help="recipe name (recipes/configs/NAME.yaml) or YAML path")
    parser.add_argument("--set", nargs="*", default=[], help="overrides: key=value ...")
    args = parser.parse_args(argv)
    try:
        run(UptrainConfig.load(args.config, parse_overrides(args.set)))
    except ConversionError as exc:
        raise SystemExit(f"Error: {exc}") from None


if __name__ == "__main__":
    main()
