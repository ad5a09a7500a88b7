"""Token-level caches for language-model distillation: text -> tokens (text.py) -> causal-LM teacher
(models.py) -> store (dump.py) -> student (train.py)."""
