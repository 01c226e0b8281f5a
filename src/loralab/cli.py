"""The `loralab` command: a thin layer over the library API (loralab.api).

Heavy libraries (torch, transformers) are imported inside the commands that need them, so
`loralab --help` and `loralab validate` stay quick.
"""

from __future__ import annotations

import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console, ConsoleDimensions

from loralab import interrupts
from loralab.api import LoralabError
from loralab.config.schema import TRACKERS
from loralab.workspace.status import DONE, Status

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Declare LoRA runs in YAML, train them with PEFT, measure and compare them.")
PIPED_WIDTH = 200


class _Console(Console):
    """Piped to a file or a log, a table wrapped at rich's default 80 columns is unreadable (one row
    over many lines): outside a terminal, tables get 200 columns unless COLUMNS says otherwise (read at
    each print, as rich does)."""

    @property
    def size(self) -> ConsoleDimensions:
        size = Console.size.fget(self)
        if not self.is_terminal and not os.environ.get("COLUMNS"):
            return ConsoleDimensions(getattr(self, "_table_width", None) or PIPED_WIDTH, size.height)
        return size

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)

    def print(self, *objects, **kwargs) -> None:
        """Piped, a table wider than 200 columns (three runs and their verdicts) is printed at its own
        width rather than with its cells wrapped over several lines."""
        from rich.table import Table

        if (not self.is_terminal and not os.environ.get("COLUMNS") and "width" not in kwargs
                and len(objects) == 1 and isinstance(objects[0], Table)):
            self._table_width = max(PIPED_WIDTH, self.measure(objects[0], options=self.options.update(width=10_000)).maximum)
            try:
                return super().print(*objects, **kwargs)
            finally:
                self._table_width = None
        super().print(*objects, **kwargs)


console = _Console()
err_console = _Console(stderr=True)

RepeatsOpt = typer.Option(None, "--repeats", help="Train each run with this many seeds, or `auto`: 2 seeds, more "
                          "only where a verdict is unsettled (overrides the file)")
LogEveryOpt = typer.Option(None, "--log-every", min=0, metavar="SECONDS",
                           help="Outside a terminal (a log file, CI): a progress line this often (default 30)")
# A string, not a Path: a shared workspace is a URL (postgresql://...), which Path would mangle.
WorkspaceOpt = typer.Option(None, "--workspace", "-w", help="Workspace folder, or postgresql://USER:PW@HOST:5432/DB "
                            "shared by many hosts (default: the file's `workspace:`, else ./loralab-workspace)")


class Executor(str, Enum):
    local = "local"
    ray = "ray"


ExecutorOpt = typer.Option(None, "--executor", help="Where runs train: local (this process) or ray (Ray actors, the `ray` extra); "
                           "default: the file's `executor:`, else local")
TrackOpt = typer.Option(None, "--track", help=f"Copy each run to trackers: comma-separated {', '.join(TRACKERS)} "
                        "(each an extra: pip install 'loralab[NAME]'), or none; default: the file's `track:`")
ExperimentOpt = typer.Option(None, "--experiment", "-e", help="The experiment whose run it is, when several have a run of that name")
AddressOpt = typer.Option(None, "--address", help="A Ray cluster's address (implies --executor ray); none: a local Ray instance")


def _version(value: bool) -> None:
    if value:
        from loralab import __version__

        sys.stdout.write(f"loralab {__version__}\n")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print loralab's version and exit")):
    """Declare LoRA runs in YAML, train them with PEFT, measure and compare them."""


def _fail(err: LoralabError) -> None:
    err_console.print("[bold red]error:[/bold red] " + _escape(str(err)), highlight=False, soft_wrap=True)
    raise typer.Exit(err.exit_code)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


class Terminated(KeyboardInterrupt):
    """SIGTERM (what `timeout`, Docker, Slurm and Kubernetes send): handled like Ctrl-C, so the current
    run is marked interrupted, but the exit code is 143 (128 + 15), as for a process it ended."""


