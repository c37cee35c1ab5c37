"""Hyperparameter sweeps with Ray Tune over Ray Train runs, one nested MLflow run per trial.

    python pipelines/tune.py --sweep lr_shakespeare_char                       # LR, log-uniform, ASHA on tokens
    python pipelines/tune.py --sweep lr_batch_constant_tokens                  # LR x micro-batch, tokens/step fixed
    python pipelines/tune.py --sweep lr_batch_constant_budget                  # LR x batch, total tokens fixed
    python pipelines/tune.py --sweep finetune_gpt2_lr --model.init_from=gpt2   # finetune GPT-2 over LRs, constant LR
    python pipelines/tune.py --sweep lr_shakespeare_char --sweep.num_samples=4 --train.max_iters=500 --name s1
    python pipelines/tune.py --resume out/s1                                   # a killed sweep continues

    # on a cluster (Ray 2.60 keeps token auth on: the client needs RAY_AUTH_MODE=token)
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python pipelines/tune.py --sweep lr_shakespeare_char --run.out_dir=/abs/shared/sweeps \\
        --data.dir=/abs/shared/shakespeare_char --tracking-uri http://127.0.0.1:5000

Options: --sweep <name in pipelines/configs/sweeps/ | file.yaml>; --sweep.KEY=VALUE changes the sweep file (see
pipelines/sweep/spec.py); any --section.key=value changes the base config of every trial; --name (the sweep's
directory under run.out_dir; default <sweep>-<time>-<hex>); --resume <sweep dir>; --tracking-uri; --address /
--num-cpus (which Ray, as pretrain.py). Exit status: 0 done, 2 bad sweep file or config, or a --resume directory that
holds no sweep Tune can restore (nothing started), 1 no trial finished.

The driver, in order: read and check the sweep file, the base config and every corner trial's config (unknown keys,
empty search spaces, batch sizes that cannot keep tokens per step: errors naming the key and value), hash the
shards, all before Ray starts; start or join Ray; prepare the shards once if there are none; open the sweep's
MLflow parent run; run the Tuner: one trial = one `run_trial` (pipelines/sweep/trial.py) fitting a TorchTrainer,
at most as many at once as the cluster holds; then the table of trials, results.csv, val_loss_vs_lr.png, the best
trial's checkpoint registered, and a pretrain.py command line that trains its settings as a job of its own (the
preset's resources per worker, registered as `<the sweep's model>-retrain`: the sweep's best stays the latest
version of its own model).

A sweep lives in `<run.out_dir>/<name>/`: sweep.yaml (what --resume reads), Tune's experiment state, Tune's
per-trial directories `trial-<id>/`, and the trials' Ray Train runs `trials/trial-<id>/` (checkpoints,
metrics.jsonl, and outcome.json, the trial's record of how it ended, written the moment it ends: a resumed trial
that has one trains nothing, and the results and the best trial come from these records). `--resume DIR` resumes
the sweep in DIR, wherever it was planned (a copied or renamed sweep is itself). ASHA's time axis is `tokens`
trained (or `step`), never the count of reports.
"""
# ruff: noqa: E402 -- the sys.path line below must run before the project imports

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # as in pretrain.py

import argparse
import logging
from collections.abc import Sequence

from pipelines.pretrain import USER_ERRORS
from pipelines.sweep.plan import Sweep, load_sweep, plan_sweep
from pipelines.sweep.report import FINISHED

log = logging.getLogger("nanogpt.tune")


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str], list[str]]:
    parser = argparse.ArgumentParser(
        description="Sweep nanoGPT hyperparameters with Ray Tune.", allow_abbrev=False,
        epilog="--sweep.KEY=VALUE changes the sweep file; --section.key=value changes every trial's base config.",
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--sweep", help="a sweep name in pipelines/configs/sweeps/ or a sweep YAML file")
    what.add_argument("--resume", metavar="SWEEP_DIR", help="continue the sweep in this directory")
    parser.add_argument("--name", help="the sweep's directory name under run.out_dir (default: <sweep>-<time>-<hex>)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (same as --run.tracking_uri)")
    parser.add_argument("--address", help="Ray address (default: RAY_ADDRESS, a running cluster, else local)")
    parser.add_argument("--num-cpus", type=int, help="CPUs of a local Ray instance started here")
    args, rest = parser.parse_known_args(argv)
    if args.tracking_uri:
        rest.append(f"--run.tracking_uri={args.tracking_uri}")
    if args.resume and rest:
        parser.error(f"--resume takes the sweep as it was planned; no overrides ({' '.join(rest)})")
    sweep_args = [a for a in rest if a.startswith("--sweep.")]
    return args, sweep_args, [a for a in rest if not a.startswith("--sweep.")]


def main(argv: Sequence[str] | None = None) -> int:
    args, sweep_args, config_args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        sweep = load_sweep(args.resume) if args.resume else plan_sweep(args.sweep, sweep_args, config_args,
                                                                      args.name)
        start_ray(sweep, args.address, args.num_cpus)
        from pipelines.sweep.run import run_sweep  # imports ray: after start_ray

        outcome = run_sweep(sweep, resume=bool(args.resume))
    except USER_ERRORS as e:
        log.error("%s", e)
        return 2
    except KeyboardInterrupt as e:
        where = e.args[0] if e.args else "<the sweep's directory>"
        log.error("interrupted: finished trials and checkpoints are kept; continue the sweep with "
                  "python pipelines/tune.py --resume %s", where)
        return 130
    print_outcome(sweep, outcome)
    return 0 if any(r.status == FINISHED for r in outcome.rows) else 1


def start_ray(sweep: Sweep, address: str | None, num_cpus: int | None) -> None:
    """Join the cluster, or start a local instance with the dashboard: Ray Train's placement-group cleaner asks its
    State API to free the workers of the trials Tune stops."""
    from pipelines.ray_adapter.session import init_ray

    init_ray(address=address, num_cpus=num_cpus, state_api=True, lean=sweep.base.run.lean)


def print_outcome(sweep: Sweep, outcome) -> None:
    from pipelines.sweep.report import results_table

    print(f"\nsweep {sweep.name}: {len(outcome.rows)} trials in {sweep.sweep_dir}")
    print(results_table(outcome.rows))
    if outcome.best is None:
        print("no trial reported a checkpoint")
        return
    best = outcome.best
    print(f"\nbest: trial {best.trial_id}, val loss {best.best_val_loss:.4f} ({best.status}), checkpoint "
          f"{best.best_checkpoint}")
    if outcome.model_uri:
        print(f"registered as {outcome.model_uri}")
    print(f"train it (a job of its own, registered as its own model):\n  {outcome.command}")


if __name__ == "__main__":
    sys.exit(main())
