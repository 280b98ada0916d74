"""Run the training programs emitted beforehand (bench/prepare_gpu_checks.py) on the GPU machine
with nccl and fixed steps, and write tokens/s, MFU, loss curves and the bf16-vs-fp32 loss
agreement into one folder. Needs torch and the standard library only; bench/gpu_train_check.sh
is the one command that runs it.

Two-rank strategies need two GPUs: planc's program puts rank r on cuda:r (one device per
process, as torchrun's LOCAL_RANK says), and NCCL refuses two ranks on one device ("Duplicate
GPU detected"). On a one-GPU machine the check first tries two nccl ranks on cuda:0 and records
what NCCL answered; then DDP and FSDP run as one rank (nccl, the same programs), and tensor
and pipeline parallelism, which need two ranks, are skipped, with that reason in the summary.
Without CUDA (the CPU smoke test) every program runs with its plan's ranks over gloo.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_programs import PROGRAMS, loss_agreement, run_all  # noqa: E402

#: A two-rank nccl all-reduce with both ranks on cuda:0: does this NCCL allow it?
_PROBE = textwrap.dedent("""
    import torch, torch.distributed as dist
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", device_id=torch.device("cuda", 0))
    x = torch.ones(1, device="cuda")
    dist.all_reduce(x)
    torch.cuda.synchronize()
    print("two ranks on one GPU: all_reduce gave", x.item())
    dist.destroy_process_group()
""")


def probe_two_ranks_on_one_gpu(python: str) -> tuple[bool, str]:
    """Run the probe with torchrun; (allowed, the last lines it printed)."""
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "two_ranks_probe.py"
        script.write_text(_PROBE)
        try:
            done = subprocess.run([python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                                   str(script)], capture_output=True, text=True, timeout=90)
            output, code = done.stdout + done.stderr, done.returncode
        except subprocess.TimeoutExpired as error:
            output, code = f"{error.stdout or ''}{error.stderr or ''}\n(timed out after 90 s)", 124
    lines = [line for line in output.splitlines() if "Duplicate GPU" in line or "all_reduce gave" in line]
    tail = "\n".join(lines[-2:] or output.strip().splitlines()[-3:])
    return code == 0, tail


def device_plan(names: list[str], gpus: int, probe: tuple[bool, str] | None) -> tuple[dict[str, int], dict[str, str]]:
    """Processes per program to run, and the programs skipped with why."""
    if gpus == 0 or gpus >= 2:
        return {n: PROGRAMS[n].ranks for n in names}, {}
    allowed, answer = probe or (False, "")
    why = ("planc's program puts rank r on cuda:r, so two ranks need two GPUs"
           + (f"; NCCL itself refused two ranks on one GPU ({answer.strip()})" if not allowed
              else "; NCCL itself allowed two ranks on one GPU in a probe"))
    runs, skipped = {}, {}
    for name in names:
        if PROGRAMS[name].strategy in ("ddp", "fsdp"):
            runs[name] = 1
        else:
            skipped[name] = f"{PROGRAMS[name].strategy} parallelism needs 2 ranks and this machine has 1 GPU: {why}"
    return runs, skipped


def write_report(results: dict, out: Path) -> None:
    """train.json (everything), loss_curves.csv (step, one loss column per program), summary.md."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.json").write_text(json.dumps(results, indent=1) + "\n")
    programs = results["programs"]
    longest = max((len(p["losses"]) for p in programs), default=0)
    rows = ["step," + ",".join(p["program"] for p in programs)]
    for i in range(longest):
        rows.append(f"{i + 1}," + ",".join(f"{p['losses'][i]:.5f}" if i < len(p["losses"]) else "" for p in programs))
    (out / "loss_curves.csv").write_text("\n".join(rows) + "\n")
    lines = [f"# GPU training check: {results['device']}, torch {results['torch']}, {results['size']}", "",
             "| program | processes | steps | first loss | last loss | tokens/s | MFU | passed |",
             "|---|---|---|---|---|---|---|---|"]
    for p in programs:
        mfu = f"{p['mfu']:.1%}" if p.get("mfu") is not None else "–"
        rate = f"{p['tokens_per_s']:.0f}" if p["tokens_per_s"] else "–"
        lines.append(f"| {p['program']} | {p['processes']} | {p['steps']} | {p['first_loss']} | {p['last_loss']} "
                     f"| {rate} | {mfu} | {'yes' if p['passed'] else 'NO'} |")
    for name, why in results["skipped"].items():
        lines.append(f"| {name} | – | – | – | – | – | – | skipped |")
    lines += [""] + [f"- {name} skipped: {why}" for name, why in results["skipped"].items()]
    if results.get("agreement"):
        a = results["agreement"]
        lines += ["", f"bf16 vs fp32 (fsdp_bf16 against fsdp_fp32, first {a['steps']} steps): max |Δloss| "
                  f"{a['max_abs_diff']:.4f}, mean {a['mean_abs_diff']:.4f}, max relative {a['max_rel_diff']:.2%}"]
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("programs", type=Path, help="the train/ folder prepare_gpu_checks.py wrote")
    parser.add_argument("out", type=Path, help="where the results go")
    parser.add_argument("--names", nargs="+", choices=sorted(PROGRAMS), default=list(PROGRAMS))
    parser.add_argument("--timeout", type=float, default=150, help="seconds per program")
    args = parser.parse_args()
    size = json.loads((args.programs / "size.json").read_text())["size"]
    gpus = torch.cuda.device_count()
    device = torch.cuda.get_device_name(0) if gpus else "CPU (gloo)"
    print(f"{device} x {gpus or 1}, torch {torch.__version__}, programs of size {size}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    probe = probe_two_ranks_on_one_gpu(sys.executable) if gpus == 1 else None
    if probe is not None:
        print(f"two nccl ranks on one GPU: {'allowed' if probe[0] else 'refused'}: {probe[1]}", flush=True)
    runs, skipped = device_plan(args.names, gpus, probe)
    for name, why in skipped.items():
        print(f"{name}: skipped: {why}", flush=True)
    results = run_all(args.programs, list(runs), sys.executable, runs, size, args.timeout, gpus=gpus)
    results.update(device=f"{device} x {gpus or 1}", gpus=gpus, skipped=skipped,
                   two_ranks_on_one_gpu=None if probe is None else {"allowed": probe[0], "answer": probe[1]})
    losses = {p["program"]: p["losses"] for p in results["programs"]}
    if losses.get("fsdp_fp32") and losses.get("fsdp_bf16"):
        results["agreement"] = loss_agreement(losses["fsdp_fp32"], losses["fsdp_bf16"], 100)
    write_report(results, args.out)
    print((args.out / "summary.md").read_text(), flush=True)
    sys.exit(0 if all(p["passed"] for p in results["programs"]) else 1)


if __name__ == "__main__":
    os.environ.setdefault("NCCL_DEBUG", "WARN")
    main()
