"""Build, on a CPU machine with planc installed, everything the GPU checks run on a machine
without planc: the training programs of bench/train_programs.py and the ONNX artifacts of
bench/gpu_onnx_check.py, into one folder small enough to carry (the device tool carries at most
64 MiB of ignored files a call).

    python bench/prepare_gpu_checks.py [--size gpt125m|smoke] [--out bench/gpu_artifacts] [--only train|onnx]

Then, on the GPU machine (see bench/gpu_train_check.sh and bench/gpu_onnx_check.py):
    bash bench/gpu_train_check.sh bench/gpu_artifacts/train RESULTS_DIR
    python3 bench/gpu_onnx_check.py bench/gpu_artifacts/onnx --results RESULTS_DIR/onnx.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_programs import PROGRAMS, SIZES, plan_text  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GPT_FILE = REPO / "examples" / "models" / "gpt.py"
#: What one device call may carry beside the working tree.
CARRY_LIMIT = 64 * 2**20


def emit_training_programs(out: Path, size_name: str, names: list[str]) -> None:
    """Emit every program into out/NAME/, carrying the model file beside train.py so the folder
    runs anywhere (launch.sh runs from its own folder; the emitted spec names an absolute path)."""
    import planc

    size = SIZES[size_name]
    plans = out / "plans"
    plans.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(GPT_FILE, plans / "gpt.py")
    for name in names:
        plan = plans / f"{name}.plan"
        plan.write_text(plan_text(name, size, "gpt.py"))
        folder = out / name
        planc.compile(plan, out_dir=folder)
        shutil.copyfile(GPT_FILE, folder / "gpt.py")
        train = folder / "train.py"
        code = train.read_text()
        absolute = json.dumps(str((plans / "gpt.py").resolve()))
        if code.count(absolute) != 1:
            raise RuntimeError(f"{train} does not name the model file {absolute} exactly once")
        train.write_text(code.replace(absolute, json.dumps("gpt.py")))
    (out / "size.json").write_text(json.dumps({"size": size_name, "parameters": size.parameters}) + "\n")
    print(f"emitted {', '.join(names)} ({size_name}: {size.parameters / 1e6:.1f}M parameters) into {out}")


#: Room left in a call for the working tree itself (the repository's tracked files: ~2 MiB).
TREE_ALLOWANCE = 3 * 2**20


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def carry_groups(out: Path) -> list[list[Path]]:
    """The prepared folders split into device calls that each carry at most CARRY_LIMIT, every
    ONNX artifact in the same call as the reference it is checked against (first fit, largest first)."""
    units = [{out / "train"}] if (out / "train").is_dir() else []
    for manifest in sorted(out.glob("onnx/*/manifest.json")):
        reference = json.loads(manifest.read_text())["reference"]
        units.append({manifest.parent, manifest.parent.parent / reference})
    size = lambda paths: sum(folder_bytes(p) for p in paths)  # noqa: E731
    groups: list[set[Path]] = []
    for unit in sorted(units, key=size, reverse=True):
        fits = next((g for g in groups if size(g | unit) <= CARRY_LIMIT - TREE_ALLOWANCE), None)
        if fits is None:
            groups.append(set(unit))
        else:
            fits |= unit
    return [sorted(g) for g in groups]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="gpt125m")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "gpu_artifacts")
    parser.add_argument("--only", choices=["train", "onnx"], default=None)
    parser.add_argument("--programs", nargs="+", choices=sorted(PROGRAMS), default=sorted(PROGRAMS))
    args = parser.parse_args()
    if args.only in (None, "train"):
        emit_training_programs(args.out / "train", args.size, args.programs)
    if args.only in (None, "onnx"):
        from gpu_onnx_artifacts import build_onnx_artifacts

        build_onnx_artifacts(args.out / "onnx", smoke=args.size == "smoke")
    groups = carry_groups(args.out)
    for i, group in enumerate(groups, 1):
        paths = [str(p.resolve().relative_to(REPO)) if p.resolve().is_relative_to(REPO) else str(p) for p in group]
        print(f"device call {i} of {len(groups)}: carry {json.dumps(paths)} "
              f"({sum(folder_bytes(p) for p in group) / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
