"""``pneumoscan data summary | download``."""

from __future__ import annotations

import argparse
import sys


def cmd_data_summary(args: argparse.Namespace) -> int:
    from ..data.labels import is_labelled_set, read_labelled
    from ..data.summary import format_summary, summarize, summarize_labelled

    if not is_labelled_set(args.data_dir):
        print(format_summary(summarize(args.data_dir)))
        return 0
    labelled = read_labelled(args.data_dir)
    print(format_summary(summarize_labelled(labelled)))
    print(f"{labelled.name}: {len(labelled.samples)} usable of {labelled.rows} "
          f"{'rows' if labelled.is_csv else 'files'}, {labelled.patients} patients; "
          f"{len(labelled.problems)} left out" + (":" if labelled.problems else ""))
    for line in labelled.problems:
        print(f"left out: {line}")
    return 0


def print_left_out(labelled, *, quiet: bool = False) -> None:
    """The rows or files a labelled set left out, one ``pneumoscan: left out:`` line each on stderr (``quiet``: one
    count instead): what every command reading labelled site data prints before it starts."""
    if not labelled.problems:
        return
    if quiet:
        print(f"pneumoscan: warning: {labelled.name}: {len(labelled.problems)} left out; using "
              f"{len(labelled.samples)}", file=sys.stderr)
        return
    for line in labelled.problems:
        print(f"pneumoscan: left out: {line}", file=sys.stderr)


def cmd_data_download(args: argparse.Namespace) -> int:
    from ..data.download import DATASET, download

    counts = download(args.dest)
    print(f"{args.dest}: Kaggle {DATASET}, " + ", ".join(f"{split} {n} images" for split, n in counts.items()))
    return 0


def add_data_command(sub) -> None:
    data = sub.add_parser("data", help="inspect or fetch a dataset").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("summary", help="images, patients, sizes and class balance per split")
    p.add_argument("data_dir", help="Kaggle-layout folder, MedMNIST .npz, or labelled site data (a labels CSV or a "
                                    "folder with NORMAL/ and PNEUMONIA/: its rows left out listed too)")
    p.set_defaults(func=cmd_data_summary)
    p = data.add_parser("download", help="fetch the Kermany dataset from Kaggle (needs Kaggle credentials)")
    p.add_argument("dest", help="new folder that receives {train,val,test}/{NORMAL,PNEUMONIA}")
    p.set_defaults(func=cmd_data_download)
