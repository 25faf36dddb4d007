"""The `starcast` command line: one click group whose sub-commands live beside the code they drive.

Each sub-command is defined in its sub-package (`catalogs/cli.py`, `engine/cli.py`,
`trainers/cli.py`) and loaded only when asked for, so `starcast --help` does not import torch.
Errors a user can act on (`StarcastError`) become one line on stderr and an exit code; `--debug`
shows the traceback instead.
"""

from __future__ import annotations

import sys
from importlib import import_module

import click

from . import __version__
from .errors import EXIT_ERROR, StarcastError

# command name -> (module, attribute, one-line help shown by `starcast --help`)
_COMMANDS = {
    "demo": ("starcast.demo", "demo", "Observe TLUSTY model stars, predict them, summarise and score them."),
    "synth": ("starcast.catalogs.cli", "synth", "Synthesise a survey (simplified generator, or --grid)."),
    "import-csv": ("starcast.catalogs.cli", "import_csv", "Import a wide CSV of spectra as a catalog."),
    "import-fits": ("starcast.catalogs.cli", "import_fits", "Import FITS spectra as a catalog."),
    "run": ("starcast.engine.cli", "run", "Predict stellar parameters for a catalog."),
    "inspect": ("starcast.engine.cli", "inspect", "Summarise a results catalog."),
    "explain": ("starcast.engine.cli", "explain", "Show which pixels and lines drive each estimate."),
    "train": ("starcast.trainers.cli", "train", "Train a model bundle from a TOML config."),
    "eval": ("starcast.trainers.cli", "eval_", "Evaluate results against true labels."),
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in _COMMANDS:
            return None
        module, attr, _ = _COMMANDS[name]
        return getattr(import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, _COMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="starcast")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """starcast: Teff, log g, v sin i (and more) with calibrated uncertainties, for whole catalogs."""
    ctx.obj = {"debug": debug}


def main(argv: list[str] | None = None) -> None:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="starcast", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except StarcastError as exc:
        if debug:
            raise
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_ERROR)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
