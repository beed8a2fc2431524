"""The plots of ``evaluate``: confusion matrices, ROC and PR curves, reliability diagrams, training curves.

A domain module: it returns the paths it wrote and prints nothing (``pneumoscan evaluate --report`` says them).
What ``predict`` writes (CSV, JSON, heatmaps) lives in ``pneumoscan.cli.output``.
"""

from __future__ import annotations

import csv
from pathlib import Path

# ---- evaluation plots -------------------------------------------------------------------------------------
# matplotlib's object API (Figure, no pyplot): no global state, no display needed, safe in servers and tests.

# screening drawn larger so that it stays visible when both thresholds land on the same point
_POINT_STYLE = {"screening": ("tab:red", "o", 11), "balanced": ("tab:blue", "s", 7)}


def _figure(width: float = 5.0, height: float = 4.2):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=120, layout="constrained")


def _save(fig, path: Path) -> Path:
    fig.savefig(path, format="png")
    return path


def _style(name: str, index: int) -> tuple[str, str, int]:
    return _POINT_STYLE.get(name, (f"C{index + 2}", "D", 7))


def plot_confusion(point, name: str, title: str, path: Path) -> Path:
    """Counts with row percentages: sensitivity and specificity read straight off the diagonal."""
    import numpy as np

    matrix = np.array([[point.tn, point.fp], [point.fn, point.tp]])
    fig = _figure(4.6, 4.0)
    ax = fig.add_subplot()
    ax.imshow(matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1), cmap="Blues", vmin=0, vmax=1)
    for i in range(2):
        for j in range(2):
            share = matrix[i, j] / max(1, matrix[i].sum())
            ax.text(j, i, f"{matrix[i, j]}\n{share:.1%} of row", ha="center", va="center", fontsize=11,
                    color="white" if share > 0.5 else "black")
    ax.set_xticks([0, 1], ["NORMAL", "PNEUMONIA"])
    ax.set_yticks([0, 1], ["NORMAL", "PNEUMONIA"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title}\n{name} threshold {point.threshold:.3f}: sens {point.sensitivity:.3f}, "
                 f"spec {point.specificity:.3f}", fontsize=9)
    return _save(fig, path)


def plot_roc(y, p, points: dict, title: str, path: Path) -> Path:
    from sklearn.metrics import roc_auc_score, roc_curve

    fpr, tpr, _ = roc_curve(y, p)
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot(fpr, tpr, color="0.2", lw=1.6, label=f"ROC (AUC {roc_auc_score(y, p):.3f})")
    ax.plot([0, 1], [0, 1], ls=":", color="0.6", lw=1)
    for i, (name, pt) in enumerate(points.items()):
        color, marker, size = _style(name, i)
        ax.plot(1 - pt.specificity, pt.sensitivity, marker, color=color, ms=size, mec="black",
                label=f"{name} (t={pt.threshold:.3f}): sens {pt.sensitivity:.3f}, spec {pt.specificity:.3f}")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="1 - specificity (false positive rate)",
           ylabel="sensitivity (true positive rate)", title=title)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7.5)
    return _save(fig, path)


