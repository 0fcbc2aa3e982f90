"""Write one benchmark's section of BENCHMARKS.md without touching the others.

Each benchmark owns a block delimited by ``<!-- begin: NAME -->`` / ``<!-- end: NAME -->``;
``write_section`` replaces that block (or appends it) and stamps the command, date and machine.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "BENCHMARKS.md"


def machine() -> str:
    try:
        import torch

        threads = torch.get_num_threads()
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
        tv = f"torch {torch.__version__}, {threads} threads, {gpu}"
    except Exception:  # pragma: no cover
        tv = "torch not importable"
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, {tv}"


def stamp(command: str | None = None) -> str:
    command = command or "python " + " ".join(sys.argv)
    today = _dt.date.today().isoformat()
    return f"Command: `{command}`  \nDate: {today}  \nMachine: {machine()}\n"


def kept_note(name: str, title: str, generated_from: str, benchmarks: Path = BENCHMARKS) -> str:
    """The hand-written analysis between section ``name``'s ``title`` and its generated part (which starts at
    the text ``generated_from``): what a re-render keeps when no new note replaces it ("" if absent)."""
    text = benchmarks.read_text() if benchmarks.exists() else ""
    begin, end = f"<!-- begin: {name} -->", f"<!-- end: {name} -->"
    block = text.split(begin, 1)[1].split(end, 1)[0] if begin in text else ""
    if generated_from not in block:
        return ""
    return block.split(generated_from, 1)[0].strip().removeprefix(title).strip()


def write_section(name: str, markdown: str, command: str | None = None) -> None:
    begin, end = f"<!-- begin: {name} -->", f"<!-- end: {name} -->"
    block = f"{begin}\n{markdown.rstrip()}\n\n{stamp(command)}{end}"
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n\nEvery number here was measured by the script named in its section.\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    tmp = BENCHMARKS.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, BENCHMARKS)
