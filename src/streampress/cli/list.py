"""``streampress list``: pruning methods with their parameters and defaults, the cacher's
parameters, supported model families and built-in random architectures (imports no torch)."""

from __future__ import annotations

import json

from .options import CACHER_PARAMS

__all__ = ["add_parser", "main"]


def add_parser(subparsers, common) -> None:
    p = subparsers.add_parser("list", parents=[common], help="methods, parameters and supported models",
                              description=__doc__.split("\n\n")[0].removeprefix("``streampress list``: "))
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=main)


def main(args) -> int:
    from streampress.models import list_families
    from streampress.pruners.registry import describe_methods

    methods = describe_methods()
    families = list_families()
    cacher = {name: default for name, (default, _) in CACHER_PARAMS.items()}
    if args.json:
        print(json.dumps({"methods": methods, "cacher": cacher, "families": families}, indent=2, default=str))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title="Pruning methods (--method NAME, then --keep-ratio R or --param KEY=VALUE; "
                        "--method none: no pruning)")
    table.add_column("method", style="bold", no_wrap=True)
    table.add_column("parameters (defaults), what it does, paper")
    for m in methods:
        params = ", ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in m["params"].items())
        table.add_row(m["name"], f"[cyan]{params or '-'}[/cyan]\n{m.get('summary', '')}\n"
                                 f"[dim]{m.get('paper', '')}[/dim]", end_section=True)
    console.print(table)
    table = Table(title="Vision-encoder reuse: STC-Cacher (--cacher, --cacher-PARAMETER VALUE)")
    for column in ("parameter", "default", "meaning"):
        table.add_column(column)
    for name, (default, meaning) in CACHER_PARAMS.items():
        table.add_row(name, str(default), meaning)
    console.print(table)
    table = Table(title="Model families (--model FOLDER | OWNER/NAME | random:ARCH)")
    for column in ("family", "checkpoint model types", "random architectures"):
        table.add_column(column, overflow="fold")
    for f in families:
        table.add_row(f["name"], "\n".join(f["model_types"]), "\n".join(f"random:{a}" for a in f["random_archs"]))
    console.print(table)
    return 0
