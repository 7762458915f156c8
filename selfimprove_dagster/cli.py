"""`selfimprove`: run rounds headless, show their status, start the UI.

    selfimprove run --rounds 3      # materialize round_000..round_002 through Dagster
    selfimprove status [--json]     # one line per round: kept, accuracy before -> after
    selfimprove ui                  # dagster dev on 127.0.0.1 over the same instance
    selfimprove gc [--dry-run]      # delete table/checkpoint versions that are not current

Runs go through the persistent Dagster instance under `<data_dir>/dagster_home`, so
rounds started here show in the UI afterwards. Recipe knobs are the resources' fields,
set with `SELFIMPROVE_<FIELD>` environment variables (e.g. SELFIMPROVE_N_TRAIN=100).

A round is done when Dagster recorded it (its eval_scores materialization, its blocking
checks passed, nothing upstream re-materialized since: `assets/record.py`), never
because a file exists. Every command but `lineage` first marks runs whose process died
as failed (`mark_orphaned_runs`). Only public Dagster APIs here (tests grep for that).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.store.storage import RoundStore, round_key

STATUS_COLUMNS = ("round", "kept", "accuracy_before", "accuracy_after", "pass_at_k", "policy")
# Runs launched here carry the label the UI files runs of this code location under
# (`<repository>@<code location>`: workspace.yaml's and pyproject's location name).
REPOSITORY_TAG = ".dagster/repository"
REPOSITORY_LABEL = "__repository__@selfimprove_dagster"


def use_data_dir(data_dir: str, create: bool = True) -> RoundStore:
    """Point the resources and the Dagster instance at `data_dir`; with `create`, create
    the instance there now when missing (`open_instance`). A command that may still be
    refused passes `create=False` and opens the instance once it is past its checks, so a
    refused command leaves no `dagster_home/` behind."""
    store = RoundStore(Path(data_dir).expanduser().resolve())
    os.environ["SELFIMPROVE_DATA_DIR"] = str(store.data_dir)
    os.environ["DAGSTER_HOME"] = str(store.data_dir / "dagster_home")
    if create:
        open_instance()
    return store


# Written in dagster_home once the instance is created: which Dagster and which managed
# dagster.yaml created it (either changes: it is opened under the lock again).
INSTANCE_READY = ".selfimprove-instance"


def open_instance():
    """The Dagster instance in DAGSTER_HOME (set by `use_data_dir`), its folder and
    dagster.yaml written first when missing. One process at a time creates it (a lock in
    the data dir, `locking.creating_instance`): two commands started together on a fresh
    data dir would otherwise both create its SQLite tables, and one die of it. Once
    created (`INSTANCE_READY`), it is opened without the lock."""
    import hashlib

    import dagster as dg

    from selfimprove_dagster.interrupts import deferred_signals
    from selfimprove_dagster.locking import creating_instance
    from selfimprove_dagster.profiles import LOCAL_INSTANCE_YAML

    home = Path(os.environ["DAGSTER_HOME"])
    config = hashlib.sha256(LOCAL_INSTANCE_YAML.encode()).hexdigest()[:16]
    stamp = f"dagster {dg.__version__}, dagster.yaml {config}\n"
    ready = home / INSTANCE_READY
    if ready.is_file() and ready.read_text() == stamp:
        return dg.DagsterInstance.get()
    with creating_instance(home.parent), deferred_signals():  # never half-created
        home.mkdir(parents=True, exist_ok=True)
        write_instance_config(home / "dagster.yaml")
        instance = dg.DagsterInstance.get()  # creates or upgrades its databases
        ready.write_text(stamp)
        return instance


# What older versions wrote: replaced by the managed config.
OLD_INSTANCE_YAML = "telemetry:\n  enabled: false\n"


def write_instance_config(path: Path) -> None:
    """The local instance's dagster.yaml (SQLite storage, run monitoring, concurrency
    limits, the automation sensor): written when missing, over what older versions
    wrote, or while its first line still says it is managed; a file of your own stays."""
    from selfimprove_dagster.profiles import LOCAL_INSTANCE_YAML, MANAGED_MARKER

    if path.exists():
        text = path.read_text()
        if text == LOCAL_INSTANCE_YAML:
            return
        if text != OLD_INSTANCE_YAML and not text.startswith(MANAGED_MARKER):
            return
    # Replaced in one step: a process reading it meanwhile sees the old file or the new one.
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(LOCAL_INSTANCE_YAML)
    os.replace(partial, path)


@dataclass
class LoopHandle:
    """One loop of the code location, as the CLI drives it: its names, its resources
    (by group, as its YAML and environment resolved them) and its round store."""

    defs: Any  # the code location's dg.Definitions (every loop)
    loop: Any  # assets.loop.Loop
    resources: dict
    store: RoundStore

    @property
    def name(self) -> str:
        return self.loop.name


def default_loop(loops: dict[str, dict]) -> str:
    """The loop a command acts on without --loop: the one that reads SELFIMPROVE_*
    variables (the demo loop), else the only one."""
    readers = [name for name, info in loops.items() if info.get("env_prefix") == "SELFIMPROVE_"]
    if len(readers) == 1:
        return readers[0]
    if len(loops) == 1:
        return next(iter(loops))
    raise SelfImproveError(
        f"Several loops ({', '.join(loops)}) and none is the default",
        "name one with --loop NAME (`selfimprove loops` lists them)",
    )


def open_loop(name: str | None = None, defs=None) -> LoopHandle:
    """The loop called `name` (default: `default_loop`) of the code location."""
    from selfimprove_dagster.assets import Loop, loops_of
    from selfimprove_dagster.resources.settings import GROUPS

    if defs is None:
        from selfimprove_dagster.definitions import build_definitions

        defs = build_definitions()
    loops = loops_of(defs)
    if not loops:
        raise SelfImproveError(
            "The code location defines no loop",
            "add one: `dg scaffold defs selfimprove_dagster.components.SelfImproveLoop NAME`",
        )
    name = name or default_loop(loops)
    if name not in loops:
        raise SelfImproveError(
            f"No loop named `{name}`", f"use one of: {', '.join(loops)} (`selfimprove loops`)"
        )
    loop = Loop(name)
    resources = {group: defs.resources[loop.resource_key(group)] for group in GROUPS}
    return LoopHandle(defs, loop, resources, resources["storage"].store())


def dagster_record(handle: LoopHandle, instance=None):
    """The instance's record of one loop's rounds, read against the code location
    (`instance`: one already open, else DAGSTER_HOME's; opening one costs a few tenths
    of a second of storage checks)."""
    import dagster as dg

    from selfimprove_dagster.assets.record import DagsterRecord, RoundGraph

    graph = RoundGraph.of(handle.defs.get_repository_def(), handle.loop)
    instance = instance or dg.DagsterInstance.get()
    return DagsterRecord(instance, graph, handle.store.chain_problem)


def gate_summary(state) -> str:
    """A round's gates column: "ok (n)", the failed ones, or why it is stale."""
    bad = [*state.failed_gates, *(f"{name} (not run)" for name in state.unrun_gates)]
    if bad:
        return "failed: " + ", ".join(bad)
    if state.newer:
        return "stale: re-materialized since: " + ", ".join(state.newer)
    if state.chain_problem:
        return "stale: " + state.chain_problem
    return "ok"


