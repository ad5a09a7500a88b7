"""The names an option can take, declared once, importing nothing: the config, the command line
(and its --help, which must not import torch) and the registries that implement them all read them
here. A test checks that each registry implements exactly these names.
"""

DTYPES = ("float16", "bfloat16", "float32", "int8", "uint8")  # float16 first: the default (kdcache/encodings.py)
INDEX_LAYOUTS = ("plain", "packed")  # top-k class indices: smallest unsigned dtype, or ceil(log2 C) bits each
MIXES = ("mixup", "cutmix")  # kdcache/augment.py
AUGMENT_PRESETS = ("cifar", "imagenet", "digits", "none")  # kdcache/augment.py; or module:callable
KD_LOSSES = ("soft_target", "logits", "mutual", "dkd", "nkd")  # kdcache/losses.py (nkd: dkd normalized)
LOSSES = KD_LOSSES + ("reverse_kl", "gjsd")  # --loss: the image losses, and the token-level ones (TOKEN_LOSSES)
FEATURE_LOSSES = ("fitnet", "attention", "activation_boundaries", "similarity", "pkt", "rkd")  # kdcache/losses.py
ACTIVATION_FORMS = ("full", "attention", "pool")  # kdcache/hooks.py REDUCTIONS
SCHEDULES = ("constant", "linear", "cos", "step", "one_cycle", "agp")  # kdcache/schedules.py
OPTIMIZERS = ("sgd", "adamw")  # kdcache/train.py make_optimizer
LR_SCHEDULES = ("cos", "step")  # kdcache/train.py lr_factor
VIEW_POLICIES = ("random", "cycle")  # kdcache/augment.py TrainViews
TOPK_RECONSTRUCTIONS = ("sparse", "dense")  # kdcache/losses.py soft_target_topk
BUDGET_RANKS = ("fidelity", "student")  # kdcache/fidelity.py choose: by KL to the full targets, or kdcache/probe.py
TARGETS_IN = ("auto", "memory", "gpu", "stream")  # kdcache/targets.py choose_place
PACKINGS = ("document", "packed")  # kdcache/tokens/text.py: a sequence holds one document's tokens, or several
LM_MODELS = ("lm_tiny", "lm_small", "lm_medium", "lm_large")  # kdcache/tokens/models.py: GPT-2 shapes by size
TOKEN_LOSSES = ("soft_target", "reverse_kl", "gjsd")  # kdcache/losses.py token_kd