def _guard(fn=None, *, trains: bool = True):
    """Turn user errors into one message and exit code 2; Ctrl-C into exit code 130, SIGTERM into 143.
    `trains=False` (a server): Ctrl-C is its way to stop, handled by it; no run to mark interrupted."""
    import contextlib
    import functools

    if fn is None:
        return functools.partial(_guard, trains=trains)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with _ctrl_c() if trains else contextlib.nullcontext():
                return fn(*args, **kwargs)
        except LoralabError as err:
            _fail(err)
        except KeyboardInterrupt as err:
            if not trains:
                raise typer.Exit(0) from None
            what = "Terminated (SIGTERM)" if isinstance(err, Terminated) else "Interrupted"
            err_console.print(f"[yellow]{what}: the current run is marked interrupted; finished runs are kept.[/yellow]")
            raise typer.Exit(143 if isinstance(err, Terminated) else 130)
        except Exception as err:  # a damaged workspace database: a message, not a traceback (other errors are bugs)
            if not type(err).__module__.startswith(("sqlalchemy", "sqlite3")):
                raise
            from loralab import api

            full = api.storage_problem(err, kwargs.get("workspace"))
            if full is None:
                raise
            _fail(full)
    return wrapper


class _ctrl_c:
    """The first Ctrl-C raises KeyboardInterrupt as usual, so the current run is marked interrupted
    and finished runs are kept; a second one, while that cleanup runs, ends the process at once
    (the default action of SIGINT, even inside native code). SIGTERM gets the same treatment."""

    def __enter__(self):
        import signal
        import threading

        self.previous = None
        self.previous_term = None
        if threading.current_thread() is not threading.main_thread():
            return self  # only the main thread may set handlers
        # A SIGINT ignored by the parent (nohup, `&`) stays ignored.
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self.previous = signal.signal(signal.SIGINT, self._first)
        if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:  # may be the plain int 0
            self.previous_term = signal.signal(signal.SIGTERM, self._term)
        return self

    @staticmethod
    def _term(signum, frame):
        import signal

        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
        interrupts.deliver(Terminated())

    @staticmethod
    def _first(signum, frame):
        import signal

        signal.signal(signal.SIGINT, signal.SIG_DFL)
        sys.stderr.write("\nStopping: marking the current run interrupted (Ctrl-C again to quit at once).\n")
        interrupts.deliver(KeyboardInterrupt())

    def __exit__(self, *exc):
        import signal

        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        if self.previous_term is not None:
            signal.signal(signal.SIGTERM, self.previous_term)
        return False


def _split(only: Optional[str]) -> Optional[list[str]]:
    return [x.strip() for x in only.split(",") if x.strip()] if only else None


def _print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


@app.command()
@_guard
def validate(file: Path = typer.Argument(..., help="Experiment YAML file")):
    """Check an experiment file without training anything."""
    from loralab.api import validate as api_validate

    exp, notes = api_validate(file)
    console.print(f"[green]OK[/green] {file}: experiment {exp.name!r}, runs: "
                  f"{', '.join(r.name for r in exp.resolved_runs)}; eval caps {exp.eval_caps}", highlight=False)
    for n in notes:
        console.print(f"  {n}", highlight=False)


@app.command()
@_guard
def run(file: Path = typer.Argument(..., help="Experiment YAML file"),
        only: Optional[str] = typer.Option(None, "--only", help="Comma-separated run names, e.g. A,B"),
        force: bool = typer.Option(False, "--force", help="Re-run finished runs"),
        repeats: Optional[str] = RepeatsOpt,
        workspace: Optional[str] = WorkspaceOpt,
        executor: Optional[Executor] = ExecutorOpt,
        address: Optional[str] = AddressOpt,
        track: Optional[str] = TrackOpt,
        log_every: Optional[float] = LogEveryOpt):
    """Train and evaluate the runs of an experiment file, then print their comparison."""
    from loralab import api

    exp = api.with_tracking(api.with_repeats(api.load(file), repeats), track)
    result = api.run(exp, workspace=workspace, only=_split(only), force=force, console=console,
                     executor=executor.value if executor else None, address=address, log_every=log_every)
    _show_comparison(result, exp, _split(only))
    if result.failed:
        err_console.print(f"[red]{len(result.failed)} run(s) failed: {', '.join(result.failed)} "
                          f"(see `loralab show NAME`)[/red]")
        raise typer.Exit(1)