def status_rows(handle: LoopHandle, record=None) -> list[dict]:
    """Per round with a recorded eval_scores: kept samples, held-out accuracy before ->
    after, pass@k, its gates; the promoted round among the done ones. Read from small
    per-round records only (the eval_scores row, the pointers' row counts, the first
    generation's temperature), never from the big tables."""
    from selfimprove_dagster.evolution import promotion
    from selfimprove_dagster.sources.mix import prompt_status

    store = handle.store
    record = record or dagster_record(handle)
    states = {key: record.round(key) for key in record.rounds()}
    recorded = [key for key, state in states.items() if state.materialized]
    scores = {row["round"]: row for row in store.eval_history(recorded).iter_rows(named=True)}
    done = [key for key in recorded if states[key].done]
    promoted = promotion(store.eval_history(done)).round
    rows = []
    for key in recorded:
        row = scores[key]
        policy = row["policy"]
        temperature = store.first_value(key, "generations", "temperature")
        rows.append(
            {
                "round": key,
                "kept": store.row_count(key, "filtered"),
                "accuracy_before": row["accuracy_before"],
                "accuracy_after": row["accuracy_after"],
                "pass_at_k": row["pass_at_k"],
                "k": row["k"],
                "policy": Path(policy).name if "/" in policy else policy,
                "temperature": float(temperature) if temperature is not None else float("nan"),
                "balance_score": row.get("balance_score"),
                "method": row.get("method") or "star",
                "promoted": key == promoted,
                "done": states[key].done,
                "gates": gate_summary(states[key]),
                **prompt_status(store, key),  # curriculum band, synthesized prompts
            }
        )
    return rows


