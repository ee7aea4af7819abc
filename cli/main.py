"""The `dptool` Click application: a group whose commands live one per module and load on first use."""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import re
import signal
import sys

import click

from dptool._ffcv import silence_loader_gc_noise
from dptool.atomic import is_write_error
from dptool.distributed import launch_rank, launched_by_torchrun, mark_succeeded, report_failure
from dptool.errors import DptoolError, InputError

from ._common import CONTEXT_SETTINGS, Group

__all__ = ["cli", "main", "COMMANDS"]

#: command name -> module under dptool.cli holding a Click command called `command`
COMMANDS = {
    "convert": "convert",
    "info": "info",
    "train": "train",
    "finetune": "finetune",
    "score": "score",
    "prune": "prune",
    "verify": "verify",
    "bench": "bench",
    "demo": "demo",
}


class _LazyGroup(Group):
    """Loads each command's module only when that command runs, so `dptool -h` stays fast."""

    def list_commands(self, ctx):
        return list(COMMANDS)  # the workflow's order, not Click's alphabetical one

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        return importlib.import_module(f"dptool.cli.{COMMANDS[name]}").command

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.ClickException as exc:  # a bad global option
            _raise_for_job(exc)
            raise

    def invoke(self, ctx):
        try:
            result = self._invoke(ctx)
            mark_succeeded()  # under torchrun: a rank failing after this one succeeded need not wait for it
            return result
        except (click.ClickException, click.exceptions.Exit, click.Abort) as exc:
            if not _TERMINATED:
                if isinstance(exc, click.ClickException):
                    _raise_for_job(exc)
                raise
            # stopped by SIGTERM/SIGHUP: whatever the stop caused (a worker killed by the same signal sent to the
            # process group, a pipe it closed) is reported as the stop it is
            click.echo("Terminated.", err=True)
            raise click.exceptions.Exit(128 + _TERMINATED[0]) from None

    def _invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except InputError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            err = click.ClickException(str(exc))
            err.exit_code = 2
            raise err from exc
        except DptoolError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            raise click.ClickException(str(exc)) from exc
        except KeyboardInterrupt:
            if _TERMINATED:  # SIGTERM, stopped as Ctrl-C stops a command (temporary files deleted): reported above
                raise click.exceptions.Exit(128 + _TERMINATED[0]) from None
            click.echo("Aborted!", err=True)
            raise click.exceptions.Exit(130) from None  # 128 + SIGINT, as shells report an interrupted command
        except OSError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            if not is_write_error(exc):
                raise click.ClickException(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the "
                                           "traceback)") from exc
            # a write error that no command named where it happened
            where = f" {exc.filename}" if exc.filename else ""
            err = click.ClickException(f"Cannot write{where} ({exc.strerror}); free space or choose another folder.")
            err.exit_code = 2
            raise err from exc
        except Exception as exc:  # an internal error: one sentence unless --debug
            if ctx.obj and ctx.obj.get("debug"):
                raise
            lost = _lost_peer(exc)
            if lost is not None:
                raise _RankNamed(lost) from exc
            raise click.ClickException(
                f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)"
            ) from exc


class _RankNamed(click.ClickException):
    """An error whose sentence already names its rank: printed at once, by the rank that had it."""


class _JobError(click.ClickException):
    """Under torchrun, `inner` printed once for the job when every rank fails with it, else by each rank that does,
    naming its rank (`dptool.distributed.report_failure`); every rank still exits with `inner`'s code."""

    def __init__(self, inner: click.ClickException):
        super().__init__(inner.message)
        self.inner = inner
        self.exit_code = inner.exit_code

    def show(self, file=None) -> None:
        buf = io.StringIO()
        self.inner.show(file=buf)
        text = buf.getvalue()
        out = file if file is not None else sys.stderr

        def write(named: bool) -> None:
            shown = text
            if named:  # "Error: rank 1: ...", after a usage error's usage lines
                found = re.search(r"^Error: ", text, flags=re.M)
                at = found.end() if found else 0
                shown = f"{text[:at]}rank {launch_rank()}: {text[at:]}"
            out.write(shown)
            out.flush()

        report_failure(f"exit {self.exit_code}\n{text}", write)


