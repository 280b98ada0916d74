"""The `planc` command line.

Exit codes: 0 success, 1 the plan (or an input) is wrong, 2 the command line is wrong,
3 planc itself failed (a bug: rerun with --debug for the traceback). No input prints a
Python traceback unless --debug is given.

`check`, `fmt`, `schema` and `explain` never import torch, so they answer in a blink.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from planc.dsl.source import Diagnostic, PlanError, Source

EXIT_PLAN, EXIT_USAGE, EXIT_INTERNAL = 1, 2, 3


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # usage errors exit 2, without a traceback
        self.print_usage(sys.stderr)
        print(f"planc: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def render(diagnostics: list[Diagnostic], sources: dict[str, Source] | None = None) -> str:
    """All diagnostics, each with its source line, in file order."""
    sources = dict(sources or {})
    rendered = []
    for diagnostic in diagnostics:
        name = diagnostic.span.file
        if name not in sources and Path(name).is_file():
            try:
                sources[name] = Source(name, Path(name).read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError):
                pass
        rendered.append(diagnostic.render(sources.get(name)))
    return "\n".join(rendered)


# ----------------------------------------------------------------------------- commands


def cmd_check(args: argparse.Namespace) -> int:
    from planc.compiler.validate import check_file

    failed = 0
    for path in args.files:
        checked = check_file(path)
        if checked.diagnostics:
            print(render(checked.diagnostics, checked.sources), file=sys.stderr)
        errors = sum(d.severity == "error" for d in checked.diagnostics)
        failed += errors > 0
        if not args.quiet:
            print(f"{path}: {'ok' if not errors else f'{errors} error(s)'}")
    return EXIT_PLAN if failed else 0


def cmd_fmt(args: argparse.Namespace) -> int:
    from planc.compiler.publish import write_text
    from planc.dsl.format import format_document
    from planc.dsl.parser import parse_file

    changed, broken = [], 0
    for path in map(Path, args.files):
        try:
            document = parse_file(path)
        except PlanError as error:
            print(render(error.diagnostics), file=sys.stderr)
            broken += 1
            continue
        formatted = format_document(document)
        if formatted != document.source.text:
            changed.append(path)
            if not args.check:
                write_text(path, formatted)
    verb = "would reformat" if args.check else "reformatted"
    for path in changed:
        print(f"{verb} {path}")
    if broken or (args.check and changed):
        return EXIT_PLAN
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from planc.compiler.targets import target_kinds
    from planc.passes.options import pass_options

    schema = {
        "$comment": "planc plan options: each pass and target block is validated against these schemas",
        "passes": {name: model.model_json_schema() for name, model in pass_options().items()},
        "targets": {name: kind.options.model_json_schema() for name, kind in target_kinds().items()},
    }
    print(json.dumps(schema, indent=2))
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from planc.compiler.explain import explain, target_notes
    from planc.compiler.footprint import plan_footprint
    from planc.compiler.validate import load_plan

    plan, _ = load_plan(args.file)
    records = None
    if args.passes:  # a `fallback = int8` step is searched first, so the plan printed is the one run
        from planc.compiler.driver import capture_model, make_job, resolve_fallback, run_pipeline

        plan, _ = resolve_fallback(plan, make_job(plan, Path(".")))
        with _console().status("capturing the model and running the passes"):
            _, records, _ = run_pipeline(plan, capture_model(plan))
    print(explain(plan), end="")
    for line in target_notes(plan):
        print(line)
    footprint = plan_footprint(plan)
    if footprint is not None:
        fits = "fits" if footprint.fits else "does NOT fit: `planc compile` will refuse it"
        print(f"# compile: {footprint.describe()}; {fits}")
    if records is not None:
        _print_records(records)
    return 0


def _compact(count: int) -> str:
    """A count in three significant digits and a unit (12.3M), so the size columns stay narrow."""
    for unit in ("", "k", "M", "G"):
        if abs(count) < 1000:
            return f"{count:.3g}{unit}" if unit else str(count)
        count /= 1000
    return f"{count:.3g}T"


def records_table(records: list, width: int):
    """The pass table in `width` columns, one line per pass: the summary is cut with an
    ellipsis where the terminal is narrow (the full summary is in the report's `passes`)."""
    from rich.table import Table

    header = ("pass", "summary", "nodes", "params", "bytes")
    rows = [
        [
            record.name,
            record.summary,
            f"{record.before.nodes} -> {record.after.nodes}",
            f"{_compact(record.before.params)} -> {_compact(record.after.params)}",
            f"{_compact(record.before.bytes)}B -> {_compact(record.after.bytes)}B",
        ]
        for record in records
    ]
    widths = [max([len(name)] + [len(row[i]) for row in rows]) for i, name in enumerate(header)]
    room = max(len("summary"), width - (sum(widths) - widths[1]) - 3 * len(header) - 1)  # "│ x " per column, "│"
    table = Table(title="passes")
    for i, name in enumerate(header):
        table.add_column(name, no_wrap=True, justify="right" if i > 1 else "left",
                         min_width=min(widths[i], room) if i == 1 else widths[i], max_width=room if i == 1 else None)
    for row in rows:
        if len(row[1]) > room:
            row[1] = row[1][: room - 1] + "…"
        table.add_row(*row)
    return table


def _print_records(records: list) -> None:
    from rich.console import Console

    console = Console()
    console.print(records_table(records, console.width))


def cmd_compile(args: argparse.Namespace) -> int:
    from planc.compiler.driver import compile_plan

    console = _console()
    with console.status("compiling") as status:
        result = compile_plan(args.file, args.output, emit=args.emit, progress=lambda m: status.update(m))
    if result.text is not None:
        print(result.text, end="" if result.text.endswith("\n") else "\n")
        return 0
    if result.records:
        _print_records(result.records)
    _print_sweep(result.report)
    if set(result.report) - {"sweep"}:
        _print_report(result.report)
    console.print(f"[green]wrote[/] {result.artifact}")
    return 0


def _print_sweep(report: dict) -> None:
    """A `target train { sweep { } }`'s trials, the chosen one marked (backends/train/sweep.py)."""
    sweep = report.get("sweep")
    if sweep:
        files = "sweep.json, sweep.txt" + (", sweep.png" if "plot" in sweep else "")
        folder = Path(sweep["trials"][0]["directory"]).parent
        _console().print(f"{sweep['table']}\n({files} in {folder})", markup=False, highlight=False)


def _print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="artifact")
    table.add_column("measure")
    table.add_column("value")
    sizes, latency, accuracy = report.get("size_bytes", {}), report.get("latency_ms", {}), report.get("accuracy", {})
    if sizes:
        table.add_row("size (original -> optimized)", f"{sizes.get('original', 0):,} -> {sizes.get('optimized', 0):,} bytes")
    if latency:
        table.add_row("latency (eager -> optimized)", f"{latency.get('original_eager', 0):.2f} -> {latency.get('optimized', 0):.2f} ms")
    if accuracy:
        from planc.compiler.present import accuracy_words

        against = ", vs original model" if "fidelity" in accuracy else ""
        table.add_row(f"accuracy ({accuracy.get('metric')}{against})", accuracy_words(accuracy))
        if "fidelity" in accuracy:
            table.add_row("export fidelity (vs rewritten model)", f"{accuracy['fidelity']['value']:.4g} (not judged)")
    if "decode_tokens_per_s" in report:
        table.add_row("decode (batch 1)", f"{report['decode_tokens_per_s']:,.0f} tokens/s")
    for batch, figures in report.get("speculative", {}).get("batches", {}).items():
        table.add_row(f"speculative, batch {batch}", f"accepts {figures['acceptance_rate']:.0%}, "
                      f"{figures['plain_tokens_per_s']:.0f} -> {figures['speculative_tokens_per_s']:.0f} tokens/s")
    if "memory" in report:
        memory = report["memory"]
        table.add_row("peak memory (measured / predicted)",
                      f"{memory['measured_peak_bytes'] / 1e9:.1f} / {memory['predicted_peak_bytes'] / 1e9:.1f} GB")
    table.add_row("provider", str(report.get("provider")))
    Console().print(table)


