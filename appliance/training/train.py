"""LoRA fine-tuning on classification or chat data: unsloth (GPU QLoRA, or its CPU fallback) or peft, one loop."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import math
import random
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import console
from ..artifacts import EXEMPLARS_CSV, LABELS_FILE, TASK_FILE, VALIDATION_FILE
from ..artifacts import TRAIN_REPORT_FILE as REPORT_FILE
from ..errors import ConfigError, InputError
from ..fsutil import atomic_dir, sha256_file, sha256_tree, write_json_atomic, write_text_atomic
from .data import (CLASSIFY_SYSTEM_PROMPT, DataReport, Example, load_examples, load_labels, render_ids,
                   require_chat_template, require_valid, stratified_split, validate)

log = logging.getLogger("bankllm.train")

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METHODS = ("auto", "unsloth", "peft")


def _flag(help: str, **cli) -> dict:
    """Field metadata that `bankllm train` (and `install --train`) turn into a flag: its help, and how to spell it."""
    return {"help": help, "cli": cli}


@dataclass
class TrainConfig:
    """Everything that decides what a training run produces (its hash keys the resumable checkpoint).

    A field with `_flag` metadata is a `bankllm train` flag: its help and default live here only.
    """

    data: Path = field(metadata=_flag('text,category CSV or chat JSONL ({"messages": [...]} per line).',
                                      required=True))
    out: Path = field(metadata=_flag("Adapter directory to write (PEFT LoRA + labels.json + train-report.json).",
                                     required=True))
    base: Path = field(metadata=_flag("16-bit HF checkpoint (default: the embedded SmolLM2-135M-Instruct)."))
    base_name: str = ""                     # written as the adapter's base_model_name_or_path
    labels: Path | None = field(default=None, metadata=_flag(
        "Allowed labels (JSON list or one per line); default: the CSV's categories."))
    method: str = field(default="auto", metadata=_flag("auto = unsloth where installed, else peft.", choices=METHODS))
    epochs: float = field(default=1.0, metadata=_flag("Passes over the training data."))
    batch_size: int = field(default=16, metadata=_flag("Samples per optimizer step."))
    lr: float = field(default=2e-4, metadata=_flag("Learning rate of the LoRA A matrices."))
    loraplus_ratio: float = field(default=8.0, metadata=_flag(
        "LoRA+: B matrices learn this many times faster (1 = plain LoRA)."))
    lora_r: int = field(default=16, metadata=_flag("LoRA rank."))
    lora_alpha: int = field(default=32, metadata=_flag("LoRA scale numerator (the update is scaled by alpha / r)."))
    lora_dropout: float = field(default=0.0, metadata=_flag("Dropout on the LoRA input."))
    target_modules: tuple[str, ...] = field(default=DEFAULT_TARGETS, metadata=_flag(
        "Comma-separated module names LoRA adapts."))
    warmup_fraction: float = 0.05
    weight_decay: float = 0.0
    max_seq_len: int = field(default=128, metadata=_flag("Longer samples are reported and left out."))
    val_fraction: float = field(default=0.1, metadata=_flag(
        "Stratified held-out validation share (never trained on)."))
    val_limit: int | None = field(default=None, metadata=_flag(
        "Score at most this many validation rows after each epoch."))
    seed: int = field(default=42, metadata=_flag("Seed of the split, the batch order and the LoRA initialisation."))
    max_steps: int | None = field(default=None, metadata=_flag(
        "Stop after this many optimizer steps (smoke runs, tests)."))
    limit: int | None = None                # use only the first N rows of the data (tests)
    checkpoint_every: int = field(default=50, metadata=_flag("Steps between resumable checkpoints."))
    forgetting: bool = field(default=True, metadata=_flag(
        "Fail when general-prompt pass rate drops >10 points.", name="forgetting-check"))
    snapshot_every: int = 0                 # also write the adapter to `out` every N steps (0 = per epoch only)
    val_every: int = 0                      # also score validation (accuracy and loss) every N steps (0 = per epoch)
    threads: int = 0
    bf16: bool = False                      # bf16 autocast (fp32 master weights); fast on CPUs with AVX512-BF16/AMX
    system_prompt: str = CLASSIFY_SYSTEM_PROMPT
    checkpoint_dir: Path | None = None
    init_adapter: Path | None = None        # start from this adapter's weights instead of a fresh LoRA (peft path)
    replay: bool = field(default=True, metadata=_flag(
        "Mix the base's own answers to general prompts into classification data (keeps it answering ordinary "
        "questions)."))
    cache_dir: Path | None = None           # where the replayed answers are cached (per base)
    # Self-rehearsal by distillation: this many general chats the base writes itself (replay.self_rehearsal);
    # each step adds rehearsal_kl x KL(base || adapted) over every token of rehearsal_batch of them, so the
    # adapter keeps the base's whole next-token distribution there, not just its greedy answers (0 = off).
    rehearsal: int = field(default=0, metadata=_flag(
        "Keep the base's behaviour on N general chats it writes itself: every step adds the KL to the base over "
        "a few of them (0 = off; the default adapter's last stage used 512: see README, Forgetting)."))
    rehearsal_kl: float = 1.0
    rehearsal_batch: int = 4
    # With rehearsal, also hold the base's distribution on short general tasks of the forgetting probes' kinds
    # (general_tasks.py), a second KL batch every step.
    rehearsal_tasks: bool = field(default=False, metadata=_flag(
        "With --rehearsal: also keep the base's distribution on 193 short general tasks (arithmetic, facts, "
        "yes/no, lists...; none a forgetting probe), a second KL batch every step (the default adapter's stage 13)."))
    chat_template: str | None = field(default=None, metadata={"help": (
        "For a base without a chat template (a plain pretrained model): chatml, llama3, gemma (also phi3, mistral) "
        "or a Jinja FILE; recorded in the adapter, and `bankllm build` uses it.")})

    def key(self) -> str:
        """Hash of the fields that must match for --resume to continue a checkpoint."""
        skip = {"out", "checkpoint_dir", "threads", "checkpoint_every", "snapshot_every", "val_limit", "forgetting",
                "cache_dir", "val_every"}
        # Fields added later stay out at their defaults (an unset chat_template, rehearsal off), so keys (and cached
        # adapters, checkpoints) from before they existed still match.
        later = {"chat_template", "rehearsal", "rehearsal_kl", "rehearsal_batch", "rehearsal_tasks"}
        defaults = {k: f.default for k, f in self.__dataclass_fields__.items()}
        d = {k: str(v) for k, v in dataclasses.asdict(self).items()
             if k not in skip and not (k in later and v == defaults[k])}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def ckpt_dir(self) -> Path:
        return Path(self.checkpoint_dir) if self.checkpoint_dir else Path(self.out).parent / f".{Path(self.out).name}.checkpoint"


@dataclass
class TrainResult:
    out: Path
    report: dict
    interrupted: bool = False
    losses: list[float] = field(default_factory=list)


def unsloth_installed() -> bool:
    return importlib.util.find_spec("unsloth") is not None


def select_method(method: str, installed: bool | None = None) -> str:
    """auto -> unsloth wherever it is installed, else peft; an explicit unsloth needs it installed."""
    if method not in METHODS:
        raise ConfigError(f"--method {method!r} is not one of {', '.join(METHODS)}", "use auto, unsloth or peft")
    installed = unsloth_installed() if installed is None else installed
    if method == "auto":
        return "unsloth" if installed else "peft"
    if method == "unsloth" and not installed:
        raise ConfigError("--method unsloth was asked for but unsloth is not installed",
                          "pip install 'bankllm[gpu]' (unsloth==2026.10.9), or use --method peft")
    return method


def apply_chat_template_choice(cfg: TrainConfig, tokenizer) -> dict | None:
    """Give a base without a chat template the one cfg.chat_template names; return its record, None if no choice."""
    if not cfg.chat_template:
        return None
    from ..pipeline.modelfile import resolve_chat_template

    if getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"base {cfg.base} has its own chat template; --chat-template is for bases without one",
                          "drop --chat-template")
    chosen = resolve_chat_template(cfg.chat_template)
    tokenizer.chat_template = chosen.template
    return chosen.as_dict()


# --- data preparation -----------------------------------------------------------------------

def prepare(cfg: TrainConfig, tokenizer) -> tuple[list[Example], list[Example], DataReport, list[str] | None]:
    """Load, validate (raising on errors) and split the data; return train, val, report and label set."""
    examples, report = load_examples(cfg.data, cfg.system_prompt)
    if cfg.limit:
        examples = examples[:cfg.limit]
    labels = load_labels(cfg.labels) if cfg.labels else None
    kept = validate(examples, report, labels=labels, tokenizer=tokenizer, max_seq_len=cfg.max_seq_len)
    require_valid(report)
    if labels is None and report.format == "csv":
        labels = sorted({e.label for e in kept})
    train, val = stratified_split(kept, cfg.val_fraction, cfg.seed)
    if not train:
        raise InputError("no samples left to train on after the validation split", "give more data or lower --val-fraction")
    return train, val, report, labels


def tokenize(examples: list[Example], tokenizer) -> list[tuple[list[int], int]]:
    return [render_ids(tokenizer, e.messages) for e in examples]


def epoch_batches(n_items: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Length-bucketed batches: shuffle, sort within chunks of 50 batches, shuffle the batches (deterministic)."""
    rng = random.Random(seed * 1000 + epoch)
    order = list(range(len(n_items)))
    rng.shuffle(order)
    chunk = batch_size * 50
    batches = []
    for i in range(0, len(order), chunk):
        part = sorted(order[i:i + chunk], key=lambda j: n_items[j])
        batches.extend(part[k:k + batch_size] for k in range(0, len(part), batch_size))
    rng.shuffle(batches)
    return batches