def _raise_for_job(exc: click.ClickException) -> None:
    """Under torchrun, raise `exc` as a _JobError (printed once when every rank shares it); else return, for the caller
    to raise `exc` itself."""
    if launched_by_torchrun() and not isinstance(exc, (_RankNamed, _JobError)):
        raise _JobError(exc) from exc


def _lost_peer(exc: BaseException) -> str | None:
    """Under torchrun, the sentence for a collective that failed because another process of the job ended (gloo
    names the closed connection and "a remote worker"; NCCL raises torch's DistError): that process prints why it
    stopped, so this one says it stopped with it, naming its rank, instead of an "internal error" on every other
    rank. None for any other exception."""
    if not launched_by_torchrun():
        return None
    text = str(exc)
    dist_mod = sys.modules.get("torch.distributed")
    dist_error = getattr(dist_mod, "DistError", None) if dist_mod is not None else None
    gloo_peer = isinstance(exc, RuntimeError) and "gloo" in text and "remote worker" in text
    if not (gloo_peer or (dist_error is not None and isinstance(exc, dist_error))):
        return None
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    reason = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". This is typically")[0].rstrip(".")  # gloo's [file:line]
    return (f"rank {launch_rank()}: stopped because its connection to another process of this torchrun job failed "
            f"({reason}); that process, or torchrun's summary, says why it ended.")


@click.group(cls=_LazyGroup, context_settings=CONTEXT_SETTINGS)
@click.option("-v", "--verbose", count=True, help="More log output: -v info, -vv debug.")
@click.option("-q", "--quiet", is_flag=True, help="Only errors.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(package_name="dptool")
@click.pass_context
def cli(ctx, verbose: int, quiet: bool, debug: bool):
    """Prune a source dataset to the classes that matter for a target task, then pretrain faster.

    \b
    dptool convert ~/imagenet/train in_train.beton
    dptool score --method lm --source in_train.beton --target flowers.beton --model rn18.pt -o scores.json
    dptool prune in_train.beton --scores scores.json --ratio 0.6 -o in_train_p60.beton
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    if not debug:
        silence_loader_gc_noise()
    level = logging.ERROR if quiet else [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    if launch_rank() != 0 and not verbose:  # under torchrun every rank would print rank 0's warnings again; -v: all
        level = logging.ERROR
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)
    for noisy in ("numba", "PIL", "matplotlib", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


_TERMINATED: list[int] = []  # the signal that stopped this command, when SIGTERM or SIGHUP did
_MAIN_PID = os.getpid()


def _on_terminate(signum, frame) -> None:
    """SIGTERM / SIGHUP (`kill`, `timeout`, a scheduler's preemption, a closed terminal) stop the command the way
    Ctrl-C does, so that its temporary files are deleted, and it exits 128 + the signal."""
    if os.getpid() != _MAIN_PID:  # a forked worker inherits this handler: it dies as the signal would kill it
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    if _TERMINATED:  # a second one does not wait for a safe point
        raise KeyboardInterrupt
    _TERMINATED.append(signum)
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):  # the writer holds Ctrl-C back to a safe point: the same goes for this
        handler(signal.SIGINT, frame)
    else:  # SIGINT ignored (a background job of a script): nothing would raise it
        raise KeyboardInterrupt


def main() -> None:
    """Console-script entry point."""
    global _MAIN_PID
    _MAIN_PID = os.getpid()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) == signal.SIG_DFL:  # left alone where the parent made it ignored (nohup)
            signal.signal(sig, _on_terminate)
    try:
        cli(prog_name="dptool")
    finally:  # done or abandoned: a (second) Ctrl-C now would only print tracebacks of atexit and Numba hooks
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) == _on_terminate:
                signal.signal(sig, signal.SIG_DFL)
        if _TERMINATED:
            # stopped, its temporary files already deleted: leave at once, as the default action would, instead
            # of spending seconds in the interpreter's shutdown (torch, Numba) while a scheduler or torchrun waits
            logging.shutdown()
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(128 + _TERMINATED[0])


if __name__ == "__main__":
    main()