def plot_pr(y, p, points: dict, title: str, path: Path) -> Path:
    import numpy as np
    from sklearn.metrics import average_precision_score, precision_recall_curve

    precision, recall, _ = precision_recall_curve(y, p)
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot(recall, precision, color="0.2", lw=1.6, label=f"PR (AP {average_precision_score(y, p):.3f})")
    prevalence = float(np.mean(y))
    ax.axhline(prevalence, ls=":", color="0.6", lw=1, label=f"prevalence {prevalence:.3f}")
    for i, (name, pt) in enumerate(points.items()):
        color, marker, size = _style(name, i)
        ax.plot(pt.sensitivity, pt.precision, marker, color=color, ms=size, mec="black",
                label=f"{name} (t={pt.threshold:.3f}): recall {pt.sensitivity:.3f}, precision {pt.precision:.3f}")
    ax.set(xlim=(-0.01, 1.01), ylim=(0, 1.01), xlabel="recall (sensitivity)", ylabel="precision (PPV)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=7.5)
    return _save(fig, path)


def plot_reliability(y, curves: dict, title: str, path: Path, bins: int = 10) -> Path:
    """Observed pneumonia rate per confidence bin for each probability version, with how many images each bin
    holds: a point off the diagonal on 3 images means little, on 300 it means miscalibration."""
    import numpy as np

    from .metrics import expected_calibration_error

    y = np.asarray(y, dtype=float)
    edges = np.linspace(0, 1, bins + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    fig = _figure(5.0, 5.4)
    grid = fig.add_gridspec(2, 1, height_ratios=[3, 1])
    ax, hist = fig.add_subplot(grid[0]), fig.add_subplot(grid[1])
    ax.plot([0, 1], [0, 1], ls=":", color="0.6", lw=1, label="perfect calibration")
    width = 0.9 / bins / max(1, len(curves))
    for i, (label, p) in enumerate(curves.items()):
        p = np.asarray(p, dtype=float)
        index = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
        counts = np.bincount(index, minlength=bins)
        keep = counts > 0
        mean_p = np.bincount(index, weights=p, minlength=bins)[keep] / counts[keep]
        rate = np.bincount(index, weights=y, minlength=bins)[keep] / counts[keep]
        ece = expected_calibration_error(y, p)
        ax.plot(mean_p, rate, "o-", color=f"C{i}", lw=1.4, ms=5, label=f"{label} (ECE {ece:.3f})")
        hist.bar(centers - 0.45 / bins + width * (i + 0.5), counts, width=width, color=f"C{i}", alpha=0.8)
    ax.set(xlim=(0, 1), ylim=(-0.02, 1.02), ylabel="observed pneumonia rate", title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    hist.set(xlim=(0, 1), xlabel="predicted probability of pneumonia", ylabel="images")
    return _save(fig, path)


def read_training_log(metrics_csv: Path) -> dict[str, list[float]]:
    """metrics.csv of a run as columns of floats (epoch, train_loss, val_loss, val_auc, lr, seconds)."""
    with Path(metrics_csv).open() as f:
        rows = list(csv.DictReader(f))
    return {key: [float(r[key]) for r in rows] for key in (rows[0] if rows else {})}


def plot_training(log: dict[str, list[float]], title: str, path: Path) -> Path:
    fig = _figure(8.0, 3.6)
    loss, auc = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    epochs = log["epoch"]
    loss.plot(epochs, log["train_loss"], "o-", label="train (augmented)")
    loss.plot(epochs, log["val_loss"], "s-", label="validation")
    loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    auc.plot(epochs, log["val_auc"], "s-", color="C1")
    best = max(range(len(epochs)), key=lambda i: log["val_auc"][i])
    auc.plot(epochs[best], log["val_auc"][best], "*", color="tab:red", ms=14,
             label=f"best epoch {epochs[best]:g} (AUC {log['val_auc'][best]:.4f})")
    auc.set(xlabel="epoch", ylabel="ROC AUC", title="validation AUC")
    for ax in (loss, auc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def write_report(result, model, out_dir: str | Path, run_dir: str | Path | None = None) -> list[Path]:
    """PNG plots of one evaluation in ``out_dir``: a confusion matrix per operating point, ROC and PR curves
    with the operating points marked, the reliability diagram before and after temperature scaling, and the
    training curves when ``run_dir`` (a run folder, or the model file inside one) has a metrics.csv."""
    import numpy as np

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    y, p = np.asarray(result.labels), np.asarray(result.probabilities)
    title = f"{model.name}, {result.split} split (n={result.n})"
    paths = [plot_confusion(pt, name, title, out / f"confusion_{name}.png") for name, pt in result.points.items()]
    if len(np.unique(y)) == 2:  # curves need both classes
        paths.append(plot_roc(y, p, result.points, title, out / "roc.png"))
        paths.append(plot_pr(y, p, result.points, title, out / "pr.png"))
    curves = {}
    raw = getattr(result, "probabilities_uncalibrated", None)
    if raw is not None and len(raw) == len(p):
        curves["before calibration, T=1"] = raw
    curves[f"after calibration, T={model.temperature:.2f}, bias={model.bias:+.2f}"] = p
    paths.append(plot_reliability(y, curves, title, out / "reliability.png"))
    if run_dir is not None:
        run = Path(run_dir)
        metrics_csv = (run if run.is_dir() else run.parent) / "metrics.csv"
        if metrics_csv.is_file():
            log = read_training_log(metrics_csv)
            if log.get("epoch"):
                paths.append(plot_training(log, f"training of {model.name}", out / "training.png"))
    return paths