def collate(items: list[tuple[list[int], int]], pad_id: int):
    """Right-pad to the longest in the batch; loss only on the final assistant turn (-100 elsewhere)."""
    import torch

    width = max(len(ids) for ids, _ in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, (ids, start) in enumerate(items):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, start:len(ids)] = torch.tensor(ids[start:])
        mask[row, :len(ids)] = 1
    return input_ids, mask, labels


def label_loss(model, input_ids, mask, labels):
    """Cross-entropy on the target tokens only, projecting just those positions through the 49k-vocab head."""
    import torch.nn.functional as F

    inner = model.get_base_model()
    hidden = inner.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
    target = labels[:, 1:]
    sel = target != -100
    # Why not model(labels=...): it computes logits for every position, a fifth of the step on a CPU.
    logits = inner.lm_head(hidden[:, :-1][sel]).float()
    return F.cross_entropy(logits, target[sel])


def rehearsal_kl(model, input_ids, mask):
    """KL(base || adapted) of the next-token distributions at every real token, the base being the same model
    with the adapter switched off (no gradient). Mean over tokens."""
    import torch
    import torch.nn.functional as F

    inner = model.get_base_model()
    sel = mask.bool()
    # The head in fp32 even under bf16 autocast: a small KL is lost in bf16 rounding.
    head = inner.lm_head
    bias = None if head.bias is None else head.bias.float()
    with torch.no_grad(), model.disable_adapter():
        ref_hidden = inner.model(input_ids=input_ids, attention_mask=mask).last_hidden_state[sel]
        with torch.autocast(device_type=ref_hidden.device.type, enabled=False):
            ref = F.linear(ref_hidden.float(), head.weight.float(), bias).log_softmax(-1)
    hidden = inner.model(input_ids=input_ids, attention_mask=mask).last_hidden_state[sel]
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        logp = F.linear(hidden.float(), head.weight.float(), bias).log_softmax(-1)
    return F.kl_div(logp, ref, log_target=True, reduction="batchmean")


