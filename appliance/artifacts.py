"""Names of the files in build and adapter directories: the one home of each artifact contract."""

from __future__ import annotations

MODEL_FILE = "model.gguf"  # build directory: the shipped (gated) quantized model
REPORT_FILE = "build-report.json"  # build directory: every step's inputs and outputs, the gate verdict
MODELFILE_FILE = "Modelfile"  # build directory: the Ollama Modelfile
LABELS_FILE = "labels.json"  # build and adapter directories: the classifier's label set
TASK_FILE = "bankllm-task.json"  # adapter directory (copied into the build): system prompt, labels, calibration
ANSWERS_FILE = "answers.toml"  # build directory: the bank's approved-answer library
