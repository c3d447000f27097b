"""`lofit-ray data fetch`: put the paper's splits of TruthfulQA, MQuAKE and CLUTRR in the data dir."""
from __future__ import annotations

from ..config import TaskConfig
from .common import field_help


def cmd_fetch(args) -> None:
    from ..tasks.base import data_dir
    from ..tasks.fetch import fetch_paper_data

    dest = data_dir(args.to)
    fetch_paper_data(dest, base_url=args.base_url, force=args.force)
    print(f"[data] the three tasks' splits are in {dest}; point --data-dir / $LOFIT_DATA_DIR there if that is "
          f"not the default")


def add_parsers(sub) -> None:
    from ..tasks.fetch import PAPER_DATA_URL

    p = sub.add_parser("data", help="get task data")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    f = data_sub.add_parser("fetch", help="download the paper's splits of all three tasks (needs a network once)")
    f.add_argument("--to", default=None, help=f"destination; {field_help(TaskConfig, 'data_dir')}")
    f.add_argument("--base-url", default=PAPER_DATA_URL, help="where the files are (default: %(default)s)")
    f.add_argument("--force", action="store_true", help="download again files that are already there")
    f.set_defaults(func=cmd_fetch)