def _mean_label_loss(model, items: list[tuple[list[int], int]], pad_id: int, device: str, batch_size: int = 16) -> float:
    """Token-weighted mean of label_loss over `items` (the validation rows), without gradients."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(items), batch_size):
            input_ids, mask, lab = collate(items[i:i + batch_size], pad_id)
            n = int((lab[:, 1:] != -100).sum())
            total += float(label_loss(model, input_ids.to(device), mask.to(device), lab.to(device))) * n
            count += n
    return total / max(count, 1)


# --- model ----------------------------------------------------------------------------------

def load_model(cfg: TrainConfig, method: str):
    """Return (model with trainable LoRA, tokenizer, device) for the chosen method."""
    import torch

    cuda = torch.cuda.is_available()
    if method == "unsloth":
        from unsloth import FastLanguageModel  # lazy: heavy, and only on this path

        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=str(cfg.base), max_seq_length=cfg.max_seq_len, dtype=None, load_in_4bit=cuda)
        model = FastLanguageModel.get_peft_model(
            model, r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=list(cfg.target_modules), bias="none", random_state=cfg.seed,
            use_gradient_checkpointing="unsloth" if cuda else False)
        return model, tokenizer, ("cuda" if cuda else "cpu")

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.base)
    kwargs: dict = {}
    if cuda:
        from transformers import BitsAndBytesConfig  # QLoRA on a GPU: NF4 base, double quant, bf16 compute
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
        kwargs["device_map"] = {"": 0}
    # fp32 on a CPU: bf16 LoRA training loses precision in the small updates.
    model = AutoModelForCausalLM.from_pretrained(cfg.base, dtype=torch.float32 if not cuda else torch.bfloat16, **kwargs)
    if cuda:
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if cfg.init_adapter:
        from peft import PeftModel  # continue from an existing adapter (e.g. a second, mixed-data stage)
        return PeftModel.from_pretrained(model, cfg.init_adapter, is_trainable=True), tokenizer, ("cuda" if cuda else "cpu")
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.target_modules), bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    return model, tokenizer, ("cuda" if cuda else "cpu")


def make_optimizer(model, cfg: TrainConfig, total_steps: int):
    """AdamW with LoRA+ groups (B at lr * ratio) and linear warmup then linear decay."""
    import torch

    a_params, b_params = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (b_params if "lora_B" in name else a_params).append(p)
    opt = torch.optim.AdamW([{"params": a_params, "lr": cfg.lr},
                             {"params": b_params, "lr": cfg.lr * cfg.loraplus_ratio}],
                            weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    warmup = max(1, int(total_steps * cfg.warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return opt, sched


def save_adapter(model, tokenizer, dest: Path, cfg: TrainConfig, labels: list[str] | None, extra: dict | None = None) -> None:
    """Write the PEFT adapter dir atomically, with base name, labels and the task's system prompt."""
    with atomic_dir(dest) as tmp:
        # save_embedding_layers=False: embeddings are not trained, and "auto" asks the Hub for the base config.
        model.save_pretrained(tmp, save_embedding_layers=False)
        cfg_path = tmp / "adapter_config.json"
        adapter_cfg = json.loads(cfg_path.read_text())
        adapter_cfg["base_model_name_or_path"] = cfg.base_name or Path(cfg.base).name
        write_json_atomic(cfg_path, adapter_cfg)
        if labels is not None:
            write_json_atomic(tmp / LABELS_FILE, labels)
        task = {"system_prompt": cfg.system_prompt, "labels": LABELS_FILE if labels else None}
        if cfg.chat_template:
            from ..pipeline.modelfile import resolve_chat_template

            task["chat_template"] = resolve_chat_template(cfg.chat_template).as_dict()
        write_json_atomic(tmp / TASK_FILE, task)
        (tmp / "README.md").write_text(model_card(cfg, labels))  # peft's boilerplate card says nothing true
        for name, obj in (extra or {}).items():
            if isinstance(obj, Path):
                shutil.copy2(obj, tmp / name)
            else:
                write_json_atomic(tmp / name, obj)


