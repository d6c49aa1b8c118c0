"""What a user reads when a command goes wrong: short parser errors with a "did you mean",
one-line explanations, and Lightning's noise filtered out."""

from __future__ import annotations

import difflib
import logging
import re
import sys
import warnings
from typing import NoReturn

import torch
from lightning.pytorch.cli import LightningArgumentParser
from lightning.pytorch.utilities.exceptions import MisconfigurationException


class MedQAParser(LightningArgumentParser):
    """Lightning's parser, with short errors in medqa's own form (`medqa fit: error: ...`,
    exit status 2): the message, a "did you mean" for a mistyped option or command, and where
    the help is (not the 120 lines of usage)."""

    commands: tuple[str, ...] = ()  # every medqa command, for a mistyped one (set by medqa.cli)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        options = [o for action in parser._actions for o in action.option_strings if o.startswith("--")]
        hints = []
        for typo in re.findall(r"(--[\w.\-]+)", message.split("\n")[0]):
            close = difflib.get_close_matches(typo, options, n=3, cutoff=0.75)
            if close and typo not in options:
                hints.append(f"{typo}: did you mean {' or '.join(close)}?")
        if (command := re.search(r"invalid choice: '([^']*)'", message)) and self.commands:
            message = f"no command {command.group(1)!r}; the commands are {', '.join(self.commands)}"
            close = difflib.get_close_matches(command.group(1), self.commands, n=1, cutoff=0.6)
            hints += [f"did you mean {' or '.join(close)}?"] if close else []
        prog = parser.prog.replace("__main__.py", "python -m medqa").replace(" [options]", "")
        sys.stderr.write(f"{prog.replace('python -m ', '')}: error: {short(message)}\n" + "".join(f"  {h}\n" for h in hints)
                         + f"  (all options: {prog} --help)\n")
        self.exit(2)


def short(message: str) -> str:
    """jsonargparse's type errors in one line: the option, the value given and the types it
    takes (its own message nests every union member tried, 10 lines for a mistyped number)."""
    keys = re.findall(r'Parser key "([^"]+)"', message)
    given = (re.search(r"Given value: (.*?)(?:\. Got value:|$)", message, re.MULTILINE)
             or re.search(r"Got value: (.*)$", message, re.MULTILINE))  # a type alone, not a union
    expected = []
    for literal, kind in re.findall(r"Expected an? (?:typing\.Literal\[([^\]]*)\]|<class '(\w+)'>)", message):
        names = re.findall(r"'([^']*)'", literal) if literal else {"NoneType": ["null"], "bool": ["true", "false"]}.get(kind, [kind])
        expected += [n for n in names if n not in expected]
    if keys and given:
        where = keys[0] + "".join(f" -> {k}" for k in keys[1:])
        takes = ", ".join(expected[:-1]) + f" or {expected[-1]}" if len(expected) > 1 else "".join(expected)
        return f"--{where}: {given.group(1)!r} is not {takes or 'a value this option takes'}"
    return message.strip().split("\n")[0]


def explain(error: BaseException) -> str:
    """An error's message, with what to do where Lightning's own message does not say."""
    message = str(error).strip()
    if isinstance(error, MisconfigurationException) and "gpu" in message.lower() and not torch.cuda.is_available():
        message += (" This configuration asks for a GPU (trainer.accelerator: gpu) and none is visible here. "
                    "To try medqa on this machine: python -m medqa fit --config configs/demo.yaml (CPU, minutes).")
    return message


class _Drop(logging.Filter):
    """Drops the records whose message holds `text`."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def _drop(logger: logging.Logger, text: str) -> None:
    """Filter `text` out of `logger`, once however often a process runs commands (cv, tests)."""
    if not any(isinstance(f, _Drop) and f.text == text for f in logger.filters):
        logger.addFilter(_Drop(text))


def quiet(command: str) -> None:
    """Filter noise users cannot act on; real warnings stay."""
    from lightning_utilities.core import rank_zero

    _drop(rank_zero.log, "💡 Tip")  # the logger rank_zero_info writes to (Lightning sets which)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")  # Lightning on torch 2.13
    # bitsandbytes, imported by peft on a CPU with AVX-512 BF16, asks for a package medqa does not use
    _drop(logging.getLogger("bitsandbytes.backends.cpu.ops"), "kernels-community")
    if command != "fit":  # test / predict from a training checkpoint never write checkpoints
        warnings.filterwarnings("ignore", message="The dirpath has changed from")
