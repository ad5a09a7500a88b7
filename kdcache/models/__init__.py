"""Models: the registry and how a model is named (registry), the CIFAR nets and small CNNs it holds
(cifar, small), what a model is made of (layers), and kdcache checkpoints (checkpoints).
This module only re-exports; importing it registers every model.
"""

from kdcache.models import cifar, small
from kdcache.models.checkpoints import (CHECKPOINT_FORMAT, build_teacher, load_checkpoint, model_from_checkpoint,
                                        names_code, save_checkpoint)
from kdcache.models.layers import count_parameters, layers_model, list_layers
from kdcache.models.registry import MODELS, check_model_name, create_model, model_names, register_model
from kdcache.modules import get_module, weights_sha256  # models are addressed by module path

NETS = (cifar, small)  # the modules whose nets register themselves when imported

__all__ = [
    "MODELS",
    "register_model",
    "create_model",
    "check_model_name",
    "model_names",
    "get_module",
    "weights_sha256",
    "list_layers",
    "layers_model",
    "count_parameters",
    "names_code",
    "save_checkpoint",
    "load_checkpoint",
    "model_from_checkpoint",
    "build_teacher",
    "CHECKPOINT_FORMAT",
]
