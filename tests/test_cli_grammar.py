"""One CLI grammar, and the old spellings that still work for one release (lofit_ray.cli.old_spellings)."""
from __future__ import annotations

import json

import pytest

from lofit_ray.cli import build_parser, main
from lofit_ray.cli.old_spellings import COMMANDS, FLAGS, SUBCOMMANDS, table, translate

# the arguments an old spelling needs to parse at all, per (new) command
NEEDS = {"train": ["--heads", "h.json"], "eval": [], "select": [], "lora": [], "iti": ["--k", "2"],
         "heads overlap": ["a", "b"]}


def _cases():
    for old, new in COMMANDS.items():
        yield [old, *NEEDS[new]], [new, *NEEDS[new]]
    for (cmd, old), new in SUBCOMMANDS.items():
        yield [cmd, old, *NEEDS[f"{cmd} {new}"]], [cmd, new, *NEEDS[f"{cmd} {new}"]]
    for cmd, flags in FLAGS.items():
        for old, new in flags.items():
            if isinstance(new, tuple):
                yield [cmd, old, *NEEDS[cmd]], [cmd, *new, *NEEDS[cmd]]
            else:
                value = "3" if "epochs" in new else "0.5"  # a value the flag takes
                yield [cmd, old, value, *NEEDS[cmd]], [cmd, new, value, *NEEDS[cmd]]
                yield [cmd, f"{old}={value}", *NEEDS[cmd]], [cmd, f"{new}={value}", *NEEDS[cmd]]


@pytest.mark.parametrize("old,new", list(_cases()), ids=lambda argv: " ".join(argv))
def test_each_old_spelling_parses_as_its_new_one_and_says_so(old, new):
    parser = build_parser()
    translated, notes = translate(old)
    assert vars(parser.parse_args(translated)) == vars(parser.parse_args(new))
    assert len(notes) == 1 and "old spelling" in notes[0] and "goes in the next release" in notes[0]
    assert translate(new) == (new, [])  # today's spelling passes untouched


def test_the_table_lists_every_old_spelling_once():
    rows = table()
    assert len(rows) == len(COMMANDS) + len(SUBCOMMANDS) + sum(map(len, FLAGS.values()))
    assert len({old for old, _ in rows}) == len(rows)
    assert ("lofit-ray select --lr", "lofit-ray select --phase1-lr") in rows


def test_an_old_spelling_runs_end_to_end(tmp_path, capsys):
    """`select --random --split ...` (the old spellings) still writes a random ranking, with a line for each."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(4)))
    assert main(["select", "--model", "tiny-llama", "--task", "jsonl", "--split", str(rows), "--random",
                 "--out", str(tmp_path / "r.json")]) == 0
    err = capsys.readouterr().err
    assert "use `select --train-split`" in err and "use `select --selector random`" in err
    assert json.loads((tmp_path / "r.json").read_text())["method"] == "random"


def test_arguments_after_a_double_dash_are_left_alone():
    assert translate(["select", "--", "--lr"]) == (["select", "--", "--lr"], [])