def model_card(cfg: TrainConfig, labels: list[str] | None) -> str:
    """A short, true README for the adapter directory."""
    task = f"intent classification over {len(labels)} labels ({LABELS_FILE})" if labels else "chat fine-tuning"
    return (f"# LoRA adapter for {cfg.base_name or Path(cfg.base).name}\n\n"
            f"Task: {task}. System prompt: \"{cfg.system_prompt}\"; the user turn is the customer's text, the "
            f"assistant turn the label.\n\nTrained by `bankllm train` (LoRA r={cfg.lora_r}, alpha={cfg.lora_alpha}, "
            f"targets {', '.join(cfg.target_modules)}) on `{Path(cfg.data).name}`; data report, hyperparameters, "
            f"loss curve and validation accuracy are in train-report.json. Build with "
            f"`bankllm build --adapter <this directory>`; check with `bankllm eval`.\n")


# --- the loop -------------------------------------------------------------------------------

def train(cfg: TrainConfig, resume: bool = False, progress: bool | None = None) -> TrainResult:
    """Validate data, train, evaluate per epoch, write the adapter and train-report.json into cfg.out."""
    import torch
    from transformers import AutoTokenizer

    from .evaluate import LabelDecoder, score

    method = select_method(cfg.method)
    if cfg.rehearsal_tasks and not cfg.rehearsal:
        raise ConfigError("--rehearsal-tasks needs --rehearsal N (it adds a second batch to the rehearsal KL)",
                          "add --rehearsal 512 (as the default adapter), or drop --rehearsal-tasks")
    if cfg.init_adapter:  # a continued stage keeps its start's rank and scale: report those, not the flags'
        init_config = Path(cfg.init_adapter) / "adapter_config.json"
        if not init_config.is_file():
            raise ConfigError(f"the adapter to start from, {cfg.init_adapter}, has no adapter_config.json",
                              "point it at a PEFT LoRA adapter directory")
        try:
            init = json.loads(init_config.read_text())
            cfg = dataclasses.replace(cfg, lora_r=init["r"], lora_alpha=init["lora_alpha"])
        except (ValueError, KeyError, TypeError) as exc:  # bad JSON, or a config without them
            raise ConfigError(f"{init_config} is not a LoRA adapter config (no usable r and lora_alpha: {exc!r})",
                              "point --init at a PEFT LoRA adapter directory saved with its weights") from None
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    tokenizer = AutoTokenizer.from_pretrained(cfg.base)
    chosen_template = apply_chat_template_choice(cfg, tokenizer)
    require_chat_template(tokenizer, cfg.base)
    train_set, val_set, report, labels = prepare(cfg, tokenizer)
    n_train = len(train_set)
    exemplar_set = [e for e in train_set if getattr(e, "label", None)] if labels else []  # before any replay rows
    replay_info = None
    if chosen_template is not None and cfg.replay and labels is not None:
        # Replay keeps the base's own chat answers; a base with no chat template has none to keep.
        log.info("replay: skipped, the base has no chat template of its own")
    elif cfg.replay and labels is not None:
        from .replay import base_answers, mix

        replay = [e for e in base_answers(cfg.base, cfg.cache_dir, threads=cfg.threads)
                  if len(render_ids(tokenizer, e.messages)[0]) <= cfg.max_seq_len]
        train_set, replay_info = mix(train_set, replay)
    train_tok = tokenize(train_set, tokenizer)
    rehearsal_tok: list[tuple[list[int], int]] = []
    task_tok: list[tuple[list[int], int]] = []
    if cfg.rehearsal and chosen_template is not None:
        log.info("rehearsal: skipped, the base has no chat template of its own")
    elif cfg.rehearsal:
        from .replay import self_rehearsal

        with torch.random.fork_rng():  # its sampling must not move the LoRA's initialisation off cfg.seed
            chats = self_rehearsal(cfg.base, cfg.cache_dir, n=cfg.rehearsal, max_new_tokens=64, threads=cfg.threads)
        if not chats:
            raise ConfigError("the base wrote no finished general chat to rehearse (--rehearsal)",
                              "train without --rehearsal, or on a base that ends its chat turns")
        rehearsal_tok = [(ids[:cfg.max_seq_len], 0) for ids, _ in tokenize(chats, tokenizer)]
        if cfg.rehearsal_tasks:
            from .replay import task_rehearsal

            task_tok = [(ids[:cfg.max_seq_len], 0) for ids, _ in tokenize(
                task_rehearsal(cfg.base, cfg.cache_dir, threads=cfg.threads), tokenizer)]
        replay_info = {**(replay_info or {}), "rehearsal": {"chats": len(rehearsal_tok),
                                                            "tasks": len(task_tok), "kl_weight": cfg.rehearsal_kl,
                                                            "per_step": cfg.rehearsal_batch}}
    steps_per_epoch = math.ceil(len(train_tok) / cfg.batch_size)
    total_steps = math.ceil(steps_per_epoch * cfg.epochs)
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    log.info("data: %d train (%d replayed), %d validation rows, %d steps (%d per epoch), method %s",
             len(train_tok), len(train_tok) - n_train, len(val_set), total_steps, steps_per_epoch, method)

    model, _, device = load_model(cfg, method)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total_params = sum(p.numel() for p in model.parameters())
    opt, sched = make_optimizer(model, cfg, total_steps)

    ckpt = cfg.ckpt_dir()
    state = {"step": 0, "losses": [], "val": [], "tokens": 0, "train_s": 0.0}
    if resume:
        state = _load_checkpoint(ckpt, cfg, model, opt, sched)
        log.info("resumed from step %d", state["step"])
    elif ckpt.exists():
        shutil.rmtree(ckpt)

    decoder = LabelDecoder(tokenizer, labels, cfg.system_prompt) if labels else None
    val_eval = val_set
    if cfg.val_limit and cfg.val_limit < len(val_set):  # evenly spaced: the split is in file order, often by label
        val_eval = [val_set[i * len(val_set) // cfg.val_limit] for i in range(cfg.val_limit)]
    lengths = [len(ids) for ids, _ in train_tok]
    show = console.is_terminal() if progress is None else progress
    bar = None
    if show:
        from ..pipeline.progress import StepBar
        bar = StepBar(total=total_steps, initial=state["step"], unit="step")

    model.train()
    step = state["step"]
    interrupted = False
    try:
        while step < total_steps:
            epoch, idx = divmod(step, steps_per_epoch)
            batches = epoch_batches(lengths, cfg.batch_size, cfg.seed, epoch)
            batch = batches[idx]
            input_ids, mask, lab = collate([train_tok[j] for j in batch], pad_id)
            t0 = time.perf_counter()
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=cfg.bf16):
                loss_t = label_loss(model, input_ids.to(device), mask.to(device), lab.to(device))
                kl_t = None
                # The short tasks get their own batch and mean: in a batch with the long chats their few answer
                # tokens would weigh next to nothing.
                for pool in (p for p in (rehearsal_tok, task_tok) if p):
                    r_ids, r_mask, _ = collate([pool[(step * cfg.rehearsal_batch + i) % len(pool)]
                                                for i in range(cfg.rehearsal_batch)], pad_id)
                    kl_p = rehearsal_kl(model, r_ids.to(device), r_mask.to(device))
                    kl_t = kl_p if kl_t is None else kl_t + kl_p
                if kl_t is not None:
                    loss_t = loss_t + cfg.rehearsal_kl * kl_t
            loss_t.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            step += 1
            loss = float(loss_t.detach())
            state["losses"].append(round(loss, 5))  # with rehearsal: the label loss plus the weighted KL
            if rehearsal_tok:
                state.setdefault("kl", []).append(round(float(kl_t.detach()), 5))
            state["tokens"] += int(mask.sum())
            state["train_s"] += dt
            tps = state["tokens"] / max(state["train_s"], 1e-9)
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:.0f}")
                bar.update(1)
            elif step % 10 == 0 or step == total_steps:
                kl = state.get("kl", [])[-10:]
                log.info("step %d/%d loss %.4f (avg10 %.4f%s) %.0f tok/s", step, total_steps, loss,
                         sum(state["losses"][-10:]) / len(state["losses"][-10:]),
                         f", rehearsal KL avg10 {sum(kl) / len(kl):.4f}" if kl else "", tps)
            state["step"] = step
            epoch_done = step % steps_per_epoch == 0 or step == total_steps
            if epoch_done or (cfg.val_every and step % cfg.val_every == 0):
                entry = {"epoch": round(step / steps_per_epoch, 3), "step": step, "accuracy": None,
                         "rows": len(val_eval)}
                if decoder is not None and val_eval:
                    model.eval()
                    preds = decoder.predict(model, [e.text for e in val_eval], device=device)
                    entry["accuracy"] = score([e.label for e in val_eval], preds, labels)["accuracy"]
                    entry["loss"] = round(_mean_label_loss(model, tokenize(val_eval, tokenizer), pad_id, device), 5)
                    model.train()
                    log.info("step %d (epoch %.2f): validation accuracy %.4f, loss %.4f on %d rows", step,
                             step / steps_per_epoch, entry["accuracy"], entry["loss"], len(val_eval))
                state["val"].append(entry)
            if step % cfg.checkpoint_every == 0 or epoch_done:
                _save_checkpoint(ckpt, cfg, model, opt, sched, state)
            if epoch_done or (cfg.snapshot_every and step % cfg.snapshot_every == 0):
                # The output always holds the latest finished epoch: a stopped run still ships something.
                _write_output(cfg, model, tokenizer, labels, report, state, method, device, trainable,
                              total_params, total_steps, steps_per_epoch, n_train, len(val_set), replay_info,
                              val_set if labels else None, exemplar_set)
    except KeyboardInterrupt:
        interrupted = True
        _save_checkpoint(ckpt, cfg, model, opt, sched, state)
        log.warning("interrupted: checkpoint at step %d saved in %s; rerun with --resume to continue", step, ckpt)
        raise
    finally:
        if bar is not None:
            bar.close()
    report_path = Path(cfg.out) / REPORT_FILE
    result_report = json.loads(report_path.read_text())
    shutil.rmtree(ckpt, ignore_errors=True)
    if cfg.forgetting:
        from .forgetting import check_loaded, require_no_forgetting

        result_report["forgetting"] = check_loaded(model, tokenizer)
        write_json_atomic(report_path, result_report)
        require_no_forgetting(result_report["forgetting"])
    return TrainResult(out=Path(cfg.out), report=result_report, interrupted=interrupted, losses=state["losses"])


