"""`selfimprove`: run rounds headless, show their status, start the UI.

    selfimprove run --rounds 3      # materialize round_000..round_002 through Dagster
    selfimprove status [--json]     # one line per round: kept, accuracy before -> after
    selfimprove ui                  # dagster dev on 127.0.0.1 over the same instance

Runs go through the persistent Dagster instance under `<data_dir>/dagster_home`, so
rounds started here show in the UI afterwards. Recipe knobs are the resources' fields,
set with `SELFIMPROVE_<FIELD>` environment variables (e.g. SELFIMPROVE_N_TRAIN=100).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.store.storage import RoundStore, round_key

STATUS_COLUMNS = ("round", "kept", "accuracy_before", "accuracy_after", "pass_at_k", "policy")


def use_data_dir(data_dir: str) -> RoundStore:
    """Point the resources and the Dagster instance at `data_dir`."""
    store = RoundStore(Path(data_dir).expanduser().resolve())
    dagster_home = store.data_dir / "dagster_home"
    dagster_home.mkdir(parents=True, exist_ok=True)
    config = dagster_home / "dagster.yaml"
    if not config.exists():  # the default SQLite storage, stated; no telemetry off-machine
        config.write_text("telemetry:\n  enabled: false\n")
    os.environ["SELFIMPROVE_DATA_DIR"] = str(store.data_dir)
    os.environ["DAGSTER_HOME"] = str(dagster_home)
    return store


def gate_summaries(rounds: list[str]) -> dict[str, str]:
    """Per round, its blocking gates from the Dagster instance: "ok", or the failed ones."""
    import dagster as dg

    from assets.sensors import blocking_check_keys, gate_results
    from selfimprove_dagster.definitions import build_definitions

    instance = dg.DagsterInstance.get()
    keys = blocking_check_keys(build_definitions().get_repository_def())
    summaries = {}
    for key in rounds:
        gates = gate_results(instance, key, keys)
        bad = gates.failed + [f"{name} (not run)" for name in gates.not_run]
        summaries[key] = "failed: " + ", ".join(bad) if bad else f"ok ({len(keys)})"
    return summaries


def status_rows(store: RoundStore) -> list[dict]:
    """Per completed round: kept samples, held-out accuracy before -> after, pass@k."""
    from selfimprove_dagster.evolution import promoted_round
    from selfimprove_dagster.sources.mix import prompt_status

    promoted = promoted_round(store.history()) if store.completed_rounds() else None
    gates = gate_summaries(store.completed_rounds())
    rows = []
    for key in store.completed_rounds():
        scores = store.read(key, "eval_scores").row(0, named=True)
        kept = store.read(key, "filtered").height if store.has(key, "filtered") else None
        rows.append(
            {
                "round": key,
                "kept": kept,
                "accuracy_before": scores["accuracy_before"],
                "accuracy_after": scores["accuracy_after"],
                "pass_at_k": scores["pass_at_k"],
                "k": scores["k"],
                "policy": Path(scores["policy"]).name
                if "/" in scores["policy"]
                else scores["policy"],
                "temperature": float(store.read(key, "generations")["temperature"][0]),
                "balance_score": scores.get("balance_score"),
                "method": scores.get("method") or "star",
                "promoted": key == promoted,
                "gates": gates[key],
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


def run_rounds(store: RoundStore, rounds: int) -> int:
    """Materialize round_000..round_{rounds-1} through the round job (skips done rounds)."""
    from selfimprove_dagster.definitions import build_definitions
    from selfimprove_dagster.engines.pool import POOL

    defs = build_definitions()
    preflight(defs, store)
    try:
        return _run_rounds(defs.resolve_job_def("round_job"), store, rounds)
    finally:
        POOL.release()  # the engine kept across steps and rounds, before interpreter exit


def _run_rounds(job, store: RoundStore, rounds: int) -> int:
    import dagster as dg

    instance = dg.DagsterInstance.get()
    done = set(store.completed_rounds())
    for index in range(rounds):
        key = round_key(index)
        if key in done:
            print(f"{key}: already complete, skipping")
            continue
        if not instance.has_dynamic_partition("rounds", key):
            instance.add_dynamic_partitions("rounds", [key])
        print(f"{key}: running (Dagster run log: `make ui`)", flush=True)
        result = job.execute_in_process(
            partition_key=key,
            instance=instance,
            raise_on_error=False,
            run_config={"loggers": {"console": {"config": {"log_level": "INFO"}}}},
        )
        if not result.success:
            print(f"{key} failed: {run_failure_message(result)}", file=sys.stderr)
            return 1
        print(format_status([r for r in status_rows(store) if r["round"] == key]), flush=True)
    print("\nRounds so far:\n" + format_status(status_rows(store)))
    return 0


def preflight(defs, store: RoundStore) -> None:
    """Fail before any run starts on a recipe that cannot work (bad dataset, unknown
    model, engine or trainer setting): one message, nothing materialized."""
    from selfimprove_dagster.engines import ENGINES
    from selfimprove_dagster.models import validate_model_ref

    resources = defs.resources
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
        found = lineage.checkpoint_lineage(store, target)
        if as_json:
            return json.dumps(found, indent=2, default=str)
        ckpt, rows = found["checkpoint"], found["trained_on"]
        lines = [
            f"checkpoint {ckpt['path']}",
            f"  trained from {ckpt['trained_from']} (policy {ckpt['policy']})",
            f"  {ckpt['train_examples']} examples, content hash {ckpt['content_hash'][:16]}, "
            f"{ckpt['optimizer_steps']} steps, final loss {ckpt['final_loss']:.4f}",
            f"trained on {len(rows)} filtered rows (first {min(limit, len(rows))}):",
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
    """`dagster dev` on 127.0.0.1 over the instance in DAGSTER_HOME (set by `use_data_dir`)."""
    repo = Path(__file__).resolve().parents[1]
    dagster = Path(sys.executable).with_name("dagster")  # the venv's, even if not on PATH
    command = [str(dagster if dagster.exists() else "dagster"), "dev", "-h", "127.0.0.1"]
    command += ["-p", str(port)]
    if (repo / "workspace.yaml").is_file():
        return subprocess.call([*command, "-w", str(repo / "workspace.yaml")], cwd=repo)
    return subprocess.call([*command, "-m", "selfimprove_dagster.definitions"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="selfimprove", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir", default=os.environ.get("SELFIMPROVE_DATA_DIR", "var"), help="data dir"
    )
    # --data-dir also works after the command (`selfimprove run --data-dir d`).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", default=argparse.SUPPRESS, help="data dir")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", parents=[common], help="materialize rounds through Dagster")
    run.add_argument("--rounds", type=int, default=3, help="rounds to have completed")
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
    args = parser.parse_args(argv)

    store = use_data_dir(args.data_dir)
    try:
        if args.command == "run":
            return run_rounds(store, args.rounds)
        if args.command == "status":
            rows = status_rows(store)
            print(json.dumps(rows, indent=2) if args.json else format_status(rows))
            return 0
        if args.command == "lineage":
            print(show_lineage(store, args.target, args.limit, args.json))
            return 0
        if args.command == "ui":
            return start_ui(args.port)
    except SelfImproveError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
