"""The sweep's picture: student test top-1 against parameters, KD and baseline, teacher line."""
from __future__ import annotations


def plot_summary(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

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