def _write_output(cfg, model, tokenizer, labels, report, state, method, device, trainable, total_params,
                  total_steps, steps_per_epoch, n_train, n_val, replay_info=None, val_set=None,
                  exemplar_set=None) -> None:
    import torch

    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    hyper = {k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
             for k, v in dataclasses.asdict(cfg).items()
             if k not in ("data", "out", "base", "labels", "checkpoint_dir", "cache_dir")}
    inputs = {"data": {"path": str(cfg.data), "sha256": sha256_file(cfg.data)},
              "base": {"path": str(cfg.base), "name": cfg.base_name or Path(cfg.base).name,
                       "sha256_tree": sha256_tree(cfg.base)}}
    if cfg.labels:
        inputs["labels"] = {"path": str(cfg.labels), "sha256": sha256_file(cfg.labels)}
    train_report = {
        "format": 1,
        "method": method,
        "device": device,
        "torch": torch.__version__,
        "inputs": inputs,
        "data_report": report.as_dict(),
        "split": {"train": n_train, "validation": n_val, "val_fraction": cfg.val_fraction, "seed": cfg.seed,
                  "stratified_by": "label"},
        "hyperparameters": hyper,
        "replay": replay_info,
        "trainable_parameters": trainable,
        "total_parameters": total_params,
        "steps": state["step"],
        "total_steps": total_steps,
        "steps_per_epoch": steps_per_epoch,
        "epochs_done": round(state["step"] / steps_per_epoch, 3),
        "train_tokens": state["tokens"],
        "train_seconds": round(state["train_s"], 1),
        "tokens_per_second": round(state["tokens"] / max(state["train_s"], 1e-9), 1),
        "seconds_per_step": round(state["train_s"] / max(state["step"], 1), 3),
        "peak_memory_mb": round(peak_mb, 1),
        "loss_curve": state["losses"],
        "rehearsal_kl_curve": state.get("kl"),
        "validation": state["val"],
    }
    plot = _plot_losses(state["losses"], Path(cfg.ckpt_dir()) / "loss.png")
    extra: dict = {REPORT_FILE: train_report}
    if plot is not None:
        extra["loss.png"] = plot
    if val_set:  # the held-out split travels with the adapter: `bankllm build` calibrates the served model on it
        extra[VALIDATION_FILE] = write_validation_csv(Path(cfg.ckpt_dir()) / VALIDATION_FILE, val_set)
    if exemplar_set:  # the training rows: `bankllm build` encodes them for the exemplar vote beside the label
        extra[EXEMPLARS_CSV] = write_validation_csv(Path(cfg.ckpt_dir()) / EXEMPLARS_CSV, exemplar_set)
    save_adapter(model, tokenizer, Path(cfg.out), cfg, labels, extra)


