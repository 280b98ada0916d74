"""What planc runs with: package versions, the CPU target, ONNX Runtime's providers.

`planc --version` prints the versions (read from package metadata, so nothing heavy is
imported); `planc doctor` adds the CPU and the providers, for bug reports.
"""

from __future__ import annotations

import platform
import sys
from importlib import metadata

#: Distributions whose versions decide planc's numerics and behaviour.
PACKAGES = ("torch", "onnxruntime", "onnxruntime-gpu", "transformers", "onnx", "onnxscript", "onnx-ir", "pydantic", "lark")


def version_of(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def version_line() -> str:
    """`planc X (torch A, onnxruntime B, transformers C)`: the installed ones only."""
    found = [f"{name} {version_of(name)}" for name in ("torch", "onnxruntime", "onnxruntime-gpu", "transformers") if version_of(name)]
    return f"planc {version_of('planc') or 'unknown'} ({', '.join(found) or 'no torch, onnxruntime or transformers found'})"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def doctor_lines() -> list[str]:
    """The environment, one `key: value` per line."""
    from planc.passes.cpu import int8_format

    lines = [version_line(), f"python: {sys.version.split()[0]} ({platform.platform()})"]
    lines += [f"{name}: {version_of(name) or 'not installed'}" for name in PACKAGES]
    fmt = int8_format("auto")
    lines += [f"cpu: {_cpu_model()}", f"planc cpu target (auto): {fmt.cpu}: int8 {fmt.label}", f"  because {fmt.why}"]
    try:
        import onnxruntime

        lines.append(f"onnxruntime providers: {', '.join(onnxruntime.get_available_providers())}")
    except ImportError:
        lines.append("onnxruntime providers: onnxruntime is not installed (pip install 'planc[cpu]')")
    return lines