def format_status(rows: list[dict]) -> str:
    if not rows:
        return "No completed rounds yet. Run `selfimprove run --rounds 3`."

    def percent(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}%"

    # Prompt-source columns only when a round has them (curriculum band, synthesized).
    bands = any(r.get("band") is not None for r in rows)
    synth = any(r.get("synthesized") is not None for r in rows)
    methods = any(r.get("method", "star") != "star" for r in rows)
    lines = [
        f"{'round':<10} {'policy':<30} {'T':>4} {'kept':>5} {'acc before':>10} "
        f"{'acc after':>10} {'pass@k':>8} {'promoted':>8}"
        + (f" {'band (solve rate)':>17}" if bands else "")
        + (f" {'synth':>5}" if synth else "")
        + (f" {'method':<28}" if methods else "")
        + "  gates"
    ]
    for r in rows:
        kept = "-" if r["kept"] is None else str(r["kept"])
        band = "-" if r.get("band") is None else str(r["band"])
        if r.get("band_solve_rate") is not None:
            band += f" ({r['band_solve_rate']:.2f})"
        synthesized = "-" if r.get("synthesized") is None else str(r["synthesized"])
        lines.append(
            f"{r['round']:<10} {r['policy'][:30]:<30} {r['temperature']:>4.2g} {kept:>5} "
            f"{percent(r['accuracy_before']):>10} {percent(r['accuracy_after']):>10} "
            f"{percent(r['pass_at_k']):>8} {'*' if r['promoted'] else '':>8}"
            + (f" {band:>17}" if bands else "")
            + (f" {synthesized:>5}" if synth else "")
            + (f" {r.get('method', 'star'):<28}" if methods else "")
            + f"  {r['gates']}"
        )
    return "\n".join(lines)


def run_rounds(loop: str | None, rounds: int, rerun_changed: bool = False) -> int:
    """Materialize round_000..round_{rounds-1} of a loop through its round job (skips
    done rounds). Nothing is written to the data dir before the loop's settings pass
    `preflight`. SIGINT, SIGTERM and SIGHUP stop it with one line on stderr and exit code
    128 + the signal's number (130, 143, 129); the traces go to the Dagster run's log."""
    from selfimprove_dagster.engines.pool import POOL
    from selfimprove_dagster.interrupts import Interrupted, SignalWitness, signal_name

    with SignalWitness(quiet=True) as signals:
        try:
            handle = open_loop(loop)
            preflight(handle)
            instance = open_instance()
            for line in mark_orphaned_runs(instance):
                print(f"marked failed: {line}", file=sys.stderr)
            return _run_rounds(handle, rounds, signals, rerun_changed, instance)
        except Interrupted as stop:
            print(
                f"interrupted ({signal_name(stop.signum)}) before any round started; nothing "
                "was run: `selfimprove run` starts where it would have",
                file=signals.stderr,
            )
            return stop.exit_code
        finally:
            POOL.release()  # the engine kept across steps and rounds, before interpreter exit


def round_to_run(record, key: str) -> str | None:
    """Why `key` must (re)run, or None when it is done and its checkpoint chain verifies
    (a re-materialized parent breaks the chain of every later round: they run again)."""
    if key not in record.rounds():
        return "not started"
    state = record.round(key)
    if not state.done:
        return state.problem() or "not done"
    return None


def refuse_if_running(instance, handle: LoopHandle, key: str) -> None:
    """A second run of a round that is being materialized is refused."""
    from selfimprove_dagster.assets.record import unfinished_round_runs

    running = unfinished_round_runs(instance, handle.loop, key)
    if running:
        run = running[0]
        raise SelfImproveError(
            f"{key} is already being materialized by run {run.run_id[:8]} "
            f"({run.status.value}); a second run would write the same round",
            "wait for it to finish (`selfimprove status`, or Runs in the UI) or terminate "
            "it in the UI; a run whose process died is marked failed by the next "
            "`selfimprove` command",
        )