def write_validation_csv(path: Path, examples) -> Path:
    """Examples as a text,category CSV: the validation split (what `bankllm eval --data` and the build's
    calibration read), and the training rows (exemplars.csv, the build's exemplar vote)."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["text", "category"])
    w.writerows((e.text, e.label) for e in examples)
    write_text_atomic(path, buf.getvalue())
    return path


def _plot_losses(losses: list[float], dest: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no loss.png")
        return None
    dest.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(losses) + 1), losses, lw=0.6, alpha=0.5, label="loss")
    k = 20
    if len(losses) >= k:
        smooth = [sum(losses[i - k:i]) / k for i in range(k, len(losses) + 1)]
        ax.plot(range(k, len(losses) + 1), smooth, lw=1.5, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(dest, dpi=100)
    plt.close(fig)
    return dest


def _save_checkpoint(ckpt: Path, cfg: TrainConfig, model, opt, sched, state: dict) -> None:
    import torch
    from peft import get_peft_model_state_dict

    with atomic_dir(ckpt) as tmp:
        # save_embedding_layers=False, as in save_adapter: "auto" asks the Hub whether the base's config exists.
        lora = get_peft_model_state_dict(model, save_embedding_layers=False)
        torch.save({"key": cfg.key(), "state": state, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "lora": lora, "torch_rng": torch.get_rng_state()},
                   tmp / "trainer_state.pt")


def _load_checkpoint(ckpt: Path, cfg: TrainConfig, model, opt, sched) -> dict:
    import torch
    from peft import set_peft_model_state_dict

    path = ckpt / "trainer_state.pt"
    if not path.is_file():
        raise InputError(f"--resume: no checkpoint in {ckpt}", "run without --resume to start from scratch")
    blob = torch.load(path, map_location="cpu", weights_only=False)
    if blob["key"] != cfg.key():
        raise ConfigError(f"--resume: the checkpoint in {ckpt} was made with other data or hyperparameters",
                          "rerun with the same options, or without --resume to start over")
    set_peft_model_state_dict(model, blob["lora"])
    opt.load_state_dict(blob["optimizer"])
    sched.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["torch_rng"])
    return blob["state"]


def train_or_reuse(cfg: TrainConfig, log_fn=log.info) -> Path:
    """`bankllm install --train`: train into cfg.out/trained-<key>, keyed by the data's and labels' bytes and
    every hyperparameter. A finished adapter with the same key is reused (a rerun trains nothing); a run that was
    killed resumes from its checkpoint; one whose forgetting check failed fails again without retraining."""
    from ..fsutil import sha256_bytes

    parts = [cfg.key(), sha256_file(cfg.data), sha256_file(cfg.labels) if cfg.labels else None]
    key = sha256_bytes(json.dumps(parts).encode())[:12]
    cfg = dataclasses.replace(cfg, out=Path(cfg.out) / f"trained-{key}", checkpoint_dir=None)
    report_path = cfg.out / REPORT_FILE
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        if report.get("steps") == report.get("total_steps") and (report.get("forgetting") or not cfg.forgetting):
            if cfg.forgetting:
                from .forgetting import require_no_forgetting

                require_no_forgetting(report["forgetting"])
            log_fn(f"adapter: reusing {cfg.out} (trained on the same data and settings)")
            return cfg.out
    resume = (cfg.ckpt_dir() / "trainer_state.pt").is_file()
    log_fn(f"adapter: {'resuming' if resume else 'training'} on {cfg.data} -> {cfg.out}")
    return train(cfg, resume=resume).out
