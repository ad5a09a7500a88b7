"""Pictures of a run: the sweep (test top-1 against parameters) and each student's training curves."""
from __future__ import annotations


def _pyplot():
    import matplotlib  # deferred: only runs that finish draw

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def plot_history(metrics: list[dict], path: str, title: str = "") -> None:
    """OUT/<student>/curves.png: training loss (and its parts) and test top-1, per epoch."""
    plt = _pyplot()
    epochs = [m["epoch"] for m in metrics]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5), dpi=110)
    for key, label in (("loss", "loss"), ("task_loss", "task (CE)"), ("kd_loss", "KD"), ("feature_loss", "feature")):
        if metrics and key in metrics[0]:
            left.plot(epochs, [m[key] for m in metrics], "o-" if key == "loss" else ".--", label=label)
    left.set_xlabel("epoch")
    left.set_ylabel("training loss")
    left.legend()
    right.plot(epochs, [m["top1"] for m in metrics], "o-", label="test top-1")
    if metrics and metrics[0].get("agreement") is not None:
        right.plot(epochs, [m["agreement"] for m in metrics], "s--", label="agreement with teacher")
    right.set_xlabel("epoch")
    right.set_ylabel("%")
    right.legend()
    for ax in (left, right):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_summary(rows: list[dict], path: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for kind, style in (("kd", "o-"), ("online_kd", "s-"), ("baseline", "x--"), ("plain", "^-")):
        pts = sorted((r["params"], r["top1"]) for r in rows if r["kind"] == kind)
        if pts:
            ax.plot(*zip(*pts), style, label={"kd": "KD from cache"}.get(kind, kind.replace("_", " ")))
    teacher = next((r["teacher_top1"] for r in rows if r.get("teacher_top1") is not None), None)
    if teacher is not None:
        ax.axhline(teacher, color="gray", linestyle=":", label=f"teacher ({teacher:.1f})")
    ax.set_xscale("log")
    ax.set_xlabel("student parameters")
    ax.set_ylabel("test top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
