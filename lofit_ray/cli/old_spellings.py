"""Spellings of the command line before its one grammar (December 2026). Each still works for one release:
`translate` rewrites it to the new spelling before parsing and says so in one line on stderr.

One table, so the docs' table of old against new spellings (docs/reference/cli.md) and the test that each old
spelling still works read the same entries.
"""
from __future__ import annotations

# old command -> new command (its flags are then read as the new command's)
COMMANDS = {"tune": "train", "lora-eval": "eval"}
# (command, old sub-command) -> new sub-command
SUBCOMMANDS = {("heads", "compare"): "overlap"}
# command -> old flag -> the new flag (a tuple: the new tokens in place of a flag that took no value)
FLAGS: dict[str, dict[str, str | tuple[str, ...]]] = {
    "select": {"--lr": "--phase1-lr", "--epochs": "--phase1-epochs", "--split": "--train-split",
               "--random": ("--selector", "random")},
    "train": {"--lr": "--phase2-lr", "--epochs": "--phase2-epochs", "--split": "--train-split"},
    "eval": {"--split": "--eval-split"},
    "lora": {"--lr": "--lora-lr", "--epochs": "--lora-epochs", "--split": "--train-split",
             "--max-grad-norm": "--lora-max-grad-norm"},
    "iti": {"--split": "--select-split", "--probe-data": "--train-split"},
}


def table() -> list[tuple[str, str]]:
    """(old, new) spellings, for the docs."""
    rows = [(f"lofit-ray {old}", f"lofit-ray {new}") for old, new in COMMANDS.items()]
    rows += [(f"lofit-ray {cmd} {old}", f"lofit-ray {cmd} {new}") for (cmd, old), new in SUBCOMMANDS.items()]
    rows += [(f"lofit-ray {cmd} {old}", f"lofit-ray {cmd} {new if isinstance(new, str) else ' '.join(new)}")
             for cmd, flags in FLAGS.items() for old, new in flags.items()]
    return rows


def translate(argv: list[str]) -> tuple[list[str], list[str]]:
    """(argv in today's spelling, one deprecation line per old spelling found in it)."""
    if not argv:
        return argv, []
    argv, notes = list(argv), []

    def note(old: str, new: str) -> None:
        notes.append(f"lofit-ray: `{old}` is an old spelling and goes in the next release; use `{new}`")

    command = argv[0]
    if command in COMMANDS:
        command = COMMANDS[command]
        note(argv[0], command)
        argv[0] = command
    if len(argv) > 1 and (command, argv[1]) in SUBCOMMANDS:
        new = SUBCOMMANDS[(command, argv[1])]
        note(f"{command} {argv[1]}", f"{command} {new}")
        argv[1] = new
    flags = FLAGS.get(command, {})
    out = argv[:1]
    for i, token in enumerate(argv[1:], start=1):
        if token == "--":  # what follows is not ours to read
            out += argv[i:]
            break
        name, eq, value = token.partition("=")
        new = flags.get(name)
        if new is None:
            out.append(token)
        elif isinstance(new, tuple):
            note(f"{command} {name}", f"{command} {' '.join(new)}")
            out += list(new)
        else:
            note(f"{command} {name}", f"{command} {new}")
            out.append(new + eq + value)
    return out, notes
