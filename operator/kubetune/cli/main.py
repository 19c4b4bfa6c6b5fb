"""The `kubetune` command line: validate, schema, render, crds, run and operator."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kubetune.api.automodel import AutomodelSpec
from kubetune.api.unsloth import UnslothSpec
from kubetune.cli.documents import DocumentError, load_files
from kubetune.cli.render import run_render
from kubetune.cli.validate import EXIT_USAGE, run_validate
from kubetune.render.crds import crd_file_name, custom_resource_definitions, openapi_schema, to_yaml


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubetune", description="Fine-tune LLMs on Kubernetes with NeMo Customizer's job format."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    validate = commands.add_parser("validate", help="check CustomizationJobs (and their Models/FileSets)")
    validate.add_argument("files", nargs="+", metavar="FILE", help="multi-document YAML files")
    validate.add_argument("-o", "--output", choices=["text", "json"], default="text", help="output format")
    validate.add_argument(
        "--gpu-type", metavar="TYPE", help="the cluster's GPU type (e.g. A100, T4), as the operator's gpuType setting"
    )

    schema = commands.add_parser("schema", help="print the live JSON schema of a backend section")
    schema.add_argument("backend", choices=["automodel", "unsloth"])
    schema.add_argument("--openapi", action="store_true", help="the structural OpenAPI form used in the CRD")

    render = commands.add_parser("render", help="print the child objects the operator would create (dry run)")
    render.add_argument("files", nargs="+", metavar="FILE", help="the job with its Models and FileSets")

    commands.add_parser("operator", help="run the operator (kopf) against the current kubeconfig or in-cluster")

    crds = commands.add_parser("crds", help="print the CustomResourceDefinitions as YAML")
    crds.add_argument("--out-dir", type=Path, help="write one file per CRD into this folder instead")

    run = commands.add_parser("run", help="run a CustomizationJob on this machine (no cluster)")
    run.add_argument("files", nargs="+", metavar="FILE", help="the job and its Models/FileSets (multi-document YAML)")
    run.add_argument("--job", help="the CustomizationJob to run when the input holds several")
    run.add_argument("--output", help="run folder (default runs/<namespace>/<job>)")
    run.add_argument("--fresh", action="store_true", help="delete the run folder first instead of resuming")
    run.add_argument("--no-sample", action="store_true", help="skip the before/after generation")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "validate":
            return run_validate(load_files(args.files), args.output, sys.stdout, args.gpu_type)
        if args.command == "render":
            return run_render(load_files(args.files), sys.stdout, sys.stderr)
        if args.command == "operator":
            # Imported here: kopf and the kubernetes client are the operator extra's, not the CLI's.
            from kubetune.handlers.operator import run as run_operator
            from kubetune.handlers.settings import SettingsError

            try:
                run_operator()
            except SettingsError as error:
                print(f"kubetune operator: {error}", file=sys.stderr)
                return EXIT_USAGE
            except KeyboardInterrupt:
                pass
            return 0
        if args.command == "schema":
            model = AutomodelSpec if args.backend == "automodel" else UnslothSpec
            schema = openapi_schema(model) if args.openapi else model.model_json_schema()
            print(json.dumps(schema, indent=2))
            return 0
        if args.command == "run":
            from kubetune.cli.run import run_command

            documents = load_files(args.files)
            return run_command(documents, args.job, args.output, args.fresh, not args.no_sample, sys.stdout)
        if args.command == "crds":
            definitions = custom_resource_definitions()
            if args.out_dir is None:
                sys.stdout.write(to_yaml(definitions))
                return 0
            args.out_dir.mkdir(parents=True, exist_ok=True)
            for definition in definitions:
                (args.out_dir / crd_file_name(definition)).write_text(to_yaml([definition]), encoding="utf-8")
            return 0
    except DocumentError as error:
        print(f"kubetune: {error}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        return 0
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
