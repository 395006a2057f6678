"""Submit the compiled pipeline to a Kubeflow Pipelines cluster, once or on a schedule.

    python -m pipelines.submit --host https://kfp.example.com run \\
        --param data_repo=https://github.com/you/kiln.git --param data_rev=v2
    python -m pipelines.submit --host ... schedule --cron "0 0 3 * * *" --param data_repo=...

The host can also come from ``KFP_HOST``; authentication follows kfp.Client (for
example a ``KF_PIPELINES_SA_TOKEN_PATH`` service-account token in-cluster). The
package submitted is ``pipelines/training_pipeline.yaml`` unless ``--package`` says so.
"""

import argparse
import os
import sys
from pathlib import Path
from typing import Any

DEFAULT_PACKAGE = Path(__file__).with_name("training_pipeline.yaml")


def parse_params(pairs: list[str]) -> dict[str, Any]:
    """``["epochs=3", "data_rev=v2"]`` -> ``{"epochs": 3, "data_rev": "v2"}``, typed as the YAML declares.

    Raises ValueError on a malformed pair or a parameter the pipeline does not have.
    """
    import yaml

    spec = next(yaml.safe_load_all(DEFAULT_PACKAGE.read_text()))  # 2nd document: platform config
    declared = spec["root"]["inputDefinitions"]["parameters"]
    casts = {"NUMBER_INTEGER": int, "NUMBER_DOUBLE": float, "STRING": str,
             "BOOLEAN": lambda v: {"true": True, "false": False}[v.lower()]}
    params: dict[str, Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ValueError(f"--param needs name=value, got {pair!r}")
        if name not in declared:
            raise ValueError(f"the pipeline has no parameter {name!r}; it has {sorted(declared)}")
        try:
            params[name] = casts[declared[name]["parameterType"]](value)
        except (KeyError, ValueError) as e:
            raise ValueError(f"{name}={value!r} is not a valid {declared[name]['parameterType']}") from e
    missing = [n for n, d in declared.items() if not d.get("isOptional") and "defaultValue" not in d and n not in params]
    if missing:
        raise ValueError(f"required parameters missing: {missing}")
    return params


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.submit", description=__doc__.splitlines()[0])
    p.add_argument("--host", default=os.environ.get("KFP_HOST"), help="KFP API endpoint (env KFP_HOST)")
    p.add_argument("--namespace", default=os.environ.get("KFP_NAMESPACE"))
    p.add_argument("--experiment", default="kiln")
    p.add_argument("--package", type=Path, default=DEFAULT_PACKAGE)
    sub = p.add_subparsers(dest="action", required=True)
    run = sub.add_parser("run", help="start one run")
    run.add_argument("--param", action="append", default=[], metavar="NAME=VALUE")
    run.add_argument("--run-name")
    sched = sub.add_parser("schedule", help="create a recurring run (retraining)")
    sched.add_argument("--param", action="append", default=[], metavar="NAME=VALUE")
    sched.add_argument("--name", default="kiln-retrain")
    when = sched.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", help="6-field cron (seconds first), e.g. '0 0 3 * * *'")
    when.add_argument("--every-seconds", type=int)
    sched.add_argument("--max-concurrency", type=int, default=1)
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if not args.host:
        raise SystemExit("no KFP host: pass --host or set KFP_HOST")
    params = parse_params(args.param)
    import kfp

    client = kfp.Client(host=args.host, namespace=args.namespace)
    if args.action == "run":
        result = client.create_run_from_pipeline_package(
            str(args.package), arguments=params, run_name=args.run_name, experiment_name=args.experiment,
            namespace=args.namespace)
        print(f"run {result.run_id} started")
        return 0
    experiment = client.create_experiment(args.experiment, namespace=args.namespace)
    recurring = client.create_recurring_run(
        experiment_id=experiment.experiment_id, job_name=args.name, cron_expression=args.cron,
        interval_second=args.every_seconds, max_concurrency=args.max_concurrency, no_catchup=True,
        params=params, pipeline_package_path=str(args.package))
    print(f"recurring run {recurring.recurring_run_id} created")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