@app.command()
@_guard
def sweep(file: Path = typer.Argument(..., help="Experiment YAML file with a `sweep:` section"),
          dry_run: bool = typer.Option(False, "--dry-run", help="Print the trials and estimated time; train nothing"),
          workspace: Optional[str] = WorkspaceOpt,
          executor: Optional[Executor] = ExecutorOpt,
          address: Optional[str] = AddressOpt,
          track: Optional[str] = TrackOpt,
          log_every: Optional[float] = LogEveryOpt):
    """Search knobs with Optuna within a budget, pruning bad trials; run again to resume."""
    from loralab import api

    api.sweep(api.with_tracking(api.load(file), track), workspace=workspace, dry_run=dry_run, console=console,
              executor=executor.value if executor else None, address=address, log_every=log_every)


@app.command()
@_guard
def demo(workspace: Optional[str] = WorkspaceOpt,
         force: bool = typer.Option(False, "--force", help="Re-run finished runs"),
         repeats: Optional[str] = RepeatsOpt,
         log_every: Optional[float] = LogEveryOpt):
    """Run the seed report (Run A vs Run B) on the built-in model and data."""
    from loralab import api

    path = api.example_path("seed-report.yaml")
    console.print(f"Running {path.name}: the seed's Run A and Run B on the built-in SmolLM2-135M "
                  "and the built-in stdlib-docstrings data.", highlight=False)
    exp = api.with_repeats(api.load(path), repeats)
    result = api.run(exp, workspace=workspace, force=force, console=console, log_every=log_every)
    _show_comparison(result, exp)
    if result.failed:
        raise typer.Exit(1)


def _show_comparison(result, exp, only: Optional[list[str]] = None) -> None:
    from loralab import api

    c = api.compare_groups(list(result.groups().values()), evaluation=exp.evaluation)
    if only:  # one run of the file shown: its knobs that differ among the file's runs, not every knob it has
        c.knobs = {k: v for k, v in c.knobs.items() if k == "seeds" or k in _differing(exp.resolved_runs)}
    console.print()
    console.print(api.table(c))


def _differing(runs) -> set[str]:
    """The `section.key` knobs whose values differ among runs (RunSpecs)."""
    values: dict[str, set] = {}
    for run in runs:
        for section in ("lora", "train", "generate"):
            for key, v in getattr(run, section).model_dump().items():
                values.setdefault(f"{section}.{key}", set()).add(json.dumps(v, sort_keys=True, default=str))
    return {k for k, vs in values.items() if len(vs) > 1 and k != "train.seed"}


@app.command("ls")
@_guard
def ls(workspace: Optional[str] = WorkspaceOpt,
       as_json: bool = typer.Option(False, "--json", help="Machine-readable output")):
    """List the runs in the workspace."""
    from rich.table import Table

    from loralab import api

    records = api.list_runs(workspace)
    dead = api.gone(records, workspace)
    if as_json:
        _print_json([{**r.summary(), "metrics": r.metrics, **({"status": Status.INTERRUPTED, "process_gone": True} if r.id in dead else {})}
                     for r in records])
        return
    t = Table(title=f"Runs in {api.shown_workspace(workspace)}", title_justify="left")
    longest = max((len(r.name) for r in records), default=4)
    for col in ("experiment", "name", "seed", "id", "status", "eval loss", "updated"):
        # names and ids are what a user types next: never cut to "trial-00…" on a narrow terminal
        t.add_column(col, no_wrap=col in ("name", "id"), min_width=min(longest, 60) if col == "name" else None)
    for r in records:
        loss = r.metrics.get("eval_loss")
        status = "interrupted (process gone)" if r.id in dead else r.status
        t.add_row(_escape(r.experiment), _escape(r.name), "" if r.seed is None else str(r.seed), r.id, status,
                  f"{loss:.4f}" if loss is not None else "—", r.updated_at)
    console.print(t)