def cmd_doctor(args: argparse.Namespace) -> int:
    from planc.compiler.environment import doctor_lines

    print("\n".join(doctor_lines()))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    if (directory / "decoder.json").is_file():  # a decoder with a key/value cache: its next tokens
        from planc.backends.onnx.decoder.generate import generate_cli

        generate_cli(directory, args.input, max_new_tokens=args.max_new_tokens)
        return 0
    from planc.backends.onnx.artifact import detokenizer, load_report, run_artifact
    from planc.compiler import present

    if args.output and Path(args.output).suffix not in present.OUTPUT_SUFFIXES:
        raise _UsageError(f"--output must end in {' or '.join(present.OUTPUT_SUFFIXES)}, got {args.output!r}")
    task = load_report(directory).get("task")
    outputs = run_artifact(directory, args.input)
    if task == "encoder":
        lines = present.encoder_lines(args.input, outputs["sentence_embedding"])
        main_output = "sentence_embedding"
    elif "next_token_logits" in outputs:
        lines = present.next_token_lines(args.input, outputs["next_token_logits"], detokenizer(directory))
        main_output = next(iter(outputs))
    else:
        lines = [f"{name}: shape {list(array.shape)}, dtype {array.dtype}" for name, array in outputs.items()]
        main_output = next(iter(outputs))
    print("\n".join(lines))
    if args.output:
        present.write_outputs(Path(args.output), outputs, main_output)
        print(f"wrote {args.output}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from planc.backends.onnx.artifact import bench_rows

    targets = [Path(t) for t in args.target]
    if any(t.suffix == ".plan" for t in targets):
        if len(targets) > 1:
            raise _UsageError("bench takes one plan, or several artifact directories")
        import tempfile

        from planc.compiler.driver import compile_plan

        with tempfile.TemporaryDirectory(prefix="planc-bench-") as scratch:
            with _console().status("compiling"):
                result = compile_plan(targets[0], Path(scratch) / "artifact", emit="onnx")
            rows = bench_rows(result.artifact, runs=args.runs)
    else:
        rows = bench_rows(targets, runs=args.runs)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from planc.compiler.present import bench_lines

    first = rows[0]
    print(f"{first['batch']} x {first['seq']} tokens, {first['threads']} threads, median of {args.runs} interleaved runs")
    print("\n".join(bench_lines(rows)))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from planc.backends.onnx.decoder.generate import generate_cli

    prompts = list(args.prompt or [])
    if args.batch_file:
        prompts += [line.rstrip("\n") for line in Path(args.batch_file).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise _UsageError("give at least one --prompt or a --batch-file")
    if args.draft is not None and args.temperature:
        raise _UsageError("--draft speculates greedily: drop --temperature")
    if args.draft_tokens < 1:
        raise _UsageError(f"--draft-tokens must be >= 1, got {args.draft_tokens}")
    try:
        generate_cli(
            Path(args.dir), prompts, max_new_tokens=args.max_new_tokens, strategy="sample" if args.temperature else "greedy",
            temperature=args.temperature or 1.0, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
            draft=args.draft, draft_tokens=args.draft_tokens,
        )
    except ValueError as error:  # a prompt too long for the model, a draft of another tokenizer: input errors
        raise _UsageError(str(error)) from error
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from planc.backends.train.launch import launch
    from planc.compiler.driver import compile_plan

    output = Path(args.output or Path(args.file).with_suffix("").name + "-train")
    with _console().status("compiling the training program"):
        result = compile_plan(args.file, output, emit="train")
    _print_sweep(result.report)
    _console().print(f"[green]wrote[/] {result.artifact}; launching torchrun")
    return launch(result.artifact)


class _UsageError(Exception):
    pass


class _Version(argparse.Action):
    """`--version`: the versions are read only when asked for (package metadata, no imports)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from planc.compiler.environment import version_line

        print(version_line())
        parser.exit()


# ----------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="planc", description="Compile optimization plans for PyTorch language models.")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks for internal errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each stage does")
    parser.add_argument("--version", action=_Version, help="print planc's version and those of torch, onnxruntime, transformers")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    check = commands.add_parser("check", help="validate plans (fast; does not load torch)")
    check.add_argument("files", nargs="+")
    check.add_argument("-q", "--quiet", action="store_true", help="print only diagnostics")
    check.set_defaults(run=cmd_check)

    fmt = commands.add_parser("fmt", help="rewrite plans in canonical layout")
    fmt.add_argument("files", nargs="+")
    fmt.add_argument("--check", action="store_true", help="only report files that would change (exit 1 if any)")
    fmt.set_defaults(run=cmd_fmt)

    schema = commands.add_parser("schema", help="print the JSON schema of pass and target options")
    schema.set_defaults(run=cmd_schema)

    explain = commands.add_parser("explain", help="print the resolved plan with every default filled in")
    explain.add_argument("file")
    explain.add_argument("--passes", action="store_true", help="also run the passes and print their report")
    explain.set_defaults(run=cmd_explain)

    compile_ = commands.add_parser("compile", help="compile a plan into an ONNX model or a training program")
    compile_.add_argument("file")
    compile_.add_argument("-o", "--output", help="artifact directory (written atomically)")
    compile_.add_argument("--emit", help="stop after a stage and print it: ast, ir, resolved, fx, fx-after:<pass>; or build only one target kind (onnx, train)")
    compile_.set_defaults(run=cmd_compile)

    run = commands.add_parser("run", help="run an ONNX artifact on text inputs")
    run.add_argument("dir")
    run.add_argument("--input", nargs="+", required=True, help="input texts (tokenized with the model's tokenizer)")
    run.add_argument("-o", "--output", help="also write the full tensors: FILE.json (every output) or FILE.npy (embeddings / logits)")
    run.add_argument("--max-new-tokens", type=int, default=16, help="decoder artifacts: tokens to generate")
    run.set_defaults(run=cmd_run)

    bench = commands.add_parser("bench", help="benchmark artifact directories (timed interleaved) or a plan")
    bench.add_argument("target", nargs="+")
    bench.add_argument("--runs", type=int, default=30)
    bench.add_argument("--json", action="store_true", help="print every measured field as JSON")
    bench.set_defaults(run=cmd_bench)

    generate = commands.add_parser("generate", help="generate text with a decoder ONNX artifact")
    generate.add_argument("dir")
    generate.add_argument("--prompt", action="append")
    generate.add_argument("--batch-file")
    generate.add_argument("--max-new-tokens", type=int, default=32)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--draft", help="a smaller decoder artifact that speculates for DIR (greedy, same output)")
    generate.add_argument("--draft-tokens", type=int, default=4, help="tokens the draft proposes per round")
    generate.set_defaults(run=cmd_generate)

    doctor = commands.add_parser("doctor", help="print versions, the CPU target and ONNX Runtime's providers (for bug reports)")
    doctor.set_defaults(run=cmd_doctor)

    train = commands.add_parser("train", help="compile a plan's training program and launch it with torchrun")
    train.add_argument("file")
    train.add_argument("-o", "--output")
    train.set_defaults(run=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # torch.onnx announces every optional operator library it did not find (torchvision): noise.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    try:
        return args.run(args)
    except PlanError as error:
        print(render(error.diagnostics), file=sys.stderr)
        return EXIT_PLAN
    except _UsageError as error:
        print(f"planc: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except FileNotFoundError as error:
        print(f"planc: error: no such file: {error.filename or error}", file=sys.stderr)
        return EXIT_PLAN
    except KeyboardInterrupt:
        print("planc: interrupted; nothing was published", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the last line of defence against tracebacks
        if args.debug:
            raise
        print(f"planc: internal error: {type(error).__name__}: {error}\n(rerun with --debug for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