def settings_fingerprint(handle: LoopHandle) -> str:
    """The fingerprint of the loop's resolved settings (`resources.settings`): what a
    run of it launched here resolves, and records on every table it writes."""
    from selfimprove_dagster.resources.settings import settings_fingerprint as fingerprint

    return fingerprint(handle.resources)


def steps_to_run(handle: LoopHandle, record, key: str, settings: str) -> list | None:
    """The asset keys a new run of `key` must materialize: after a failed or killed run,
    the steps whose tables are still current (same settings, built on the current
    parent, gates passed: `DagsterRecord.resume_point`) are kept and the round resumes
    at the first one that is not; None runs the whole round."""
    from selfimprove_dagster.assets.record import round_steps

    steps = round_steps(handle.defs.assets, handle.loop)
    start = record.resume_point(key, steps, settings)
    if start == 0 or start == len(steps):  # nothing to keep, or nothing left: run it all
        return None
    kept = ", ".join(step.name for step in steps[:start])
    print(f"{key}: resuming at `{steps[start].name}` ({kept}: current, not run again)")
    return [asset_key for step in steps[start:] for asset_key in step.keys]


def _run_rounds(
    handle: LoopHandle, rounds: int, signals=None, rerun_changed: bool = False, instance=None
) -> int:
    """Run the rounds that are not done, in order; each under the round's claim (a lock in
    the loop's data dir that the kernel releases when this process dies), so of several
    `selfimprove run` started at once exactly one runs a round and the others are refused
    with one line (or, arriving after it finished, find it done). `signals`: the
    `SignalWitness` of `run_rounds` (a signal stops the round with one line); `instance`:
    the open instance (default: DAGSTER_HOME's)."""
    from selfimprove_dagster.interrupts import Interrupted
    from selfimprove_dagster.locking import claim_round

    record = dagster_record(handle, instance)
    instance = record.instance
    settings = settings_fingerprint(handle)
    key = round_key(0)
    try:
        for index in range(rounds):
            key = round_key(index)
            if round_to_run(record, key) is None and not rerun_changed:
                skip_done_round(handle, record, key)  # no claim needed: nothing to do
                continue
            with claim_round(handle.store.data_dir, handle.name, key, "selfimprove run"):
                # Read again under the claim: a run that held it a moment ago may have
                # finished the round.
                record = dagster_record(handle, instance)
                code = _run_round(handle, record, key, settings, signals, rerun_changed)
            if code is not None:  # failed, or interrupted during its run (reported)
                return code
            if signals is not None and signals.first is not None:  # came after the run
                return report_interrupt(handle, instance, key, signals.first, None, signals)
            record = dagster_record(handle, instance)  # a fresh read of what the run recorded
        print("\nRounds so far:\n" + format_status(status_rows(handle, record)), flush=True)
    except Interrupted as stop:  # a signal outside a run's execution
        return report_interrupt(handle, instance, key, stop.signum, None, signals)
    return 0


def _run_round(handle: LoopHandle, record, key: str, settings: str, signals, rerun_changed):
    """One round under its claim: skipped when done, refused when a run launched
    elsewhere (the UI, a sensor) is materializing it, else run (resuming a failed run at
    its first step that is not current). None when done or skipped; else the exit code."""
    from selfimprove_dagster.assets.loop import LOOP_TAG

    why = round_to_run(record, key)
    if why is None:
        changed = settings_change(handle, record, key)
        if not (rerun_changed and changed):
            skip_done_round(handle, record, key)
            return None
        why = f"its settings changed: {changed}"
    instance = record.instance
    refuse_if_running(instance, handle, key)
    partitions = handle.loop.partitions.name
    if not instance.has_dynamic_partition(partitions, key):
        instance.add_dynamic_partitions(partitions, [key])
    reason = "" if why == "not started" else f" again ({why})"
    print(f"{key}: running{reason} (Dagster run log: `make ui`)", flush=True)
    selection = steps_to_run(handle, record, key, settings) if why != "not started" else None
    result = handle.defs.resolve_job_def(handle.loop.job_name).execute_in_process(
        partition_key=key,
        instance=instance,
        raise_on_error=False,
        run_config={"loggers": {"console": {"config": {"log_level": "INFO"}}}},
        # The code location's repository label: the run shows in the job's Runs tab
        # and the Overview timeline of the UI, like a run launched there.
        tags={LOOP_TAG: handle.name, REPOSITORY_TAG: REPOSITORY_LABEL},
        asset_selection=selection,
    )
    signum = signals.first if signals is not None else None
    if signum is not None:
        return report_interrupt(handle, instance, key, signum, result, signals)
    if not result.success:
        print(f"{key} failed: {run_failure_message(result)}", file=sys.stderr)
        return 1
    refresh_policy(handle, instance)
    rows = status_rows(handle, dagster_record(handle, instance))
    print(format_status([r for r in rows if r["round"] == key]))
    return None


