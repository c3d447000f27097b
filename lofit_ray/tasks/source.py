"""Where a task's rows come from. Every built-in task reads through Hugging Face `datasets`, from one of:

  * a local file: .csv, .json (a list of objects), .jsonl or .parquet;
  * a folder written by `save_to_disk`: one split (a `Dataset` folder), or several (a `DatasetDict` folder,
    whose split is then named, e.g. the paper repository's `fold_0_seed_42.hf` with train/val/test);
  * a hub dataset id, `owner/name` or `owner/name:config`, read when a network exists;
  * a local copy of a hub dataset repository (`git clone https://huggingface.co/datasets/OWNER/NAME`),
    `folder` or `folder:config`: the offline way to use a hub dataset.

`datasets` keeps its Arrow cache under $LOFIT_CACHE_DIR/datasets. Rows come back as plain dicts; each task
checks the fields it needs and names the row on error. User JSONL files (`--task jsonl`) keep their own
line-numbered reader (iter_jsonl, below; used by tasks/jsonl.py): their errors point at a line of a file the
user wrote.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..paths import cache_dir
from .base import DATA_DIR_ENV, TaskDataError

FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# The csv builder reads through pandas; without these, cells such as "None" or "NA" would become nulls.
CSV_OPTIONS = {"keep_default_na": False, "na_filter": False}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?$")

WAYS_TO_SUPPLY = (
    "Supply the data one of three ways: (1) run `lofit-ray data fetch` once on a machine with a network "
    f"(it writes the paper's splits under ${DATA_DIR_ENV} or --to DIR), then point --data-dir / "
    f"${DATA_DIR_ENV} at them; (2) give a local file (.csv, .json, .jsonl, .parquet) or a `save_to_disk` "
    "folder as the split or as task.source; (3) give a hub dataset id as task.source on a machine that "
    "reaches the Hugging Face hub."
)


def datasets_cache() -> Path:
    return cache_dir() / "datasets"


def is_hub_id(source: str) -> bool:
    """A hub id is `owner/name[:config]` that is not an existing path and has no data-file suffix."""
    text = str(source)
    return (bool(HUB_ID.match(text)) and not Path(text).expanduser().exists()
            and Path(text.split(":")[0]).suffix.lower() not in FILE_BUILDERS)


def read_records(source, split: str | None = None, records_key: str | None = None) -> list[dict]:
    """The rows of a data file, of a folder (`save_to_disk`, or a local copy of a hub dataset repository,
    `folder:config` naming a config), or of a hub dataset; `split` names the split where there are several.
    `records_key`: a .json file holding one object whose records sit under that key."""
    text = str(source)
    path = Path(text).expanduser()
    if path.is_file():
        return _from_file(path, records_key)
    if records_key is not None:
        if not path.exists():
            raise TaskDataError(f"{source}: no such file (relative paths start at the directory you run from). "
                                f"{WAYS_TO_SUPPLY}")
        raise TaskDataError(f"task.records_key: {records_key!r} applies to a .json file holding one object; "
                            f"{source} is not one. Drop task.records_key.")
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        return _from_disk(path, split)
    name, config = text, None
    if ":" in text and "/" not in text.rsplit(":", 1)[1]:
        name, config = text.rsplit(":", 1)
    if Path(name).expanduser().is_dir() or is_hub_id(text):
        return _from_repo(str(Path(name).expanduser()) if Path(name).expanduser().is_dir() else name, config, split)
    raise TaskDataError(f"{source}: no such file or folder. {WAYS_TO_SUPPLY}")


def _quiet():
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def _from_file(path: Path, records_key: str | None = None) -> list[dict]:
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise TaskDataError(f"{path}: unknown data file type {path.suffix!r}; use one of "
                            f"{', '.join(FILE_BUILDERS)} or a `save_to_disk` folder.")
    if records_key is not None and path.suffix.lower() != ".json":
        raise TaskDataError(f"task.records_key: {records_key!r} applies to a .json file holding one object, not to "
                            f"{path.name}. Drop task.records_key.")
    if builder == "json":
        _check_json(path, records_key)
    if builder == "csv" and b"\x00" in path.read_bytes():  # pandas would read the NUL into a cell
        raise TaskDataError(f"{path}: holds NUL bytes, so it is not a text CSV file; save it as UTF-8 text.")
    datasets = _quiet()
    options = CSV_OPTIONS if builder == "csv" else {}
    if records_key is not None:
        options = {"field": records_key}
    try:
        ds = datasets.load_dataset(builder, data_files=str(path.resolve()), split="train",
                                   cache_dir=str(datasets_cache()), **options)
    except Exception as exc:  # datasets wraps the parser's error (pyarrow, pandas) in DatasetGenerationError
        cause = exc.__cause__ or exc
        if "corresponds to no data" in str(cause):  # a header, "[]" or blank lines: the task says it is empty
            return []
        raise TaskDataError(f"{path}: `datasets` could not read it as {builder} ({type(cause).__name__}: "
                            f"{str(cause).splitlines()[0] if str(cause) else ''}).") from exc
    return ds.to_list()


def _check_json(path: Path, records_key: str | None = None) -> None:
    """Parse a JSON / JSONL file with Python's json first: pyarrow's reader (under `datasets`) crashes the whole
    process on some malformed input (5000 unclosed brackets: a segfault), where a bad file must be an error
    that names it."""
    if path.suffix.lower() == ".jsonl":
        for _ in iter_jsonl(path):  # raises TaskDataError naming the line
            pass
        return
    try:
        with open(path, encoding="utf-8-sig") as f:
            data = json.load(f)
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, a 5000-digit number, arrays nested 1000 deep
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e).split(";")[0]
        raise TaskDataError(f"{path}: not valid UTF-8 JSON ({reason}).") from None
    except OSError as e:
        raise TaskDataError(f"{path}: cannot read it ({e.strerror or e}).") from None
    if records_key is not None:
        if not isinstance(data, dict) or records_key not in data:
            keys = sorted(data) if isinstance(data, dict) else f"a {type(data).__name__}, not an object"
            raise TaskDataError(f"task.records_key: {path} has no key {records_key!r} at the top (it holds {keys}); "
                                f"name the key the records sit under.")
        data = data[records_key]
    elif isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        raise TaskDataError(f"{path}: one JSON object, not a list of records; set task.records_key to the key the "
                            f"records sit under{' (' + ', '.join(map(repr, lists)) + ' holds a list)' if lists else ''}.")
    if not (isinstance(data, list) and all(isinstance(row, dict) for row in data)):  # `null` crashes pyarrow too
        raise TaskDataError(f"{path}: expected a JSON list of objects (one per example), got "
                            f"{type(data).__name__}{' with non-object items' if isinstance(data, list) else ''}.")


def _from_disk(path: Path, split: str | None) -> list[dict]:
    datasets = _quiet()
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise TaskDataError(f"{path}: holds the splits {sorted(ds)}; name one of them"
                                f"{f' (not {split!r})' if split else ''}, or give the split's own folder "
                                f"({path}/{next(iter(ds))}).")
        ds = ds[split]
    return ds.to_list()


def _from_repo(name: str, config: str | None, split: str | None) -> list[dict]:
    """A hub dataset, or a local copy of its repository (the same files, read the same way)."""
    datasets = _quiet()
    where = name + (f":{config}" if config else "")
    try:
        ds = datasets.load_dataset(name, config, split=split, cache_dir=str(datasets_cache()))
    except (ConnectionError, OSError) as exc:  # no network, or the hub is switched off (HF_HUB_OFFLINE=1)
        raise TaskDataError(f"{where}: cannot read it from the Hugging Face hub ({type(exc).__name__}). "
                            f"{WAYS_TO_SUPPLY}") from exc
    except ValueError as exc:  # an unknown split or config
        raise TaskDataError(f"{where}: {str(exc).splitlines()[0]}") from exc
    if isinstance(ds, datasets.DatasetDict):
        raise TaskDataError(f"{where}: holds the splits {sorted(ds)}; name one of them.")
    return ds.to_list()


def iter_jsonl(path):
    """(line number, object) for each non-blank line; bad JSON or non-objects raise TaskDataError.

    A UTF-8 byte-order mark at the start (Windows editors write one) is skipped."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise TaskDataError(f"{path}:{lineno}: invalid JSON ({e.msg}, column {e.colno}).") from None
                except (ValueError, RecursionError) as e:  # a number of 5000 digits, arrays nested 1000 deep
                    reason = "nested too deeply" if isinstance(e, RecursionError) else str(e).split(";")[0]
                    raise TaskDataError(f"{path}:{lineno}: invalid JSON ({reason}).") from None
                if not isinstance(row, dict):
                    raise TaskDataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}.")
                yield lineno, row
    except UnicodeDecodeError as e:
        raise TaskDataError(f"{path}: not UTF-8 text ({e}).") from None
    except OSError as e:
        raise TaskDataError(f"{path}: cannot read it ({e.strerror or e}).") from None
