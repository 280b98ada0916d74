"""A benchmark's results file: a markdown table and its json twin, both headed by where the
figures came from (the command, the git revision, the CPU and its kernel-relevant flags, the
library versions), so that a figure quoted in the README can be traced to the run that produced
it and rerun.

A script adds its output options with `add_output_args` (`--out` the markdown file, default
`bench/results/NAME.md`; `--json` its twin, default the same path with `.json`) and writes both
with `write`.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
#: CPU flags that decide which kernels ONNX Runtime and torch pick (integer dot products above all:
#: u8 x s8 sums are exact with VNNI and saturate on AVX2 without it).
KERNEL_FLAGS = {"x86_64": ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8"),
                "aarch64": ("asimd", "asimddp", "i8mm", "sve", "bf16")}
_VERSIONS = ("torch", "onnxruntime", "transformers")


def add_output_args(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--out", type=Path, default=RESULTS / f"{name}.md", help="the markdown results file (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="its json twin (default: --out with .json)")


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """How to rerun this measurement from the repository root."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    return shlex.join(["python", f"bench/{Path(script).name}", *arguments])


def cpu() -> dict:
    """The CPU's model name, core count and which of its architecture's `KERNEL_FLAGS` it has."""
    wanted = KERNEL_FLAGS.get(platform.machine(), ())
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model == (platform.processor() or "unknown CPU"):
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "machine": platform.machine(), "cores": os.cpu_count(),
            "flags": [f for f in wanted if f in flags], "flags_absent": [f for f in wanted if f not in flags]}


def revision() -> str:
    """The short git revision, marked when tracked files differ from it."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + (" (with uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else "")


def provenance(script: str, argv: Sequence[str] | None) -> dict:
    versions = {"python": platform.python_version()}
    for package in _VERSIONS:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {"command": command_line(script, argv), "revision": revision(), "cpu": cpu(), "versions": versions,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def table(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table; the first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write(args: argparse.Namespace, title: str, source: dict, protocol: str, body: str, results: dict) -> Path:
    """Write `args.out` (markdown: header, protocol, body) and its json twin; returns the markdown path."""
    machine = source["cpu"]
    header = [
        f"# {title}", "", f"    {source['command']}", "",
        f"- revision: {source['revision']}",
        f"- CPU: {machine['model']} ({machine['machine']}), {machine['cores']} cores; flags: {' '.join(machine['flags']) or 'none of interest'}"
        + (f" (absent: {' '.join(machine['flags_absent'])})" if machine["flags_absent"] else ""),
        "- versions: " + ", ".join(f"{name} {version}" for name, version in source["versions"].items()),
        f"- date: {source['date']}",
        f"- protocol: {protocol}", "",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(header) + "\n" + body.rstrip() + "\n", encoding="utf-8")
    twin = Path(args.json) if args.json else out.with_suffix(".json")
    twin.write_text(json.dumps({"title": title, **source, "protocol": protocol, **results}, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out} and {twin}")
    return out


def interleaved_protocol(rounds: int, threads: int) -> str:
    """The protocol of `planc.backends.onnx.timing.interleaved_medians`, in words."""
    return (f"{threads} threads; every ONNX Runtime session with `session.intra_op.allow_spinning = 0`; "
            f"variants interleaved in a freshly shuffled order every round, median of {rounds} rounds "
            f"(after warm-up runs); ratios come from the same run")


def header_lines(command: str) -> str:
    """The provenance header of a results file whose body a script printed (`tee`d by
    `bench/readme_figures.sh` for benches that print their tables)."""
    source = provenance(command.split()[1] if command.startswith("python ") else command, [])
    machine = source["cpu"]
    return "\n".join([
        f"    {command}", "",
        f"- revision: {source['revision']}",
        f"- CPU: {machine['model']} ({machine['machine']}), {machine['cores']} cores; flags: {' '.join(machine['flags']) or 'none of interest'}",
        "- versions: " + ", ".join(f"{name} {version}" for name, version in source["versions"].items()),
        f"- date: {source['date']}", "", ""])


if __name__ == "__main__":  # python bench/results_file.py "COMMAND": print the header for COMMAND
    print(header_lines(sys.argv[1]), end="")
