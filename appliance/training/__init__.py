"""Fine-tuning (train.py), data validation (data.py), constrained evaluation (evaluate.py), forgetting check."""
