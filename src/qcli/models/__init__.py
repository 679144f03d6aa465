"""MODEL specs, builtin architectures and input specs."""

from qcli.models.builtin import Architecture, build_architecture
from qcli.models.input_spec import IMAGENET_SPEC, InputSpec
from qcli.models.resnet_cifar import resnet20
from qcli.models.spec import (
    LoadedModel,
    ModelSource,
    load_model,
    state_dict_checksum,
)

__all__ = [
    "IMAGENET_SPEC",
    "Architecture",
    "InputSpec",
    "LoadedModel",
    "ModelSource",
    "build_architecture",
    "load_model",
    "resnet20",
    "state_dict_checksum",
]