@app.command()
@_guard
def show(run_ref: str = typer.Argument(..., metavar="RUN", help="Run name, experiment/name, or id prefix"),
         workspace: Optional[str] = WorkspaceOpt,
         as_json: bool = typer.Option(False, "--json", help="Machine-readable output"),
         samples: int = typer.Option(3, "--samples", help="Sample outputs to print"),
         experiment: Optional[str] = ExperimentOpt):
    """Show one run: config, metrics, timings and a few sample outputs."""
    from rich.table import Table

    from loralab import api
    from loralab.environment import placement_text

    group = api.get_group(run_ref, workspace, experiment)
    rec = group[0]
    note = api.picked(run_ref, group, workspace) if experiment is None else None
    if note:
        err_console.print(f"[yellow]note:[/yellow] {_escape(note)}", highlight=False, soft_wrap=True)
    if as_json:
        _print_json({**rec.__dict__, "seeds": [r.__dict__ for r in group]} if len(group) > 1 else rec.__dict__)
        return
    dead = api.gone(group, workspace)
    for r in group:
        seed = f"  seed {r.seed}" if r.seed is not None else ""
        status = "interrupted (process gone)" if r.id in dead else r.status
        console.print(f"[bold]{_escape(r.experiment)}/{_escape(r.name)}[/bold]{seed}  id {r.id}  status {status}", highlight=False)
        if r.error:
            last = r.error.strip().splitlines()[-1] if r.status == Status.FAILED else r.error.strip()
            console.print("[red]" + _escape(last) + "[/red]")
        if r.status not in DONE and r.curves.get("step"):
            c = r.curves
            planned = c.get("planned")
            console.print(f"  trained {c['step'][-1]}{f' of {planned}' if planned else ''} steps so far (streamed curve), "
                          f"last loss {c['loss'][-1]:.4f}", highlight=False)
        if r.adapter_path:
            console.print(f"  adapter: {r.adapter_path}", highlight=False)
        if r.timings.get("resumed_at"):  # continued from a checkpoint after a kill or interruption
            console.print(f"  resumed at step {', '.join(str(s) for s in r.timings['resumed_at'])} from a checkpoint",
                          highlight=False)
        if placement_text(r.env):
            console.print(f"  trained on {_escape(placement_text(r.env))}", highlight=False)
        if r.timings.get("train_reused_from"):  # only the evaluation differed from a stored run
            console.print(f"  trained as run {r.timings['train_reused_from']}; this run only evaluated its adapter",
                          highlight=False)
    console.print(f"model {rec.model.get('name')} ({rec.model.get('fingerprint')}), data {rec.data.get('name')} "
                  f"({rec.data.get('fingerprint')}), device {rec.config.get('device')} {rec.config.get('dtype')}", highlight=False)
    console.print(api.table(api.compare_groups([group], all_knobs=True), title="Settings and outcomes"))
    caps = sorted({int(c) for s in rec.samples for c in s.get("outputs", {})})
    if rec.samples and samples > 0 and caps:
        t = Table(title="Samples", title_justify="left", show_lines=True)
        t.add_column("prompt")
        t.add_column("reference")
        for cap in caps:
            t.add_column(f"output @{cap}")
        for s in rec.samples[:samples]:
            outs = [api.text_of(s["outputs"].get(str(c), {}).get("text")) for c in caps]
            t.add_row(*[_escape(x) for x in (s["prompt"], s["reference"], *outs)])
        console.print(t)


@app.command("compare")
@_guard
def compare_cmd(runs: List[str] = typer.Argument(..., metavar="RUN...", help="Runs to compare (names or ids)"),
                workspace: Optional[str] = WorkspaceOpt,
                as_json: bool = typer.Option(False, "--json", help="Machine-readable output"),
                markdown: bool = typer.Option(False, "--markdown", help="A Markdown table (for notes and reports)"),
                all_knobs: bool = typer.Option(False, "--all-knobs", help="Show every knob, not only those that differ")):
    """Compare runs side by side: the knobs that differ, then the measured outcomes."""
    from loralab import api

    twice = sorted({r for r in runs if runs.count(r) > 1})
    if twice:
        err_console.print(f"[yellow]note:[/yellow] {_escape(', '.join(twice))} given more than once: a run compared with "
                          "itself differs by nothing", highlight=False)
    c = api.compare(runs, workspace, all_knobs=all_knobs)
    if as_json:
        sys.stdout.write(c.to_json() + "\n")
    elif markdown:
        sys.stdout.write(api.markdown(c))
    else:
        console.print(api.table(c))


