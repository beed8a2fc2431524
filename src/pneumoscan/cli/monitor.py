"""``pneumoscan monitor SOURCE...``: drift of a deployment's recorded results against the model's validation
reference, without labels. Exit 1 when a window alarms, 0 when none does, 2 on bad input (for cron)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from ..errors import PneumoscanError
from .args import positive_int

SHORT = {"probability": "prob", "guard_score": "guard", "input_mean": "mean", "input_std": "std"}


def cmd_monitor(args: argparse.Namespace) -> int:
    from .. import monitor
    from ..durable import atomic_write, check_output_file

    if not 0 < args.false_alarm_rate < 0.5:
        raise PneumoscanError(f"--false-alarm-rate must be in (0, 0.5), got {args.false_alarm_rate}")
    if args.write_reference:
        return _write_reference(args)
    if not args.sources:
        raise PneumoscanError("give the records to monitor (audit logs, node results, CSV/Parquet outputs)")
    if args.reference and args.model:
        raise PneumoscanError("give --reference or --model, not both")
    check_output_file(args.json, "--json")
    check_output_file(args.plot, "--plot")
    ref = monitor.Reference.load(args.reference) if args.reference else monitor.reference_of_model(args.model)
    rows, other = monitor.read_records(args.sources)
    null = monitor.NullModel(ref, false_alarm_rate=args.false_alarm_rate, simulations=args.simulations)
    report = monitor.monitor(rows, ref, size=None if args.by_day else args.window, by_day=args.by_day,
                             false_alarm_rate=args.false_alarm_rate, other_lines=other, null=null)
    if args.json == "-":
        print(json.dumps(report.to_dict(), indent=1))
    else:
        print_table(report)
        if args.json:
            text = json.dumps(report.to_dict(), indent=1) + "\n"
            atomic_write(args.json, lambda tmp: Path(tmp).write_text(text))
            print(f"wrote {args.json}")
    if args.plot:
        atomic_write(args.plot, lambda tmp: plot(report, tmp))
        print(f"wrote {args.plot}")
    return 1 if report.alarm else 0


def _write_reference(args: argparse.Namespace) -> int:
    from .. import monitor
    from ..durable import atomic_write, check_output_file
    from ..predict import load_model
    from ..run import RunFolder

    check_output_file(args.write_reference, "--write-reference")
    model = load_model(args.model)
    run = RunFolder(args.run) if args.run else RunFolder.of_model(model.path)
    if run is None:
        raise PneumoscanError(f"{model.path}: no run folder beside the model file; give --run RUN_DIR (the folder "
                              "with the split.csv its calibration was fitted on)")
    samples = run.split()[1]
    ref = monitor.reference_from_files(model, [s.path for s in samples], patients=[s.patient for s in samples],
                                       source=f"{len(samples)} validation images of {run.path.name}/split.csv")
    text = json.dumps(ref.to_dict(), sort_keys=True) + "\n"
    atomic_write(args.write_reference, lambda tmp: Path(tmp).write_text(text))
    print(f"wrote {args.write_reference}: reference of model {model.name} (sha256 {model.sha256}) from {ref.n} "
          f"results ({ref.statuses.get('ok', 0)} ok)")
    return 0


def _cell(value, fmt: str = ".3f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def print_table(report, file=None) -> None:
    file = file or sys.stdout
    ref = report.reference
    print(f"reference: {ref.source or 'drift reference'} ({ref.n} results); pneumonia share {ref.share():.3f}; "
          f"alarm at a false-alarm rate of {report.false_alarm_rate:g} per window", file=file)
    notes = []
    if report.other_lines:
        notes.append(f"{report.other_lines} line(s) were no screening result (other requests)")
    if report.other_models:
        notes.append(f"{report.other_models} record(s) of another model left out")
    if notes:
        print("; ".join(notes), file=file)
    head = ["window", "n", *(f"KS {SHORT[k]}" for k in SHORT), "pneumonia share [95% CI]", "rejected [95% CI]",
            "header TV", "score", "threshold", ""]
    lines = [head]
    for w in report.windows:
        share = w.pneumonia_share
        any_rej = w.rejection.get("any")
        lines.append([
            w.label, str(w.n), *(_cell(w.ks.get(k)) for k in SHORT),
            f"{share[0]:.3f} [{share[1]:.3f}, {share[2]:.3f}]" if share else "-",
            f"{any_rej[0]:.3f} [{any_rej[1]:.3f}, {any_rej[2]:.3f}]" if any_rej else "-",
            _cell(max(w.header_tv.values(), default=None)), _cell(w.score, ".2f"), _cell(w.threshold, ".2f"),
            "ALARM" if w.alarm else w.note])
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    for row in lines:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip(), file=file)
    alarms = sum(w.alarm for w in report.windows)
    print(f"{alarms} of {len(report.windows)} window(s) alarm", file=file)


def plot(report, path, title: str = "pneumoscan monitor") -> None:
    """Drift score per window against its alarm threshold, and the EM pneumonia share with its interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    windows = report.windows
    x = list(range(1, len(windows) + 1))
    labels = [w.label for w in windows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.0, 0.35 * len(x) + 3), 6), sharex=True)
    score = [w.score if w.score is not None else math.nan for w in windows]
    top.plot(x, score, "o-", color="tab:blue", label="drift score (max -log10 p)")
    top.step(x, [w.threshold if w.threshold is not None else math.nan for w in windows], where="mid",
             color="tab:red", linestyle="--", label=f"alarm threshold (false-alarm rate {report.false_alarm_rate:g})")
    alarms = [i for i, w in zip(x, windows, strict=True) if w.alarm]
    top.scatter(alarms, [score[i - 1] for i in alarms], s=80, facecolors="none", edgecolors="tab:red", label="alarm")
    top.set_ylabel("score")
    top.legend(loc="upper left", fontsize=8)
    top.set_title(title)
    shares = [w.pneumonia_share for w in windows]
    mid = [s[0] if s else math.nan for s in shares]
    low = [s[0] - s[1] if s else 0.0 for s in shares]
    high = [s[2] - s[0] if s else 0.0 for s in shares]
    bottom.errorbar(x, mid, yerr=[low, high], fmt="o", color="tab:green", capsize=3,
                    label="EM pneumonia share [95% CI]")
    bottom.axhline(report.reference.share(), color="grey", linestyle=":", label="reference share")
    bottom.set_ylim(0, 1)
    bottom.set_ylabel("pneumonia share")
    bottom.set_xticks(x)
    bottom.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    bottom.set_xlabel("window")
    bottom.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def add_monitor_command(sub) -> None:
    p = sub.add_parser(
        "monitor", help="drift of recorded results against the model's validation reference, without labels",
        description="Reads the results the routes record (serve's --audit-log JSON lines, the DICOM node's "
                    "results, predict/archive CSV or Parquet outputs, or folders of them) and judges windows of "
                    "them against the model's drift reference. Exit status: 1 when a window alarms, 0 when none "
                    "does, 2 on bad input.")
    p.add_argument("sources", nargs="*", metavar="SOURCE", help="record files or folders, oldest first")
    p.add_argument("--model", help="model file whose drift reference to use (default: the bundled model)")
    p.add_argument("--reference", metavar="FILE", help="a drift reference JSON file instead of the model's")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--window", type=positive_int, default=100, metavar="N",
                       help="judge consecutive windows of N results (default 100)")
    group.add_argument("--by-day", action="store_true", help="one window per UTC day (records need times)")
    p.add_argument("--false-alarm-rate", type=float, default=0.01, metavar="R",
                   help="share of in-distribution windows allowed to alarm; sets the threshold (default 0.01)")
    p.add_argument("--simulations", type=positive_int, default=None, metavar="N",
                   help="in-distribution windows simulated to set the threshold (default: 20 / rate, at least "
                        "1000; 2000 at 0.01)")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON ('-': print JSON instead of the "
                                                  "table)")
    p.add_argument("--plot", metavar="PNG", help="plot the drift score per window over time")
    p.add_argument("--write-reference", metavar="FILE",
                   help="instead: screen the model's validation images (its run folder's split.csv) and write "
                        "their drift reference to FILE")
    p.add_argument("--run", metavar="RUN_DIR", help="with --write-reference: the run folder of the model")
    p.set_defaults(func=cmd_monitor)
