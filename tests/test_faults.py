"""Faults of `selfimprove run` in real processes: several started at the same instant on
one round (fresh and existing data dir), a run launched elsewhere while it holds the
round, and SIGINT / SIGTERM / SIGHUP, to the process and to its whole process group.

The loop is a stand-in with the real CLI around it: `demo`, three steps (prompts ->
checkpoint -> eval_scores) that publish through the real round store and record what
they read, so "every table and checkpoint published once, by the run that holds the
round, each step reading its own run's versions" is checked on the files and on
Dagster's record. A driver process imports everything once and forks the `selfimprove`
processes (`cli.main`, as the console script runs it), so twenty rounds of N processes
released at one instant fit in a test; one signal test starts a fresh interpreter. Data
dirs live on tmpfs where there is one (SQLite's fsyncs cost nothing there).

Then the locks on their own (a SIGKILLed holder lets go; a mount without flock) and the
messages of the small things (a done round whose settings changed, n_train beyond the
task, a dataset of one repeated prompt).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import dagster as dg
import pytest

from selfimprove_dagster import cli
from selfimprove_dagster.assets.loop import Loop
from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.resources import TaskResource
from selfimprove_dagster.sources.tasks import load_dataset_file, make_task
from selfimprove_dagster.store.storage import RoundStore, round_key
from tests.conftest import loop_handle, stand_in_loop

REPO = Path(__file__).resolve().parents[1]
N = 3  # processes started at once per race
REPEATS = 20  # races in the repeat test: FRESH on fresh data dirs, the rest on one existing
FRESH = 4  # (a fresh data dir costs its instance's creation, seconds on busy cores)

# The stand-in loop and the driver that forks `selfimprove` processes from a spec:
# {"batches": [[child, ...], ...]}; a batch starts when the previous one has exited.
# A child: {"name", "argv" (cli.main's) or "ui" ([data_dir, round]: the round job run as
# a run worker of the UI would), "env", "setsid", "barrier" (released with the others of
# its batch at one instant), "after" (a file to wait for)}. Each writes <out>/<name>.log
# and, when done, <out>/<name>.rc. Prints {"batch", "pids"} after forking a batch. With
# "warm_up", the driver first imports what a run imports lazily (`warm_up`).
DRIVER = textwrap.dedent(
    """
    import json, os, subprocess, sys, time, warnings
    from pathlib import Path
    warnings.simplefilter("ignore")

    import dagster as dg
    from selfimprove_dagster import cli, definitions
    from selfimprove_dagster.assets.loop import Loop, LoopSpec
    from selfimprove_dagster.assets.rounds import LOOP_METADATA_PREFIX, loop_info
    from selfimprove_dagster.resources import StorageResource
    from selfimprove_dagster.resources.settings import GROUPS
    from selfimprove_dagster.store.storage import RoundStore

    LOOP = Loop("demo")

    class Store(RoundStore):
        def chain_problem(self, round_):
            return None  # stand-in checkpoints carry no adapter to verify

    class Storage(StorageResource):
        def store(self):
            return Store(Path(self.data_dir).resolve())

    def pause(step, context):
        marker = Path(os.environ["SELFIMPROVE_DATA_DIR"]) / f"hanging-{step}"
        if os.environ.get("FAULTS_HANG"):  # a progress line before the signal comes
            context.log.info(f"stand-in {step} started")
        if os.environ.get("FAULTS_HANG") == step:
            child = subprocess.Popen(["sleep", "60"])  # a child in the process group
            marker.write_text(json.dumps({"pid": os.getpid(), "child": child.pid}))
            try:
                child.wait()
            finally:  # a step stopped half way does not leave its children behind
                child.kill()
                child.wait()
        time.sleep(float(os.environ.get("FAULTS_SLEEP", "0.05")))

    def stand_in(table, *deps):
        return dg.asset(key=LOOP.key(table), deps=[LOOP.key(d) for d in deps],
                        partitions_def=LOOP.partitions,
                        required_resource_keys=LOOP.resource_keys())

    @stand_in("prompts")
    def prompts(context):
        import polars as pl
        step = LOOP.step(context)
        pause("prompts", context)
        frame = pl.DataFrame({"run_id": [context.run.run_id], "pid": [os.getpid()]})
        step.store.publish(step.round, "prompts", {"prompts": frame}, context.run.run_id)
        return dg.MaterializeResult(metadata=step.settings_metadata())

    @stand_in("checkpoint", "prompts")
    def checkpoint(context):
        step = LOOP.step(context)
        pause("checkpoint", context)
        read = step.store.read(step.round, "prompts")  # what this step trains on
        staging = step.store.checkpoint_staging(step.round)
        manifest = {"run_id": context.run.run_id, "prompts_run_id": read["run_id"][0]}
        (staging / "manifest.json").write_text(json.dumps(manifest))
        step.store.publish_checkpoint(step.round, staging, context.run.run_id)
        return dg.MaterializeResult(metadata=step.settings_metadata())

    @stand_in("eval_scores", "checkpoint")
    def eval_scores(context):
        import polars as pl
        step = LOOP.step(context)
        pause("eval_scores", context)
        read = json.loads((step.store.checkpoint_dir(step.round) / "manifest.json").read_text())
        row = {"round": step.round, "run_id": context.run.run_id,
               "checkpoint_run_id": read["run_id"]}
        step.store.write(step.round, "eval_scores", pl.DataFrame([row]))
        return dg.MaterializeResult(metadata=step.settings_metadata())

    def build_definitions():
        resources = {group: cls() for group, cls in GROUPS.items()}
        resources["storage"] = Storage(data_dir=os.environ["SELFIMPROVE_DATA_DIR"])
        spec = LoopSpec("demo", resources, env_prefix="SELFIMPROVE_")
        steps = [prompts, checkpoint, eval_scores]
        return dg.Definitions(
            assets=steps,
            jobs=[dg.define_asset_job(LOOP.job_name, selection=steps)],
            resources=Loop.of(spec).resources(),
            metadata={LOOP_METADATA_PREFIX + "demo": loop_info(spec)},
        )

    definitions.build_definitions = build_definitions
    cli.status_rows = lambda handle, record=None: []  # reads a real round's tables
    cli.refresh_policy = lambda handle, instance: None  # no policy assets here

    def ui_run(data_dir, round_):
        # What a run worker does for a run launched from the UI or by a sensor.
        cli.use_data_dir(data_dir)
        instance = dg.DagsterInstance.get()
        if not instance.has_dynamic_partition(LOOP.partitions.name, round_):
            instance.add_dynamic_partitions(LOOP.partitions.name, [round_])
        result = build_definitions().resolve_job_def(LOOP.job_name).execute_in_process(
            partition_key=round_, instance=instance, raise_on_error=False)
        print(cli.run_failure_message(result) if not result.success else "success")
        return 0 if result.success else 1

    def child(spec, out, barrier):
        if spec.get("setsid"):
            os.setsid()
        os.environ.update(spec.get("env", {}))
        if spec.get("barrier"):
            os.read(barrier, 1)  # returns when the driver closes the write end
        while spec.get("after") and not Path(spec["after"]).exists():
            time.sleep(0.05)
        log = os.open(f"{out}/{spec['name']}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(log, 1)
        os.dup2(log, 2)
        try:
            rc = ui_run(*spec["ui"]) if "ui" in spec else cli.main(spec["argv"])
        except BaseException:
            import traceback
            traceback.print_exc()
            rc = 99
        sys.stdout.flush()
        sys.stderr.flush()
        Path(f"{out}/{spec['name']}.rc").write_text(str(rc))
        os._exit(rc)

    def warm_up(out):
        # A first run imports hundreds of modules lazily (sqlalchemy, alembic, rich...): a
        # scout child runs one in a throwaway data dir and lists them, this process imports
        # them, and no forked process pays for them again.
        import importlib
        listing = Path(out) / "warm-up.json"
        pid = os.fork()
        if pid == 0:
            before = set(sys.modules)
            log = os.open(f"{out}/warm-up.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(log, 1)
            os.dup2(log, 2)
            try:
                cli.main(["--data-dir", f"{out}/warm-up", "run", "--rounds", "1"])
            finally:
                listing.write_text(json.dumps(sorted(set(sys.modules) - before)))
                os._exit(0)
        os.waitpid(pid, 0)
        for name in json.loads(listing.read_text()):
            try:
                importlib.import_module(name)
            except Exception:
                pass

    def main(spec_path):
        spec = json.loads(Path(spec_path).read_text())
        out = spec["out"]
        if spec.get("warm_up"):
            warm_up(out)
        for number, batch in enumerate(spec["batches"]):
            read, write = os.pipe()
            pids = {}
            for child_spec in batch:
                pid = os.fork()
                if pid == 0:
                    os.close(write)
                    child(child_spec, out, read)
                pids[child_spec["name"]] = pid
            os.close(read)
            print(json.dumps({"batch": number, "pids": pids}), flush=True)
            time.sleep(0.1)  # every child is waiting at the barrier
            os.close(write)
            for pid in pids.values():
                os.waitpid(pid, 0)

    if sys.argv[1] == "run":  # one `selfimprove` process of its own
        sys.exit(cli.main(sys.argv[2:]))
    main(sys.argv[1])
    """
)


@pytest.fixture
def fast_tmp(tmp_path) -> Path:
    """A temporary folder on tmpfs where there is one (/dev/shm): the instance's SQLite
    commits then cost no fsync, which halves a round's time on a busy disk; else tmp_path."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    folder = Path(tempfile.mkdtemp(prefix="selfimprove-faults-", dir=shm))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def drivers():
    """Driver processes a test starts: killed at its end if a failed assertion left them."""
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def child_env() -> dict[str, str]:
    """The driver's environment: none of the caller's SELFIMPROVE_* or DAGSTER_HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SELFIMPROVE_", "DAGSTER"))}
    return {**env, "POLARS_ALLOW_FORKING_THREAD": "1", "PYTHONWARNINGS": "ignore"}


def start_driver(out: Path, batches: list[list[dict]], warm_up: bool = False) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    spec = {"out": str(out), "batches": batches, "warm_up": warm_up}
    (out / "spec.json").write_text(json.dumps(spec))
    return subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(out / "spec.json")],
        cwd=REPO,
        env=child_env(),
        stdout=subprocess.PIPE,
        text=True,
    )


def run_driver(out: Path, batches: list[list[dict]], warm_up: bool = False) -> None:
    driver = start_driver(out, batches, warm_up)
    driver.communicate(timeout=300)
    assert driver.returncode == 0


def run_child(name: str, data_dir: Path, rounds: int) -> dict:
    argv = ["--data-dir", str(data_dir), "run", "--rounds", str(rounds)]
    return {"name": name, "argv": argv, "barrier": True}


def outcome(out: Path, name: str) -> tuple[int, str]:
    return int((out / f"{name}.rc").read_text()), (out / f"{name}.log").read_text()


def wait_for(path: Path, timeout: float = 60.0) -> Path:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)
    return path


def instance_of(data_dir: Path):
    return dg.DagsterInstance.from_config(str(data_dir / "dagster_home"))


def runs_of(data_dir: Path, key: str) -> list:
    runs_filter = dg.RunsFilter(job_name="demo_round_job", tags={"dagster/partition": key})
    with instance_of(data_dir) as instance:
        return list(instance.get_runs(filters=runs_filter))


def failures(data_dir: Path, runs: list) -> list[str]:
    """The step failures of `runs`, for an assertion's message."""
    with instance_of(data_dir) as instance:
        return [
            f"run {run.run_id[:8]} {entry.dagster_event.step_failure_data.error.to_string()}"
            for run in runs
            for entry in instance.all_logs(run.run_id)
            if entry.dagster_event is not None and entry.dagster_event.is_step_failure
        ]


# --- one writer per round ---------------------------------------------------------------

REFUSED_BY_CLAIM = "of loop `demo` is being run by another process, pid"
REFUSED_BY_RECORD = "is already being materialized by run"


def check_race(out: Path, data_dir: Path, names: list[str], key: str) -> dict:
    """One round raced by `names`: exactly one ran it; every other one was refused with
    one line or arrived after it was done; each table, the checkpoint and each Dagster
    materialization exists once, and each step read what its own run published."""
    ran, refused, skipped, early = [], [], [], []
    for name in names:
        rc, log = outcome(out, name)
        if f"{key}: running" in log:
            assert rc == 0, log
            ran.append(name)
        elif rc == 2:  # one line, after the lines of the rounds it skipped as done
            lines = [line for line in log.splitlines() if line.strip()]
            assert all(line.endswith(": already complete, skipping") for line in lines[:-1])
            assert lines[-1].startswith(f"error: {key} "), log
            assert REFUSED_BY_CLAIM in lines[-1] or REFUSED_BY_RECORD in lines[-1], log
            refused.append(REFUSED_BY_CLAIM in lines[-1])
            early.append((out / f"{name}.rc").stat().st_mtime)  # when it was done
        else:
            assert rc == 0 and f"{key}: already complete, skipping" in log, log
            skipped.append(name)
    assert len(ran) == 1, {name: outcome(out, name) for name in names}

    runs = runs_of(data_dir, key)
    assert [run.status for run in runs] == [dg.DagsterRunStatus.SUCCESS], failures(data_dir, runs)
    run_id = runs[0].run_id
    store = RoundStore(data_dir)
    for step in ("prompts", "eval_scores"):
        folders = [p for p in (data_dir / "rounds" / key / step).iterdir() if p.is_dir()]
        assert len(folders) == 1, (step, folders)  # published once
    assert len(list(store.checkpoints_dir.glob(f"{key}@*"))) == 1
    with instance_of(data_dir) as instance:
        for table in ("prompts", "checkpoint", "eval_scores"):
            records_filter = dg.AssetRecordsFilter(
                asset_key=dg.AssetKey(["demo", table]), asset_partitions=[key]
            )
            found = instance.fetch_materializations(records_filter, limit=10).records
            assert [r.run_id for r in found] == [run_id], table
    # Lineage: each step read the versions its own run published.
    manifest = json.loads((store.checkpoint_dir(key) / "manifest.json").read_text())
    scores = store.read(key, "eval_scores").row(0, named=True)
    assert store.read(key, "prompts")["run_id"][0] == run_id
    assert manifest == {"run_id": run_id, "prompts_run_id": run_id}
    assert scores["run_id"] == scores["checkpoint_run_id"] == run_id
    # Refused before the winner's run was in the instance: a check of the run record alone
    # (what `selfimprove run` did before the lock) would have let these run the round too.
    with instance_of(data_dir) as instance:
        recorded = min(entry.timestamp for entry in instance.all_logs(run_id))
    return {
        "refused_by_claim": sum(refused),
        "refused_by_record": len(refused) - sum(refused),
        "before_the_record": sum(done < recorded for done in early),
        "skipped": len(skipped),
    }


def test_simultaneous_runs_of_one_round_run_it_once(fast_tmp):
    """N `selfimprove run` released at one instant, REPEATS times: on a fresh data dir each
    (the instance is created by one of them at a time) and on one existing data dir
    (round_000 done, then one new round per race, the others skipped as done)."""
    fresh = FRESH
    existing = fast_tmp / "existing"
    batches = [
        [run_child(f"f{i}-{j}", fast_tmp / f"fresh{i}", 1) for j in range(N)] for i in range(fresh)
    ]
    batches.append([run_child("seed", existing, 1)])
    batches += [
        [run_child(f"e{i}-{j}", existing, i + 2) for j in range(N)] for i in range(REPEATS - fresh)
    ]
    run_driver(fast_tmp / "out", batches, warm_up=True)

    tallies = [
        check_race(fast_tmp / "out", fast_tmp / f"fresh{i}", [f"f{i}-{j}" for j in range(N)],
                   "round_000")
        for i in range(fresh)
    ]  # fmt: skip
    for i in range(REPEATS - fresh):
        names = [f"e{i}-{j}" for j in range(N)]
        tallies.append(check_race(fast_tmp / "out", existing, names, round_key(i + 1)))
        for name in names:  # the rounds before it: done, skipped, never run again
            assert "round_000: already complete, skipping" in outcome(fast_tmp / "out", name)[1]
    assert len(runs_of(existing, "round_000")) == 1
    races = sum(t["refused_by_claim"] + t["refused_by_record"] > 0 for t in tallies)
    blind = sum(t["before_the_record"] > 0 for t in tallies)
    print(
        f"\n{REPEATS} races of {N} processes: {races} provoked a refusal "
        f"({sum(t['refused_by_claim'] for t in tallies)} by the round's lock, "
        f"{sum(t['refused_by_record'] for t in tallies)} by the run record; in {blind} "
        f"races, {sum(t['before_the_record'] for t in tallies)} refusals came before the "
        "winner's run was in the instance), "
        f"{sum(t['skipped'] for t in tallies)} arrived after the round was done"
    )
    # The processes did meet: most races had a loser refused (not just late arrivals).
    assert races >= REPEATS // 2


def test_a_run_launched_elsewhere_stops_while_the_cli_holds_the_round(fast_tmp, drivers):
    """A run of the round job launched from the UI or by a sensor (a run worker executing
    it) while `selfimprove run` holds the round fails at its first step, writing nothing;
    the CLI's run goes on and publishes the round once."""
    data_dir, out = fast_tmp / "var", fast_tmp / "out"
    hanging = data_dir / "hanging-checkpoint"
    cli_run = run_child("cli", data_dir, 1)
    cli_run["env"] = {"FAULTS_HANG": "checkpoint"}
    ui = {"name": "ui", "ui": [str(data_dir), "round_000"], "after": str(hanging)}
    driver = start_driver(out, [[cli_run, ui]])
    drivers.append(driver)
    wait_for(out / "ui.rc")
    rc, log = outcome(out, "ui")
    assert rc == 1
    assert (
        f"round_000 of loop `demo` is being run by another process, pid "
        f"{json.loads(hanging.read_text())['pid']} (selfimprove run, since "
    ) in log
    assert "this step stopped before writing anything" in log
    # Let the CLI's run finish: its step sleeps in a child process.
    os.kill(json.loads(hanging.read_text())["child"], signal.SIGKILL)
    driver.communicate(timeout=60)
    assert outcome(out, "cli")[0] == 0
    prompts = [p for p in (data_dir / "rounds/round_000/prompts").iterdir() if p.is_dir()]
    assert len(prompts) == 1
    assert RoundStore(data_dir).read("round_000", "prompts")["pid"][0] == int(
        json.loads(hanging.read_text())["pid"]
    )


# --- signals ------------------------------------------------------------------------------


def check_interrupted(log: str, rc: int, name: str, step: str, resume: str) -> None:
    """Exit 128 + signum; stderr: the steps' progress lines, then one line; no trace."""
    code = 128 + signal.Signals[name].value
    assert rc == code, log
    assert "Traceback" not in log and "Stack Trace" not in log and "STEP_FAILURE" not in log
    last = log.strip().splitlines()[-1]
    assert last.startswith(
        f"interrupted ({name}) during `{step}` of round_000; `selfimprove run` resumes at "
        f"{resume} (run "
    ), log
    assert sum("interrupted" in line for line in log.splitlines()) == 1


def check_recorded(data_dir: Path, name: str) -> None:
    """The interrupted run (the oldest of the round) is failed in Dagster's record, with
    the one line in its log."""
    run = runs_of(data_dir, "round_000")[-1]
    assert run.status in (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)
    with instance_of(data_dir) as instance:
        messages = [entry.message for entry in instance.all_logs(run.run_id)]
    assert any(m.startswith(f"interrupted ({name}) during ") for m in messages)


def test_a_signal_to_a_fresh_process_stops_it_with_one_line(fast_tmp, drivers):
    """The CLI in an interpreter of its own (no fork): SIGTERM while a step runs."""
    name = "SIGTERM"
    data_dir = fast_tmp / "var"
    env = {**child_env(), "FAULTS_HANG": "checkpoint"}
    argv = ["run", "--data-dir", str(data_dir), "run", "--rounds", "1"]
    process = subprocess.Popen(
        [sys.executable, "-c", DRIVER, *argv],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    drivers.append(process)
    hanging = wait_for(data_dir / "hanging-checkpoint", timeout=120)
    process.send_signal(signal.Signals[name])
    log, _ = process.communicate(timeout=60)
    resume = "`demo__checkpoint` of round_000"
    check_interrupted(log, process.returncode, name, "demo__checkpoint", resume)
    check_recorded(data_dir, name)
    assert not _alive(json.loads(hanging.read_text())["child"])


def test_signals_to_the_process_and_its_group(fast_tmp, drivers):
    """SIGINT, SIGTERM and SIGHUP to the `selfimprove run` process, and SIGINT to its
    whole process group (Ctrl-C in a terminal: the step's child gets it too), each while
    a step runs: one line, exit 130 / 143 / 129, the run failed with the reason in its
    log; the next `selfimprove run` resumes where the line said."""
    cases = {  # name: (signal, to the group, the step it hangs in)
        "int": ("SIGINT", False, "checkpoint"),
        "term": ("SIGTERM", False, "prompts"),
        "hup": ("SIGHUP", False, "eval_scores"),
        "group": ("SIGINT", True, "checkpoint"),
    }
    out = fast_tmp / "out"
    children = []
    for case, (_, group, step) in cases.items():
        child = run_child(case, fast_tmp / case, 1)
        child.update(env={"FAULTS_HANG": step}, setsid=group)
        children.append(child)
    # Then, once they have all stopped: the next run after SIGINT in `checkpoint`.
    again = run_child("again", fast_tmp / "int", 1)
    driver = start_driver(out, [children, [again]])
    drivers.append(driver)
    pids = json.loads(driver.stdout.readline())["pids"]
    for case, (name, group, step) in cases.items():
        hanging = json.loads(wait_for(fast_tmp / case / f"hanging-{step}").read_text())
        if group:
            os.killpg(pids[case], signal.Signals[name])
        else:
            os.kill(pids[case], signal.Signals[name])
    driver.communicate(timeout=120)
    for case, (name, _, step) in cases.items():
        rc, log = outcome(out, case)
        resume = "the start of round_000" if step == "prompts" else f"`demo__{step}` of round_000"
        check_interrupted(log, rc, name, f"demo__{step}", resume)
        check_recorded(fast_tmp / case, name)
        hanging = json.loads((fast_tmp / case / f"hanging-{step}").read_text())
        assert not _alive(hanging["child"])  # signalled with the group, or killed by the step

    # The next run resumes where the line said.
    rc, log = outcome(out, "again")
    assert rc == 0, log
    assert "round_000: resuming at `demo__checkpoint` (demo__prompts: current" in log


def _alive(pid: int) -> bool:
    from selfimprove_dagster.cli import process_alive

    return process_alive(pid)


# --- the locks themselves -----------------------------------------------------------------

HOLD = textwrap.dedent(
    """
    import sys, time
    from selfimprove_dagster.locking import claim_round
    with claim_round(sys.argv[1], "demo", "round_000", "selfimprove run"):
        print("held", flush=True)
        time.sleep(60)
    """
)


def test_a_round_held_by_a_process_is_refused_until_the_kernel_lets_it_go(tmp_path):
    from selfimprove_dagster.locking import check_round_free, claim_round

    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "held"
    with (
        pytest.raises(SelfImproveError) as refused,
        claim_round(tmp_path, "demo", "round_000", "x"),
    ):
        pass
    assert str(refused.value).startswith(
        f"round_000 of loop `demo` is being run by another process, pid {holder.pid} "
        "(selfimprove run, since "
    )
    assert str(refused.value).endswith(f"to stop it instead: `kill {holder.pid}`")
    with pytest.raises(SelfImproveError, match="this step stopped before writing anything"):
        check_round_free(tmp_path, "demo", "round_000", "run 1a2b3c4d")
    holder.kill()  # SIGKILL: no cleanup of its own runs
    holder.wait()
    with claim_round(tmp_path, "demo", "round_000", "selfimprove run"):
        check_round_free(tmp_path, "demo", "round_000", "a step of this process's run")


def test_without_working_file_locks_steps_run_and_the_cli_warns(tmp_path, monkeypatch):
    """A data dir on a mount without flock (ENOLCK): nothing breaks, the CLI says what
    it cannot promise."""
    import errno
    import fcntl

    from selfimprove_dagster.locking import check_round_free, claim_round

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    check_round_free(tmp_path, "demo", "round_000", "run 1a2b3c4d")
    with (
        pytest.warns(UserWarning, match=r"file locks do not work here .*No locks available"),
        claim_round(tmp_path, "demo", "round_000", "selfimprove run"),
    ):
        pass


def test_a_signal_while_the_instance_is_created_waits_until_it_is():
    from selfimprove_dagster.interrupts import Interrupted, SignalWitness, deferred_signals

    finished = []
    with SignalWitness() as signals, pytest.raises(Interrupted) as stopped, deferred_signals():
        signal.raise_signal(signal.SIGTERM)
        finished.append("the block")  # reached: the signal waited
    assert finished == ["the block"]
    assert stopped.value.exit_code == 143 and signals.first == signal.SIGTERM


# --- the small things ----------------------------------------------------------------------

LOOP = Loop("t")
TRAINED_WITH: list[int] = []  # n_train of each run of the stand-in round


@dg.asset(
    partitions_def=LOOP.partitions,
    key=LOOP.key("eval_scores"),
    required_resource_keys=LOOP.resource_keys(),
)
def stand_in_eval_scores(context) -> dg.MaterializeResult:
    step = LOOP.step(context)
    TRAINED_WITH.append(step.settings.task.n_train)
    return dg.MaterializeResult(metadata=step.settings_metadata())


def stand_in_handle(store, **groups) -> cli.LoopHandle:
    """The CLI's handle on a one-step stand-in loop `t` with these settings."""
    job = dg.define_asset_job(LOOP.job_name, selection=[stand_in_eval_scores])
    resources = stand_in_loop(store, **groups).resources()
    defs = dg.Definitions(assets=[stand_in_eval_scores], jobs=[job], resources=resources)
    return loop_handle(defs, store)


def test_a_done_round_that_ran_with_other_settings_says_so_and_how_to_rerun(
    cli_store, monkeypatch, capsys
):
    monkeypatch.setattr(cli, "refresh_policy", lambda handle, instance: None)
    monkeypatch.setattr(sys.modules[__name__], "TRAINED_WITH", [])
    assert cli._run_rounds(stand_in_handle(cli_store), 1) == 0
    changed = stand_in_handle(cli_store, task=TaskResource(n_train=7))
    capsys.readouterr()

    assert cli._run_rounds(changed, 1) == 0
    assert (
        "round_000: already complete with other settings (now task.n_train = 7 (default "
        "200), then the defaults), kept as it is; to run it again with these settings: "
        "`selfimprove run --loop t --rounds 1 --rerun-changed` (later rounds run again if "
        "its checkpoint changes)"
    ) in capsys.readouterr().out
    assert TRAINED_WITH == [200]

    assert cli._run_rounds(changed, 1, rerun_changed=True) == 0
    assert (
        "round_000: running again (its settings changed: now task.n_train = 7 (default "
        "200), then the defaults)"
    ) in capsys.readouterr().out
    assert TRAINED_WITH == [200, 7]
    assert cli._run_rounds(changed, 1, rerun_changed=True) == 0
    assert "round_000: already complete, skipping" in capsys.readouterr().out
    assert TRAINED_WITH == [200, 7]


def test_n_train_beyond_the_task_is_refused_at_once_and_creates_nothing(
    tmp_path, monkeypatch, capsys
):
    """Before: minutes of drawing before failing, and an empty dagster_home/ left."""
    data_dir = tmp_path / "var"
    monkeypatch.setenv("SELFIMPROVE_DATA_DIR", str(data_dir))  # restored after the test
    monkeypatch.setenv("DAGSTER_HOME", str(data_dir / "dagster_home"))
    monkeypatch.setenv("SELFIMPROVE_N_TRAIN", "100000000")
    monkeypatch.delenv("SELFIMPROVE_N_EVAL", raising=False)
    assert cli.main(["--data-dir", str(data_dir), "run", "--rounds", "1"]) == 2
    assert capsys.readouterr().err == (
        "error: task 'addition_2digit' has 8,100 distinct problems; n_train=100,000,000 + "
        "n_eval=200 asks for 100,000,200. Fix: ask for fewer problems (smaller n_train / "
        "n_eval): lower n_train to at most 7,900 with n_eval=200; or load a dataset file "
        "(dataset_path) for more\n"
    )
    assert not data_dir.exists()  # no dagster_home/, nothing else either
    started = time.monotonic()
    with pytest.raises(SelfImproveError, match="has 100 distinct problems"):
        make_task("addition_digits", n_train=90, n_eval=20, seed=0, difficulty=1)
    assert time.monotonic() - started < 1.0


def test_a_dataset_of_one_repeated_prompt_is_told_what_happened(tmp_path):
    path = tmp_path / "one.jsonl"
    path.write_text("".join(json.dumps({"prompt": "What is 2 + 2?", "answer": 4}) + "\n"
                            for _ in range(10)))  # fmt: skip
    with pytest.raises(SelfImproveError) as error:
        load_dataset_file(path, n_train=None, n_eval=4, seed=0)
    assert str(error.value) == (
        f"n_eval=4 but {path} leaves no distinct eval problems (10 rows, 1 distinct prompt): "
        "a row whose prompt repeats an earlier one is dropped, and a prompt in both splits "
        "stays in eval only. Fix: add rows with prompts of their own (the eval split needs "
        "at least one), or give the file a `split` column"
    )
    assert "at most 0" not in str(error.value)