@app.command()
@_guard
def doctor(workspace: Optional[str] = WorkspaceOpt,
           repair: bool = typer.Option(False, "--repair", help="Fix what was found (runs held by a live process are left alone)"),
           as_json: bool = typer.Option(False, "--json", help="Machine-readable output")):
    """Check that the workspace database and the files on disk agree; find what a crash left behind."""
    from loralab import api

    report = api.doctor(workspace, repair=repair)
    if as_json:
        _print_json(report.to_json())
    else:
        for f in report.findings:
            mark = "[green]repaired[/green]" if f.repaired else ("[cyan]note[/cyan]" if f.severity == "note" else "[red]problem[/red]")
            console.print(f"{mark} {f.kind}: {_escape(f.where)}: {_escape(f.problem)}. "
                          f"{'Done' if f.repaired else 'Fix'}: {_escape(f.repair)}", highlight=False, soft_wrap=True)
        left = len(report.problems)
        summary = (f"{report.runs} run(s), {report.folders} folder(s), {report.trials} sweep trial(s) checked in "
                   f"{report.workspace}: ")
        if left:
            fixable = not repair and any(f.repairable for f in report.problems)
            console.print(summary + f"[red]{left} problem(s)[/red]" + ("; `loralab doctor --repair` fixes what it can" if fixable else ""),
                          highlight=False)
        else:
            console.print(summary + "[green]OK[/green]", highlight=False)
    if not report.ok:
        raise typer.Exit(1)


@app.command()
@_guard
def ablate(file: Path = typer.Argument(..., metavar="FILE", help="Experiment YAML file that declares (or swept) both runs"),
           a: str = typer.Argument(..., metavar="A", help="The run to start from"),
           b: str = typer.Argument(..., metavar="B", help="The run to move toward"),
           design: str = typer.Option("ofat", "--design", help="ofat: one knob at a time from A toward B; "
                                      "factorial: a two-level fractional factorial over the differing knobs"),
           out: Optional[Path] = typer.Option(None, "--out", "-o", help="Where to write the plan (default: WORKSPACE/ablations/NAME.yaml)"),
           train: bool = typer.Option(False, "--run", help="Train the plan now (runs already stored, A and B among them, are reused)"),
           hold: str = typer.Option("alpha/r", "--hold", help="What stays fixed when r moves: alpha/r (alpha follows r, "
                                    "so r's effect is not a change of update scale) or alpha"),
           repeats: Optional[str] = RepeatsOpt,
           workspace: Optional[str] = WorkspaceOpt):
    """Which knob did it? Write (and with --run, train) the runs that credit each differing knob."""
    from loralab import api

    plan = api.ablate(file, a, b, design=design, out=out, workspace=workspace, repeats=repeats, train=train,
                      console=console if train else None, hold=hold)
    for line in plan.summary():
        console.print(_escape(line), highlight=False)
    console.print(f"Wrote {plan.path}", highlight=False)
    if plan.result is None:
        console.print(f"Run it: loralab run {plan.path}   (then: loralab report {file})", highlight=False)
        return
    _show_effects(plan)
    console.print(f"The report credits each knob: loralab report {file}", highlight=False)
    if plan.result.failed:
        raise typer.Exit(1)


def _show_effects(plan) -> None:
    """Each knob's own effect on the headline metrics, from the ablation's runs: one row per knob and metric."""
    from rich.table import Table

    from loralab import api

    rows = api.effects_of(plan)
    if not rows:
        console.print("No knob's effect has an interval yet (one seed of per-run numbers): use --repeats 3.")
        return
    t = Table(title=f"Each knob on its own ({plan.experiment.evaluation.confidence:.0%} CI)", title_justify="left")
    for col, just in (("knob", "left"), ("change", "left"), ("metric", "left"), ("effect", "right"), ("verdict", "left")):
        t.add_column(col, justify=just)
    for knob, change, metric, effect, verdict in rows:
        t.add_row(_escape(knob), _escape(change), _escape(metric), effect, verdict,
                  style=None if verdict in ("within noise", "negligible") else "bold")
    console.print(t)