def settings_change(handle: LoopHandle, record, key: str) -> str | None:
    """How the loop's settings now differ from those the round's eval_scores was written
    with (None: the same), e.g. "task.n_train = 100 (default 200); then: the defaults"."""
    from selfimprove_dagster.assets.loop import CHANGES_KEY
    from selfimprove_dagster.assets.record import written_with
    from selfimprove_dagster.resources.settings import settings_changes

    latest = record.latest(handle.loop.key("eval_scores"), key)
    then = written_with(latest) if latest is not None else None
    if then is None or then == settings_fingerprint(handle):
        return None  # unrecorded (written before settings were recorded), or the same
    recorded = latest.asset_materialization.metadata.get(CHANGES_KEY)
    text = str(getattr(recorded, "value", recorded or ""))
    before = {line.removeprefix("- ") for line in text.splitlines()} - {"(all defaults)"}
    now = set(settings_changes(handle.resources))
    added, removed = sorted(now - before), sorted(before - now)
    return f"now {'; '.join(added) or 'the defaults'}, then {'; '.join(removed) or 'the defaults'}"


def skip_done_round(handle: LoopHandle, record, key: str) -> None:
    """A done round is kept as recorded; when it ran with other settings than these,
    say so and how to run it again with these."""
    from selfimprove_dagster.store.storage import round_index

    changed = settings_change(handle, record, key)
    if changed is None:
        print(f"{key}: already complete, skipping")
        return
    rounds = round_index(key) + 1
    print(
        f"{key}: already complete with other settings ({changed}), kept as it is; to run "
        f"it again with these settings: `selfimprove run --loop {handle.name} --rounds "
        f"{rounds} --rerun-changed` (later rounds run again if its checkpoint changes)",
        flush=True,
    )


def report_interrupt(handle: LoopHandle, instance, key: str, signum: int, result, signals) -> int:
    """A signal stopped round `key`: one line (where it stopped, where `selfimprove run`
    resumes), the reason recorded on the run, and the exit code 128 + signum."""
    from selfimprove_dagster.interrupts import exit_code, signal_name

    record = dagster_record(handle, instance)
    step = interrupted_step(result) if result is not None else None
    if step is not None:
        where = f"during `{step}` of {key}"
    elif round_to_run(record, key) is None:
        where = f"after {key} finished"
    else:
        where = f"in {key}, outside its steps"
    resume = resume_point_text(handle, record, key)
    line = f"interrupted ({signal_name(signum)}) {where}; `selfimprove run` resumes at {resume}"
    if result is not None:
        record_interrupt(instance, result.run_id, line)
        line += f" (run {result.run_id[:8]}: its log has the details)"
    with contextlib.suppress(OSError):  # SIGHUP: the terminal may be gone
        print(line, file=signals.stderr if signals is not None else sys.stderr, flush=True)
    return exit_code(signum)


def interrupted_step(result) -> str | None:
    """The step a run was in when it was interrupted: the last one that started and did
    not succeed."""
    started, finished = [], set()
    for event in result.all_events:
        if event.event_type_value == "STEP_START":
            started.append(event.step_key)
        elif event.event_type_value == "STEP_SUCCESS":
            finished.add(event.step_key)
    running = [step for step in started if step not in finished]
    return running[-1] if running else None


def resume_point_text(handle: LoopHandle, record, key: str) -> str:
    """Where the next `selfimprove run` starts, as `steps_to_run` will decide it."""
    from selfimprove_dagster.assets.record import round_steps
    from selfimprove_dagster.store.storage import round_index

    if round_to_run(record, key) is None:
        return round_key(round_index(key) + 1)
    steps = round_steps(handle.defs.assets, handle.loop)
    settings = settings_fingerprint(handle)
    start = record.resume_point(key, steps, settings) if key in record.rounds() else 0
    if 0 < start < len(steps):
        return f"`{steps[start].name}` of {key}"
    return f"the start of {key}"


