"""A benchmark's own section of a Markdown file: written between its begin and end markers,
the rest of the file kept as it is (``--write-docs`` of shards.py, scale.py, scheduler.py and
memory.py)."""

from __future__ import annotations

import os
import platform
import shlex
import time
from pathlib import Path


def replace(path: Path, begin: str, end: str, block: str, *, new_file_head: str = "") -> None:
    """Put ``block`` (which starts with ``begin`` and ends with ``end``) where the section is in
    ``path``, or at the end of it; a file that does not exist starts with ``new_file_head``."""
    text = path.read_text() if path.exists() else ""
    start, stop = text.find(begin), text.find(end)
    if 0 <= start < stop:
        text = text[:start] + block + text[stop + len(end):]
    else:
        text = (text.rstrip("\n") + "\n\n" if text else new_file_head) + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def write(path: Path, begin: str, end: str, heading: str, note: str, script: str,
          argv: list[str], lines: list[str]) -> None:
    """The section of ``script``'s figures: heading, note, when, how and where it ran, then the
    figures as printed."""
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text()
                .splitlines() if ln.startswith("model name")), "?")
    block = "\n".join([
        begin, heading, "", note, "",
        f"* date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
        f"* command: `{shlex.join(['python', script, *argv])}`",
        f"* machine: nproc {len(os.sched_getaffinity(0))}, {cpu}, {platform.system()} "
        f"{platform.release()}, load average {os.getloadavg()[0]:.2f}",
        "", "```", *lines, "```", end])
    replace(path, begin, end, block)
