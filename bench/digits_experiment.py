"""What the digits quality experiments (features.py, views.py) share: their options and teacher."""
from __future__ import annotations

import argparse
import os
import shutil

import torch

from kdcache import train_student

TEACHER = "runs/digits/teacher/resnet20/model.pt"  # pipelines/digits.yaml, stage 1


def parse_args(description: str, out: str, argv=None) -> argparse.Namespace:
    """The common options; also sets torch's threads and empties the output folder."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--student", default="cnn_tiny", help="the smallest demo student: the most to gain from KD")
    parser.add_argument("--epochs", type=int, default=12, help="as the demo's students (pipelines/digits.yaml)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="each row is a mean over these")
    parser.add_argument("--out", default=out)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch CPU threads; 1 where another job shares the cores (spinning threads contend)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if os.path.exists(args.out):
        shutil.rmtree(args.out)
    os.makedirs(args.out)
    return args


def teacher_checkpoint(out: str) -> str:
    """The demo's teacher when `make demo` has run, else one trained the same way into `out`."""
    if os.path.isfile(TEACHER):
        return TEACHER
    train_student(students=["resnet20"], dataset="digits", epochs=8, out=os.path.join(out, "teacher"))
    return os.path.join(out, "teacher", "resnet20", "model.pt")