def record_interrupt(instance, run_id: str, reason: str) -> None:
    """The run's record says why it stopped: a run Dagster left unfinished is marked
    canceled with the reason; a finished one (failed by Dagster's own interrupt handling)
    gets the reason as an engine event in its log."""
    run = instance.get_run_by_id(run_id)
    if run is None:
        return
    if run.is_finished:
        instance.report_engine_event(reason, run)
    else:
        instance.report_run_canceled(run, message=reason)


def refresh_policy(handle: LoopHandle, instance) -> None:
    """Materialize the loop's `promoted_policy` and `history`, then `experiments`, after
    a round (in the UI the automation sensors do; here nothing else would)."""
    jobs = [handle.loop.policy_job_name]
    if "experiments_job" in {job.name for job in handle.defs.jobs}:
        jobs.append("experiments_job")
    for name in jobs:
        result = handle.defs.resolve_job_def(name).execute_in_process(
            instance=instance, raise_on_error=False
        )
        if not result.success:
            print(f"{name} failed: {run_failure_message(result)}", file=sys.stderr)
            continue
        for event in result.get_asset_materialization_events():
            materialization = event.step_materialization_data.materialization
            if materialization.asset_key.path[-1] == "promoted_policy":
                print(f"promoted policy: {materialization.metadata['reason'].value}", flush=True)


# --- runs whose process died ------------------------------------------------------------


def mark_orphaned_runs(instance=None) -> list[str]:
    """Mark runs that are STARTED (or CANCELING) in the instance but whose run-worker
    process is gone (killed, crashed, machine rebooted) as failed, with the reason, so
    the UI and the sensor stop waiting for them. One line per run marked.

    The run worker's pid is the one recorded with its RUN_START event; a process that
    no longer exists, or a zombie, is gone. Local instance only: under the cluster
    profile runs live in other pods (the K8s run launcher's run monitoring covers them).
    """
    import dagster as dg

    from selfimprove_dagster.profiles import active_profile

    if active_profile().name == "cluster":
        return []
    instance = instance or dg.DagsterInstance.get()
    statuses = [dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]
    marked = []
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=statuses)):
        pid = run_worker_pid(instance, run.run_id)
        if pid is None or process_alive(pid):
            continue
        # Read again now that its process is known gone: it may have finished the run
        # (and exited) since the list was read; a dead process changes nothing any more.
        run = instance.get_run_by_id(run.run_id)
        if run is None or run.status not in statuses:
            continue
        where = run.tags.get("dagster/partition", "no partition")
        reason = (
            f"The run worker process (pid {pid}) is gone: it was killed or crashed while the "
            f"run was {run.status.value}. Marked failed by `selfimprove`; re-run {where} "
            "(`selfimprove run` or the UI)."
        )
        instance.report_run_failed(run, message=reason)
        # Its pool slots (the `model` pool) go back now, not when the daemon next looks.
        storage = instance.event_log_storage
        if storage.supports_global_concurrency_limits:
            storage.free_concurrency_slots_for_run(run.run_id)
        marked.append(f"run {run.run_id[:8]} of {run.job_name} ({where}): {reason}")
    return marked


def run_worker_pid(instance, run_id: str) -> int | None:
    """The pid of the process that started the run (its RUN_START event), if recorded."""
    import dagster as dg

    records = instance.get_records_for_run(
        run_id, of_type=dg.DagsterEventType.RUN_START, limit=1
    ).records
    event = records[0].event_log_entry.dagster_event if records else None
    return event.pid if event is not None else None


