"""One command per stage: `python -m attnbench <stage> ...` (or `attnbench <stage>`).

Snakemake and DVC call exactly these commands with explicit paths; run by hand,
the paths default to the layout under results/<run.name>/ and reports/<run.name>/.
Every failure ends in one line on stderr: `attnbench <stage>: error: <what>`.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import signal
import sys
from pathlib import Path

from .signals import Terminated, reports_interruption, sigterm_raises


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnbench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")

    def stage(name: str, help: str, variant: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("--params", default="params.yaml", type=Path, help="params file (default: params.yaml)")
        if variant:
            p.add_argument("--variant", required=True, help="an entry of the params file's `variants`: a variant, or <variant>-seed<N>")
        return p

    stage("check", "validate the params file against the schema (every stage does so first; this does only that)")
    p = stage("fetch", "download/copy the raw corpus and verify it")
    p.add_argument("--out", type=Path, help="corpus file (default: results/<run>/data/corpus.bin)")
    p = stage("prepare", "split the corpus into train/val/test uint8 arrays + manifest")
    p.add_argument("--corpus", type=Path, help="default: results/<run>/data/corpus.bin")
    p.add_argument("--out", type=Path, help="default: results/<run>/data/prepared")
    for name, help in [("train", "train one variant"), ("evaluate", "test bits-per-byte of a trained variant")]:
        p = stage(name, help, variant=True)
        p.add_argument("--data", type=Path, help="prepared data folder (default: results/<run>/data/prepared)")
        p.add_argument("--out", type=Path, help="the variant's folder (default: results/<run>/variants/<variant>)")
    p = stage("sources", "the files one variant runs, with their digests (sources.json)", variant=True)
    p.add_argument("--out", type=Path, help="the variant's folder (default: results/<run>/variants/<variant>)")
    p = stage("profile", "time and memory of one variant against T", variant=True)
    p.add_argument("--out", type=Path, help="the variant's folder (default: results/<run>/variants/<variant>)")
    p = stage("report", "compare all variants: markdown + figures")
    p.add_argument("--variants-dir", type=Path, help="the variants' folders (default: results/<run>/variants)")
    p.add_argument("--data", type=Path, help="default: results/<run>/data/prepared")
    p.add_argument("--out", type=Path, help="default: reports/<run>")
    p.add_argument("--variants", nargs="+", help="a subset of the params file's variants (default: all), for a report of the "
                   "runs that finished; the page names the ones left out")
    p = stage("import-runs", "copy this params file's MLflow runs from another store (a GPU machine's) into the configured one")
    p.add_argument("--from", dest="source", required=True, help="tracking URI of the source store, e.g. sqlite:///gpu/mlflow.db")
    p = stage("benchmark", "GPU only: attention kernels and training steps of every variant vs T, against fused sdpa, as the params "
              "file's benchmark section says (the flags below override it)")
    p.add_argument("--out", type=Path, help="default: reports/benchmarks/<run.name>, where the pipeline's benchmark target writes "
                   "(the pages beside it, reports/benchmarks/<device>.md, are the committed record and no run writes them)")
    # Each flag overrides the params file's benchmark section (config.BenchmarkConfig: defaults and meaning).
    p.add_argument("--seq-lens", type=int, nargs="+", help="T of the attention rows")
    p.add_argument("--tokens", type=int, help="tokens per timed step (attention batch = tokens // T)")
    p.add_argument("--heads", type=int)
    p.add_argument("--head-dim", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--warmup-seconds", type=float)
    p.add_argument("--repeats", type=int)
    p.add_argument("--sample-seconds", type=float)
    p.add_argument("--variants", nargs="+", help="default: the params file's variants")
    p.add_argument("--parts", nargs="+", help="attention, train")
    p.add_argument("--modes", nargs="+", help="the variants' attention rows: eager, compiled (torch.compile), graphs (compiled as "
                   "CUDA graphs, reduce-overhead: the kernels without the host's launch time)")
    p.add_argument("--train-sizes", nargs="+", metavar="DxL",
                   help="more model sizes for the training rows, d_model x layers (heads of --head-dim), e.g. 768x12")
    p.add_argument("--trace", action="store_true", help="also write <device>-kernels.md: each point's GPU kernels by device time")
    return parser


def run(args: argparse.Namespace) -> None:
    from . import data
    from .config import BenchmarkConfig, load_params

    params = load_params(args.params)
    results = params.results_dir
    prepared = results / "data" / "prepared"
    if args.stage == "check":
        logging.info("%s: valid; run %s (results in %s), %d entries of variants: %s", args.params, params.run.name, results,
                     len(params.variants), ", ".join(params.variants))
        # Not an error: a corpus already fetched needs no source, and only fetch reads it.
        if missing := data.missing_local_source(params.data):
            logging.warning("%s: %s; the fetch stage reads it (put the text there, or point data.path at yours)",
                            args.params, missing)
    elif args.stage == "fetch":
        out = args.out or results / "data" / "corpus.bin"
        from .tracking import stage_run

        with stage_run(params, "fetch") as tracker:
            summary = data.fetch(params.data, out, download_dir=out.parent / "download")
            tracker.log_params({"data": params.data.model_dump()})
            tracker.log_metrics({"corpus_bytes": summary["bytes"]})
        logging.info("%s bytes from %s (md5 %s) -> %s", f"{summary['bytes']:,}", summary["origin"], summary["md5"], out)
    elif args.stage == "prepare":
        from .tracking import stage_run

        corpus, out = args.corpus or results / "data" / "corpus.bin", args.out or prepared
        with stage_run(params, "prepare") as tracker:
            manifest = data.prepare(corpus, out, params.data.max_bytes, params.data.splits)
            tracker.log_params({"max_bytes": params.data.max_bytes, "splits": params.data.splits.model_dump()})
            tracker.log_metrics({f"{k}_bytes": v["bytes"] for k, v in manifest["splits"].items()})
        sizes = ", ".join(f"{k} {v['bytes']:,}" for k, v in manifest["splits"].items())
        logging.info("%s bytes -> %s (%s)", f"{manifest['corpus_bytes_used']:,}", out, sizes)
    elif args.stage == "import-runs":
        from .tracking import import_runs

        import_runs(params, args.source)
    elif args.stage == "benchmark":
        from .benchmark import main as benchmark_main

        given = {key: getattr(args, key) for key in BenchmarkConfig.model_fields if getattr(args, key) is not None}  # a flag per key
        settings = params.benchmark_with(given)
        print(benchmark_main(params, args.out or Path("reports/benchmarks") / params.run.name, args.variants, settings, args.trace))
    elif args.stage == "report":
        from .report import main as report_main

        report_main(params, args.variants_dir or results / "variants", args.data or prepared, args.out or Path("reports") / params.run.name,
                    args.variants)
    else:
        params.variant_options(args.variant)  # a clear error for a variant this params file does not configure
        out = args.out or results / "variants" / args.variant
        if args.stage == "sources":
            from .sources import write_manifest

            manifest, written = write_manifest(args.variant, out / "sources.json")
            state = "->" if written else "unchanged in"
            logging.info("%d files of %s %s %s", len(manifest["files"]), args.variant, state, out / "sources.json")
        elif args.stage == "train":
            from .train import main as train_main

            train_main(params, args.variant, args.data or prepared, out)
        else:
            from .gpu_slots import gpu_slots

            with gpu_slots(params.train.gpus(1)):  # a free GPU of this host, per job
                if args.stage == "evaluate":
                    from .evaluate import main as evaluate_main

                    evaluate_main(params, args.variant, args.data or prepared, out)
                else:
                    from .profile import main as profile_main

                    profile_main(params, args.variant, out)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s attnbench {args.stage}: %(message)s", datefmt="%H:%M:%S", force=True)
    for noisy in ("mlflow", "alembic", "filelock", "git"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.ERROR)  # its "Retrying" lines: tracking's one warning says it
    try:
        with sigterm_raises():
            run(args)
    except KeyboardInterrupt as err:
        signum = signal.SIGTERM if isinstance(err, Terminated) else signal.SIGINT
        if reports_interruption():
            print(f"attnbench {args.stage}: interrupted ({signum.name}); each output written is whole (train's checkpoint "
                  "and fetch's partial download are kept to resume from)", file=sys.stderr)
        return 128 + signum
    except Exception as err:  # one line for the user; the traceback only when asked for
        if os.environ.get("ATTNBENCH_DEBUG"):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"attnbench {args.stage}: error: {message} (ATTNBENCH_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2 if type(err).__name__ == "ConfigError" else 1
    return 0


def entry() -> int:
    """The process's entry (`python -m attnbench`, the `attnbench` script): main with faulthandler on, so a crash in
    native code (a segfault) prints each thread's Python stack, where the stage died. Not in main, which tests call
    in-process, where stderr may be a capture without a file descriptor."""
    faulthandler.enable()
    return main()
