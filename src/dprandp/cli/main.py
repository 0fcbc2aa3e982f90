"""Entry point of the ``dprandp`` command.

Subcommands live in their own modules (``dprandp.cli.<name>``, attribute ``command``) and are
imported only when used, so ``dprandp epsilon`` never pays for importing torch models.
Every user error, from click's parsing or from the library (:class:`~dprandp.errors.InputError`),
ends as one line on stderr and exit status 2, never a traceback; running out of memory ends as
one line naming the options that size the memory, and exit status 1.
"""

from __future__ import annotations

import importlib
import re
import sys

import click

from dprandp.errors import InputError

# name -> (module, one-line help). Order is the order shown by ``dprandp --help``.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "run": ("dprandp.cli.run", "Phase I + II + III end to end (no arguments: offline demo)."),
    "train": ("dprandp.cli.train", "Phases II + III (DP-SGD) on private data from a prior."),
    "pretrain": ("dprandp.cli.pretrain", "Phase I: contrastive pretraining on random-process images."),
    "generate": ("dprandp.cli.generate", "Render random-process images to a .npy store."),
    "tune": ("dprandp.cli.tune", "Private hyperparameter search: the best of a random number of runs, one budget."),
    "evaluate": ("dprandp.cli.evaluate", "Accuracy, balanced accuracy and ROC-AUC of a trained model (RUN_DIR/model.pt)."),
    "predict": ("dprandp.cli.predict", "Class predictions of a trained model on new images (CSV)."),
    "epsilon": ("dprandp.cli.epsilon", "Privacy spent (epsilon) by one or more DP-SGD phases."),
    "calibrate": ("dprandp.cli.calibrate", "Smallest noise multiplier that reaches a target epsilon."),
    "audit": ("dprandp.cli.audit", "Empirical privacy audit of the DP-SGD engine (lower bound on epsilon)."),
}


def _available(name: str) -> bool:
    module = SUBCOMMANDS[name][0]
    return importlib.util.find_spec(module) is not None


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name in SUBCOMMANDS if _available(name)]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in SUBCOMMANDS or not _available(cmd_name):
            return None
        module = importlib.import_module(SUBCOMMANDS[cmd_name][0])
        return module.command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, SUBCOMMANDS[name][1]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dprandp")
def cli() -> None:
    """dprandp: differentially private image classification with priors from random processes."""


INTERRUPTED = ("interrupted; a DP run directory keeps its last checkpoint and ledger: continue it with "
               "`dprandp train --resume DIR` (a prior's training state: `dprandp pretrain ... --resume`)")


def fail(message: str, code: int = 2) -> None:
    """Print ``dprandp: error: message`` as one line on stderr and exit."""
    one_line = " ".join(str(message).split())
    click.echo(f"dprandp: error: {one_line}", err=True)
    sys.exit(code)


def _out_of_memory(exc: BaseException) -> str | None:
    """One line for an allocation failure (host or accelerator), or None if ``exc`` is not one."""
    text = str(exc)
    if not (isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"
            or (isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text))):
        return None
    size = re.search(r"allocate (\d+) bytes", text)  # the CPU allocator
    cuda = re.search(r"allocate (\d+(?:\.\d+)? [KMGT]iB)", text)  # CUDA's caching allocator
    wanted = f" (an allocation of {int(size.group(1)) / 1e9:.3g} GB)" if size else (
        f" (an allocation of {cuda.group(1)})" if cuda else "")
    return (f"out of memory{wanted}: lower --physical-batch-size (samples whose per-sample gradients are held at once), "
            "--augmult or --batch-size; a DP run directory keeps its checkpoint and ledger for --resume")


def main(argv: list[str] | None = None) -> None:
    try:
        rv = cli.main(args=argv, prog_name="dprandp", standalone_mode=False)
    except InputError as exc:
        fail(str(exc))
    except click.exceptions.NoArgsIsHelpError as exc:  # pragma: no cover - click >= 8.2
        click.echo(exc.ctx.get_help() if exc.ctx else str(exc))
        sys.exit(0)
    except click.ClickException as exc:
        fail(exc.format_message(), code=exc.exit_code if exc.exit_code != 1 else 2)
    except click.exceptions.Abort as exc:
        if isinstance(exc.__context__, KeyboardInterrupt):  # click turns Ctrl-C into Abort
            fail(INTERRUPTED, code=130)
        fail("aborted", code=130)
    except KeyboardInterrupt:
        fail(INTERRUPTED, code=130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except BrokenPipeError:  # e.g. `dprandp ... | head`
        sys.exit(0)
    except OSError as exc:  # a full disk, a quota, a file-size limit, a vanished mount: one line, not a traceback
        where = f"{exc.filename}: " if exc.filename else ""
        fail(f"{where}{exc.strerror or exc}", code=1)
    except (MemoryError, RuntimeError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        message = _out_of_memory(exc)
        if message is None:
            raise
        fail(message, code=1)
    if isinstance(rv, int) and rv:
        sys.exit(rv)
