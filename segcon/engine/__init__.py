"""What every run does around a method's step: evaluation and reporting (EvaluationModule), the
divergence check, optimisation, the terms' class frequencies and memories, and the Lightning
callbacks train.py and evaluate.py attach (checkpoints, resume state, stopping together, the
final report, the progress bar)."""