def process_alive(pid: int) -> bool:
    """The process exists on this machine and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): trust kill(0)
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def preflight(handle: LoopHandle) -> None:
    """Fail before any run starts on a recipe that cannot work (bad dataset, unknown
    model, engine or trainer setting): one message, nothing materialized."""
    from selfimprove_dagster.engines import ENGINES
    from selfimprove_dagster.models import validate_model_ref

    resources, store = handle.resources, handle.store
    resources["task"].problems()
    generator, trainer = resources["generator"], resources["trainer"]
    validate_model_ref(generator.base_model, store.models_dir)
    if generator.engine not in ENGINES:
        raise SelfImproveError(
            f"Unknown generation engine `{generator.engine}`", f"use one of: {', '.join(ENGINES)}"
        )
    trainer.trained_from(generator.base_model, generator.base_model)  # checks `init`
    resources["method"].recipe()  # checks `method`


def run_failure_message(result) -> str:
    """The user-facing reason a round failed: a failed gate, or a SelfImproveError."""
    from dagster import AssetCheckSeverity

    for evaluation in result.get_asset_check_evaluations():
        if not evaluation.passed and evaluation.severity == AssetCheckSeverity.ERROR:
            return f"gate {evaluation.check_name} failed: {evaluation.description}"
    for event in result.all_events:
        if event.is_step_failure:
            error = event.step_failure_data.error
            while error.cause is not None and "Fix:" not in error.message:
                error = error.cause
            if "Fix:" in error.message:
                return error.message.strip().splitlines()[-1]
            return error.to_string()
    return "the run failed; see the Dagster run log (`make ui`)"


def show_lineage(store: RoundStore, target: str, limit: int, as_json: bool) -> str:
    from selfimprove_dagster.store import lineage
    from selfimprove_dagster.store.storage import ROUND_PATTERN

    if ROUND_PATTERN.match(target):
        # Text shows `limit` rows (and how many there are): a million-row round is one id
        # join, not every row's text. JSON lists them all.
        found = lineage.checkpoint_lineage(store, target, None if as_json else limit)
        if as_json:
            return json.dumps(found, indent=2, default=str)
        ckpt, rows = found["checkpoint"], found["trained_on"]
        lines = [
            f"checkpoint {ckpt['path']}",
            f"  trained from {ckpt['trained_from']} (policy {ckpt['policy']})",
            f"  {ckpt['train_examples']} examples, content hash {ckpt['content_hash'][:16]}, "
            f"{ckpt['optimizer_steps']} steps, final loss {ckpt['final_loss']:.4f}",
            f"trained on {found['trained_on_count']} filtered rows (first {len(rows[:limit])}):",
            f"  {'generation_id':<17} {'round':<10} {'T':>4}  {'policy':<12} completion",
        ]
        for r in rows[:limit]:
            policy = Path(r["policy"]).name if "/" in r["policy"] else r["policy"]
            lines.append(
                f"  {r['generation_id']:<17} {r['round']:<10} {r['temperature']:>4.2g}  "
                f"{policy[:12]:<12} {r['completion'][:40]!r}"
            )
        return "\n".join(lines)
    found = lineage.generation_lineage(store, target)
    if as_json:
        return json.dumps(found, indent=2, default=str)
    g, kept, refined = found["generation"], found["trained_into"], found["refinement"]
    verdicts = ", ".join(
        f"{c['critic']}: {c['verdict']} ({c['reason']})" for c in found["critiques"]
    )
    refinement = (
        [
            f"  refined into {refined['generation_id']} after feedback "
            f"({refined['feedback_source']}): {refined['feedback'][:60]!r}",
            f"  refined completion: {refined['completion']!r}",
        ]
        if refined
        else []
    )
    return "\n".join(
        [
            f"generation {g['generation_id']} of {g['round']} (policy {g['policy']}, "
            f"T={g['temperature']:g})",
            f"  prompt: {g['prompt']!r}",
            f"  completion: {g['completion']!r}",
            *refinement,
            f"  critiques: {verdicts or 'none'}",
            f"  trained into: {kept['checkpoint'] if kept else 'not kept'}",
            f"  descendant rounds: {', '.join(found['descendant_rounds']) or 'none'}",
        ]
    )


def start_ui(port: int) -> int:
    """`dagster dev` on 127.0.0.1 over the instance in DAGSTER_HOME (set by `use_data_dir`).

    `dagster dev` runs in a process group of its own; SIGTERM and SIGINT sent to this
    process are passed on to that whole group (webserver, daemon, code servers), and
    whatever is left of it when `dagster dev` exits is stopped, so a service manager or
    a script that stops `selfimprove ui` stops the UI.
    """
    repo = Path(__file__).resolve().parents[1]
    dagster = Path(sys.executable).with_name("dagster")  # the venv's, even if not on PATH
    command = [str(dagster if dagster.exists() else "dagster"), "dev", "-h", "127.0.0.1"]
    command += ["-p", str(port)]
    if (repo / "workspace.yaml").is_file():
        command += ["-w", str(repo / "workspace.yaml")]
    else:
        command += ["-m", "selfimprove_dagster.definitions"]
    process = subprocess.Popen(command, cwd=repo, start_new_session=True)

    def forward(signum: int, _frame) -> None:
        signal_group(process.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop_group(process.pid)


def signal_group(pgid: int, signum: int) -> None:
    """Send `signum` to a process group (ignored when the group is gone)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)


