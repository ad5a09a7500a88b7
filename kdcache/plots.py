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


IMAGE_PANELS = (("top1", "test top-1 (%)", "teacher_top1"),)


def plot_summary(rows: list[dict], path: str, panels=IMAGE_PANELS) -> None:
    """OUT/summary.png: each panel's metric (key, axis label, the teacher's key) against parameters."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), dpi=120, squeeze=False)
    for ax, (key, label, teacher_key) in zip(axes[0], panels):
        for kind, style in (("kd", "o-"), ("online_kd", "s-"), ("baseline", "x--"), ("plain", "^-")):
            pts = sorted((r["params"], r[key]) for r in rows if r["kind"] == kind)
            if pts:
                ax.plot(*zip(*pts), style, label={"kd": "KD from cache"}.get(kind, kind.replace("_", " ")))
        teacher = next((r[teacher_key] for r in rows if r.get(teacher_key) is not None), None)
        if teacher is not None:
            ax.axhline(teacher, color="gray", linestyle=":", label=f"teacher ({teacher:.1f})")
        ax.set_xscale("log")
        ax.set_xlabel("student parameters")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
