"""Students defined for tests, reached as `helpers.students:NAME` (the module:callable syntax)."""
import torch.nn as nn


def no_bn(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    """A tiny CNN without BatchNorm: its gradients do not depend on how a batch is split over
    ranks, so DDP over 2 processes must follow the 1-process run step for step."""
    return nn.Sequential(nn.Conv2d(in_chans, 8, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))


class _Explodes(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.fc = nn.Linear(1, num_classes)

    def forward(self, x):
        raise RuntimeError("simulated failure in a student")


def explodes(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    """Builds, then fails on its first batch: a job that crashes mid-sweep."""
    return _Explodes(num_classes)