def stop_group(pgid: int, grace: float = 20.0) -> None:
    """Stop what is left of a process group: SIGTERM, then SIGKILL after `grace` seconds."""
    signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    signal_group(pgid, signal.SIGKILL)


def format_loops(defs) -> str:
    """`selfimprove loops`: one line per loop: name, method, task, base model, data dir."""
    from selfimprove_dagster.assets import loops_of

    loops = loops_of(defs)
    default = default_loop(loops) if loops else None
    lines = [f"{'loop':<16} {'method':<18} {'task':<20} {'base model':<32} data dir"]
    for name, info in loops.items():
        mark = "*" if name == default else " "
        lines.append(
            f"{name + mark:<16} {info['method']:<18} {str(info['task'])[:20]:<20} "
            f"{str(info['base_model'])[:32]:<32} {info['data_dir']}"
        )
    return "\n".join([*lines, "(* the default: commands without --loop act on it)"])


def collect_garbage(store: RoundStore, dry_run: bool) -> str:
    """`selfimprove gc`: old versions (tables and checkpoints) and dead writers' temporary
    folders; the current version of every round is never touched."""
    paths = store.collect_garbage(dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    lines = [f"{verb} {path.relative_to(store.data_dir)}" for path in paths]
    return "\n".join([*lines, f"{verb} {len(paths)} old version(s)"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="selfimprove", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir", default=os.environ.get("SELFIMPROVE_DATA_DIR", "var"), help="data dir"
    )
    # --data-dir and --loop also work after the command (`selfimprove run --loop x`).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", default=argparse.SUPPRESS, help="data dir")
    common.add_argument(
        "--loop", default=argparse.SUPPRESS, help="the loop (default: the demo loop)"
    )
    parser.add_argument("--loop", default=None, help="the loop (`selfimprove loops` lists them)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("loops", parents=[common], help="the loops of the code location")
    run = commands.add_parser("run", parents=[common], help="materialize rounds through Dagster")
    run.add_argument("--rounds", type=int, default=3, help="rounds to have completed")
    run.add_argument(
        "--rerun-changed",
        action="store_true",
        help="run again the done rounds that ran with other settings than these",
    )
    status = commands.add_parser("status", parents=[common], help="one line per completed round")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    lineage = commands.add_parser(
        "lineage", parents=[common], help="what a checkpoint was trained on / a generation's fate"
    )
    lineage.add_argument("target", help="a round key (its checkpoint) or a generation_id")
    lineage.add_argument("--limit", type=int, default=10, help="rows to print (text mode)")
    lineage.add_argument("--json", action="store_true", help="machine-readable output")
    ui = commands.add_parser("ui", parents=[common], help="dagster dev on 127.0.0.1")
    ui.add_argument("--port", type=int, default=3000)
    gc = commands.add_parser(
        "gc", parents=[common], help="delete table and checkpoint versions that are not current"
    )
    gc.add_argument("--dry-run", action="store_true", help="list what would be deleted")
    args = parser.parse_args(argv)

    # The instance is created by the commands that read it, once past their checks: a
    # refused `run` leaves no dagster_home/ behind.
    use_data_dir(args.data_dir, create=False)
    try:
        if args.command == "run":
            return run_rounds(args.loop, args.rounds, args.rerun_changed)
        if args.command in ("status", "ui"):
            open_instance()
            for line in mark_orphaned_runs():
                print(f"marked failed: {line}", file=sys.stderr)
        if args.command == "ui":
            return start_ui(args.port)
        if args.command == "loops":
            from selfimprove_dagster.definitions import build_definitions

            print(format_loops(build_definitions()))
            return 0
        handle = open_loop(args.loop)
        if args.command == "status":
            rows = status_rows(handle)
            print(json.dumps(rows, indent=2) if args.json else format_status(rows))
            return 0
        if args.command == "lineage":
            print(show_lineage(handle.store, args.target, args.limit, args.json))
            return 0
        if args.command == "gc":
            print(collect_garbage(handle.store, args.dry_run))
            return 0
    except SelfImproveError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