@app.command()
@_guard(trains=False)
def dashboard(workspace: Optional[str] = WorkspaceOpt,
              port: int = typer.Option(8765, "--port", "-p", min=1, max=65535, help="Port to serve on"),
              host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (default: this machine only)"),
              refresh: float = typer.Option(2.0, "--refresh", min=0.2, help="Seconds between the page's updates")):
    """A live, read-only web page of the workspace: runs, loss curves, sweeps, main differences."""
    from loralab import api

    api.dashboard(workspace, host=host, port=port, refresh_s=refresh, console=console)


@app.command()
@_guard
def export(run_ref: str = typer.Argument(..., metavar="RUN", help="A finished run, by name or id"),
           out: Path = typer.Option(..., "--out", "-o", help="A new or empty folder"),
           merge: bool = typer.Option(False, "--merge", help="Merge the adapter into the base model (safetensors, "
                                      "with its tokenizer) instead of writing the PEFT adapter folder"),
           base: Optional[str] = typer.Option(None, "--base", "--base-id", metavar="HUB_ID|PATH",
                                              help="How the export names its base model for others: a Hugging Face id or "
                                              "a path on their machine (default: the built-in model's Hub id "
                                              "HuggingFaceTB/SmolLM2-135M-Instruct, a Hub id as the file gave it, else this machine's folder)"),
           seed: Optional[int] = typer.Option(None, "--seed", help="Which seed of a run trained with several (default: the first)"),
           experiment: Optional[str] = ExperimentOpt,
           workspace: Optional[str] = WorkspaceOpt):
    """Write a run's adapter (or the merged model) with its tokenizer and a model card, for others to load."""
    from loralab import api

    done = api.export(run_ref, out, merge=merge, workspace=workspace, base=base, seed=seed, experiment=experiment)
    for note in done.notes:
        err_console.print(f"[yellow]note:[/yellow] {_escape(note)}", highlight=False, soft_wrap=True)
    console.print(f"Wrote {done.folder} ({'merged model' if merge else 'PEFT adapter'}, tokenizer and README.md)", highlight=False)


@app.command()
@_guard
def report(targets: List[str] = typer.Argument(..., metavar="FILE | RUN...", help="An experiment file, or runs by name or id"),
           out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for report.md, plots/ and report.html (default: reports/NAME)"),
           workspace: Optional[str] = WorkspaceOpt,
           metric: Optional[str] = typer.Option(None, "--metric", help="What the TL;DR ranks by, e.g. rouge_l@100 (default: eval_loss, or the sweep's objective)"),
           samples: int = typer.Option(4, "--samples", min=0, help="Eval prompts shown side by side"),
           goal: Optional[str] = typer.Option(None, "--goal", help="The goal, in one sentence (default: the file's leading comment)")):
    """Write what the runs showed, from the evidence, as report.md and one self-contained report.html."""
    import re

    from loralab import api

    if out is None:
        stem = Path(targets[0]).stem if targets[0].endswith((".yaml", ".yml")) else "-".join(targets)
        out = Path("reports") / (re.sub(r"[^A-Za-z0-9_.+-]+", "-", stem)[:80] or "report")
    written = api.report(targets, out=out, workspace=workspace, metric=metric, samples=samples, goal=goal)
    for note in written.report.notes:
        err_console.print(f"[yellow]note:[/yellow] {_escape(note)}", highlight=False)
    console.print("[bold]TL;DR[/bold]")
    for line in written.report.tldr.sentences:
        console.print(f"  {_escape(line)}", highlight=False)
    console.print(f"Wrote {written.markdown} ({len(written.plots)} plots in {written.markdown.parent / 'plots'}) "
                  f"and {written.html}", highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
