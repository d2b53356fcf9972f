"""Average fine-tuned LoRA adapters of one base into one adapter (a uniform "model soup", Wortsman et al. 2022), or
interpolate one adapter with its base (WiSE-FT, Wortsman et al. 2022: one adapter, weight alpha in (0, 1), gives
base + alpha * delta, which trades some of what fine-tuning learned for less of what it forgot).

The result's weight delta is exactly the weighted sum of the inputs' deltas (sum_i w_i * B_i A_i * scale_i): peft's
add_weighted_adapter with combination_type "cat" stacks their ranks (two r=16 adapters give r=32, alpha = r), so
nothing is approximated. Averaging only makes sense for adapters of the same base, trained for the same task from
the same start (stages of one recipe): they must agree on the base, the targets, the label set, the system prompt
and the validation split (which travels with the result, so the build calibrates the average on it).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from ..artifacts import ADAPTER_CONFIG, EXEMPLARS_CSV, TASK_FILE, VALIDATION_FILE, AdapterDir, write_task
from ..errors import InputError
from ..fsutil import atomic_dir, sha256_file, write_json_atomic


def check_soupable(adapters: list[Path], least: int = 2) -> dict:
    """The first adapter's config, after checking every adapter is plain LoRA and shares its base, targets, labels,
    prompt and validation split."""
    if len(adapters) < least:
        raise InputError("averaging needs at least two adapters", "give two or more adapter directories")
    first = None
    for path in adapters:
        adapter = AdapterDir(path)
        cfg = adapter.config()  # a one-line InputError when missing, not JSON or not LoRA
        # The concatenation is exact only for plain LoRA: rsLoRA's scale depends on the rank, DoRA's magnitude
        # vector and LoRA biases do not add up, and modules_to_save would be taken from one input only.
        for flag in ("use_rslora", "use_dora", "lora_bias", "modules_to_save"):
            if cfg.get(flag):
                raise InputError(f"{path}: {flag} is set; only plain LoRA adapters average exactly",
                                 "average adapters trained as plain LoRA (bankllm train's default)")
        validation = adapter.path / VALIDATION_FILE
        key = (cfg.get("base_model_name_or_path"), sorted(cfg.get("target_modules") or []), adapter.labels(),
               adapter.system_prompt(), sha256_file(validation) if validation.is_file() else None)
        if first is None:
            first = (cfg, key, path)
        elif key != first[1]:
            field = ("base", "target modules", "label set", "system prompt", VALIDATION_FILE)[
                next(i for i, (a, b) in enumerate(zip(key, first[1])) if a != b)]
            raise InputError(f"{path}: its {field} differs from {first[2]}'s; only adapters of one recipe average",
                             "average stages of the same training recipe")
    return first[0]


def average_adapters(base_dir: Path, adapters: list[Path], out: Path, weights: list[float] | None = None,
                     threads: int = 0) -> Path:
    """Write to `out` (atomically) the adapter whose delta is sum(weights[i] * delta(adapters[i])); equal weights
    by default. One adapter with one weight below 1 is its interpolation with the base (WiSE-FT). The first
    adapter's labels, task file (without calibration and threshold), validation split and base name travel with it."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapters = [Path(a) for a in adapters]
    if len(adapters) == 1 and (not weights or not 0 < weights[0] < 1):
        raise InputError("interpolating one adapter with its base needs a weight between 0 and 1",
                         "give one weight in (0, 1), or two or more adapters to average")
    config = check_soupable(adapters, least=1)
    weights = list(weights) if weights is not None else [1.0 / len(adapters)] * len(adapters)
    if len(weights) != len(adapters) or any(w <= 0 for w in weights):
        raise InputError(f"{len(weights)} weights for {len(adapters)} adapters (each must be > 0)",
                         "give one positive weight per adapter")
    if threads > 0:
        torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    names = [f"a{i}" for i in range(len(adapters))]
    model = PeftModel.from_pretrained(model, adapters[0], adapter_name=names[0])
    for name, path in zip(names[1:], adapters[1:]):
        model.load_adapter(path, adapter_name=name)
    model.add_weighted_adapter(names, weights, "soup", combination_type="cat")
    model.set_adapter("soup")
    for name in names:
        model.delete_adapter(name)
    with atomic_dir(out) as tmp:
        # save_embedding_layers=False, as in train.save_adapter: "auto" asks the Hub for the base's config.
        model.save_pretrained(tmp, save_embedding_layers=False)
        saved = tmp / "soup" if (tmp / "soup").is_dir() else tmp  # peft nests a non-default adapter's files
        if saved != tmp:
            for f in saved.iterdir():
                shutil.move(str(f), tmp / f.name)
            saved.rmdir()
        cfg = json.loads((tmp / ADAPTER_CONFIG).read_text())
        cfg["base_model_name_or_path"] = config.get("base_model_name_or_path")
        write_json_atomic(tmp / ADAPTER_CONFIG, cfg)
        source = AdapterDir(adapters[0])
        # Labels and validation split are the same in every input (check_soupable); the first's exemplars serve.
        for path in (source.labels_file, source.path / VALIDATION_FILE, source.path / EXEMPLARS_CSV):
            if path is not None and path.is_file():
                shutil.copy2(path, tmp / path.name)
        task = source.task()
        if task is not None:
            # A calibration or threshold fitted to one input's confidences is wrong for the average: the build
            # fits them again on the validation split.
            write_task(tmp / TASK_FILE, dataclasses.replace(task, calibration=None, threshold=None))
        (tmp / "README.md").write_text(
            f"# LoRA adapter for {config.get('base_model_name_or_path')}\n\n"
            + (f"The interpolation of one adapter with its base (WiSE-FT), weight {weights[0]}: its weight delta is "
               f"exactly {weights[0]} x the adapter's" if len(adapters) == 1 else
               f"The weighted average (a model soup) of {len(adapters)} adapters of one recipe, weights {weights}: its "
               f"weight delta is exactly the weighted sum of theirs")
            + f" (r={cfg.get('r')}). Written by appliance.training.soup.average_adapters.\n")
    return out
