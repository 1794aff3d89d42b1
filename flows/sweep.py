"""Ray Tune sweep of the training step-sampling probabilities (params.yaml `sweep:`).

    python -m flows.sweep                          # sweep `sweep.search_space`, write the best config
    python -m flows.sweep --name s1 --resume       # continue an interrupted sweep (Tuner.restore)
    python -m flows.sweep --transfer               # ... then retrain best + default, compare FID (flows/transfer.py)
    flexvar preset ray_results/s1/best_params.yaml # apply the winner ... or: dvc exp run -S ... (printed)

Each trial trains the transformer (depth: --depth, default the smallest of variants.depths) for
`sweep.steps` steps on the cached latents (data/latents from extract_latents, codebook from
models/tokenizer) with the library loop (flexvar/transformer/training.py), the sampled values
applied to params.yaml's settings (dotted keys, e.g. `schedule.canonical_prob: [low, high]`;
integer settings are sampled as integers). Every `sweep.report_every` steps it reports the val
loss on every `sweep.eval_panel` schedule and their mean `val_loss_panel` (the default
`sweep.metric`), so the winner is the setting that is good at every schedule; ASHA stops the weak trials after `sweep.grace_steps`. Trial resources: `sweep.cpus_per_trial`,
`sweep.gpus_per_trial` (fractions allowed: 0.25 = four trials per GPU).

Search: Optuna's TPE (`ray.tune.search.optuna.OptunaSearch`, a few random startup trials, then
model-based), with ASHA. Each configuration trains once per `sweep.seeds` seed, in step: Tune sees the
mean over seeds as `sweep.metric` and its s.d. as `<metric>_std`, and best_params.yaml states the
winner's mean +- s.d. with each seed's value, so a difference inside seed noise is visible as such.

Fault tolerance: every report carries a Tune checkpoint (each seed's resume state, kept by Tune in the
run's storage); a trial whose worker dies is restarted up to `sweep.max_failures` times and starts
from `tune.get_checkpoint()` in a fresh folder, so it resumes at the checkpointed step on any node;
an interrupted sweep (Ctrl-C, driver killed) continues with `--resume` (Tuner.restore).
Tracking: one MLflow run for the sweep, each trial a child run of it (a restarted trial keeps its run).
Storage: ray_results/<name>/ in the project (git- and dvc-ignored); on a cluster it must be on the
shared filesystem, like the project (docs/orchestration.md).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger

from flexvar.config import ConfigError, Params, load_params, load_params_dict
from flexvar.errors import FlexvarError, command, one_line_parser_errors
from flexvar.schedules import sampler_config
from flexvar.run_logger import RunLogger

RESULTS_DIR = "ray_results"
# the sections a sweep reads: cross-key conflicts elsewhere (e.g. sample.schedules) are the sample stage's
PARAM_KEYS = ["seed", "data", "tokenizer", "transformer", "schedule", "train_transformer", "sweep", "resources",
              "variants.depths", "tracking"]


class SweepInterrupted(FlexvarError):
    """Tune stopped before every trial ended (Ctrl-C); `--resume` continues it (exit code 130)."""
    exit_code = 130


# --------------------------------------------------------------------------- the search space
def _walk(d: Any, key: str) -> tuple[Any, str | int]:
    """(container, last key) of a dotted key; list items by index (`schedule.drop_probs.0`)."""
    parts = key.split(".")
    for p in parts[:-1]:
        d = d[int(p)] if isinstance(d, list) else d[p]
    last = parts[-1]
    return d, (int(last) if isinstance(d, list) else last)


def get_dotted(d: dict, key: str) -> Any:
    try:
        box, k = _walk(d, key)
        return box[k]
    except (KeyError, IndexError, ValueError, TypeError):
        raise ConfigError(f"params.yaml: sweep.search_space.{key}: no such setting") from None


def sweep_base(params: Params) -> dict:
    """params.yaml's settings with the sampler's null settings (canonical, groups, max_tokens) filled in
    for the latent size, so `sweep.search_space` can name them (`schedule.groups.0.0`)."""
    base = params.model_dump(mode="json")
    base["schedule"] = sampler_config(params.schedule, params.latent_size).model_dump(mode="json")
    return base


def with_overrides(base: dict, overrides: dict[str, Any]) -> Params:
    """params.yaml's settings with dotted `overrides` applied, validated (bad values name the key)."""
    data = copy.deepcopy(base)
    for key, value in overrides.items():
        get_dotted(data, key)
        box, k = _walk(data, key)
        box[k] = value
    return load_params_dict(data, origin="sweep trial", uses=PARAM_KEYS)


def search_space(params: Params) -> dict[str, Any]:
    """Tune domains: uniform(low, high), randint(low, high + 1) where the setting is an integer.

    Both corners (every setting at its low, then every one at its high) are validated first, so a
    range that would make invalid settings (e.g. drop_probs increasing) fails before any trial.
    """
    from ray import tune

    base = sweep_base(params)
    space, corners = {}, ({}, {})
    for key, (low, high) in params.sweep.search_space.items():
        current = get_dotted(base, key)
        if isinstance(current, int) and not isinstance(current, bool):
            space[key] = tune.randint(int(low), int(high) + 1)
            low, high = int(low), int(high)
        else:
            space[key] = tune.uniform(float(low), float(high))
        corners[0][key], corners[1][key] = low, high
    for corner in corners:
        try:
            with_overrides(base, corner)
        except ConfigError as e:
            raise ConfigError(f"params.yaml: sweep.search_space: a corner of the ranges is invalid: {e}") from None
    return space


# --------------------------------------------------------------------------- tracking (MLflow)
def _store(params: Params, root: Path):
    from pipeline.tracking import open_experiment

    exp = open_experiment(params, root)
    return exp.client, exp.experiment_id


def sweep_run(params: Params, root: Path, exp_dir: Path, name: str) -> str:
    """The sweep's parent MLflow run: created once, its id kept in the experiment folder for --resume."""
    from pipeline.tracking import create_run, git_commit

    marker = exp_dir / "mlflow_parent_run"
    if marker.is_file():
        return marker.read_text().strip()
    client, exp_id = _store(params, root)
    run = create_run(client, exp_id, root, f"sweep {name}", {   # with MLflow's standard tags
        "flexvar_role": "sweep", "sweep_name": name, "git_commit": git_commit(root)})
    from pipeline.tracking import MlflowLogger

    MlflowLogger(client, run.info.run_id, run.info.run_id, "", exp_id).log_params(
        {f"sweep.{k}": v for k, v in params.sweep.model_dump(mode="json").items()})
    exp_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(run.info.run_id)
    return run.info.run_id


def trial_run(ctx: dict, params: Params, work: Path, trial_id: str, overrides: dict):
    """(client, run id) of this trial's child run; a restarted trial reuses the run it started."""
    client, exp_id = _store(params, Path(ctx["root"]))
    marker = work / "mlflow_run"
    if marker.is_file():
        run_id = marker.read_text().strip()
        client.update_run(run_id, status="RUNNING")
        return client, run_id
    from pipeline.tracking import MlflowLogger, create_run

    run = create_run(client, exp_id, Path(ctx["root"]), f"trial {trial_id}", {
        "mlflow.parentRunId": ctx["parent_run_id"], "flexvar_role": "sweep_trial", "trial_id": trial_id,
        "sweep_name": ctx["name"], "depth": str(ctx["depth"])})

    MlflowLogger(client, run.info.run_id, ctx["parent_run_id"], "", exp_id).log_params(
        {**overrides, "steps": params.sweep.steps, "depth": ctx["depth"]})
    marker.write_text(run.info.run_id)
    return client, run.info.run_id


# --------------------------------------------------------------------------- one trial (a Tune worker)
def run_trial(config: dict[str, Any], ctx: dict[str, Any]) -> None:
    """Short transformer training with the sampled settings, once per `sweep.seeds` seed; every report_every
    steps reports the val metrics averaged over seeds (and the score's s.d.) with a Tune checkpoint."""
    import torch
    from ray import tune

    from flexvar.device import pick_device
    from flexvar.schedules import spec_scales
    from flexvar.seeding import seed_everything
    from flexvar.transformer.training import train_transformer
    from flexvar.transformer.training_run import setup_run
    from pipeline.tracking import MlflowLogger

    root = Path(ctx["root"])
    os.chdir(root)
    os.environ["DVC_ROOT"] = str(root)
    params = with_overrides(ctx["base"], config)
    trial_id = tune.get_context().get_trial_id()
    work = Path(ctx["work_dir"]) / trial_id
    work.mkdir(parents=True, exist_ok=True)
    with open(work / "pids", "a") as f:   # one line per (re)start of this trial
        f.write(f"{os.getpid()}\n")
    torch.set_num_threads(max(1, int(params.sweep.cpus_per_trial)))
    device = pick_device(params.resources.device)
    run = setup_run(params, ctx["depth"], ctx["latents"], ctx["tokenizer"])   # as the train_transformer stage
    panel = {name: spec_scales(spec, run.train.latent_hw, params.tokenizer.downsample)
             for name, spec in params.sweep.eval_panel.items()}
    sw = params.sweep
    cfg = params.train_transformer.model_copy(update={
        "steps": sw.steps, "eval_every": sw.report_every, "checkpoint_every": sw.report_every,
        "log_every": min(params.train_transformer.log_every, sw.report_every)})
    client, run_id = trial_run(ctx, params, work, trial_id, config)
    tracker = MlflowLogger(client, run_id, ctx["parent_run_id"], "", "")
    # this start's training state: a fresh folder filled from the trial's last Tune checkpoint only, so a
    # trial restarted on another node (nothing of the first start on its disk) resumes where it reported
    scratch = work / f"start-{os.getpid()}"
    start = restore_checkpoint(scratch)
    step = start
    while step < sw.steps:
        target = min(step + sw.report_every, sw.steps)
        per_seed = {}
        for seed in sw.seeds:   # each seed trains to the same step, then Tune sees their mean
            seed_everything(seed)
            model = run.new_model()
            last = LastMetrics()
            train_transformer(model, run.quantizer, run.train, run.val, cfg, params.schedule,
                              prediction=run.transformer.prediction,
                              seed=seed, device=device, out_dir=scratch / f"seed{seed}",
                              logger=tracker if seed == sw.seeds[0] else None, val_logger=last, val_panel=panel,
                              stop_at=target,
                              fingerprint=run.fingerprint(cfg, params, seed=seed, panel=panel))
            per_seed[seed] = last.metrics
        step = target
        metrics = over_seeds(per_seed, sw.metric)
        tracker.log_metrics(metrics, step)
        (scratch / CHECKPOINT_STEP).write_text(str(step))
        tune.report({**metrics, "step": step, "start_step": start},
                    checkpoint=tune.Checkpoint.from_directory(str(scratch)))
    client.set_terminated(run_id, "FINISHED")
    shutil.rmtree(scratch, ignore_errors=True)


CHECKPOINT_STEP = "step"   # file in a trial checkpoint: the step every seed's resume.pt is at


def restore_checkpoint(scratch: Path) -> int:
    """Fill `scratch` from the trial's last Tune checkpoint (`tune.get_checkpoint()`); its step, 0 if none."""
    from ray import tune

    scratch.mkdir(parents=True, exist_ok=True)
    ckpt = tune.get_checkpoint()
    if ckpt is None:
        return 0
    with ckpt.as_directory() as d:
        shutil.copytree(d, scratch, dirs_exist_ok=True)
    step = int((scratch / CHECKPOINT_STEP).read_text())
    print(f"sweep trial: restored from Tune checkpoint {ckpt.path} at step {step}", flush=True)
    return step


class LastMetrics(RunLogger):
    """Keeps the last val metrics the library loop logged (one seed's, at the step it stopped)."""

    def __init__(self):
        self.metrics: dict[str, float] = {}

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics = dict(metrics)


def over_seeds(per_seed: dict[int, dict[str, float]], metric: str) -> dict[str, float]:
    """Mean over seeds of every val metric; for `metric` also its s.d. (`<metric>_std`, n-1; 0 for one seed)
    and each seed's value (`<metric>/seed<s>`)."""
    import statistics

    keys = set.intersection(*(set(m) for m in per_seed.values()))
    out = {k: statistics.fmean(m[k] for m in per_seed.values()) for k in sorted(keys)}
    values = [m[metric] for m in per_seed.values()]
    out[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    out |= {f"{metric}/seed{s}": m[metric] for s, m in per_seed.items()}
    return out


# --------------------------------------------------------------------------- the sweep (driver)
def make_tuner(params: Params, ctx: dict, exp_dir: Path, resume: bool):
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    sw = params.sweep
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx),
                                    {"cpu": sw.cpus_per_trial, "gpu": sw.gpus_per_trial})
    if resume:
        if not tune.Tuner.can_restore(str(exp_dir)):
            raise ConfigError(f"nothing to resume at {exp_dir}")
        return tune.Tuner.restore(str(exp_dir), trainable, resume_unfinished=True, resume_errored=True)
    scheduler = ASHAScheduler(time_attr="step", max_t=sw.steps, grace_period=min(sw.grace_steps, sw.steps),
                              reduction_factor=2)
    # model-based search: Optuna's TPE on the seed-averaged score, after a few random startup trials
    tpe = optuna.samplers.TPESampler(seed=params.seed, n_startup_trials=startup_trials(sw.num_samples))
    return tune.Tuner(
        trainable, param_space=search_space(params),
        tune_config=tune.TuneConfig(metric=sw.metric, mode="min", num_samples=sw.num_samples, scheduler=scheduler,
                                    search_alg=OptunaSearch(sampler=tpe)),
        run_config=tune.RunConfig(name=exp_dir.name, storage_path=str(exp_dir.parent),
                                  failure_config=tune.FailureConfig(max_failures=sw.max_failures),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1), verbose=1))


def startup_trials(num_samples: int) -> int:
    """Random trials before TPE models the results: a third of the budget, at least 2, at most 10."""
    return min(10, max(2, num_samples // 3))


def unfinished_trials(exp_dir: Path) -> int:
    """Trials the saved experiment state has not ended (an interrupted Tune saves them as PENDING)."""
    from ray.tune import ExperimentAnalysis

    return sum(t.status not in ("TERMINATED", "ERROR") for t in ExperimentAnalysis(str(exp_dir)).trials)


def settings_of(base: dict, overrides: dict[str, Any]) -> dict[str, Any]:
    """The settings a trial changes, whole: `schedule.groups.0.0` -> `schedule.groups` (the full list),
    so the winner applies as a preset or `dvc exp run -S` without list indices."""
    full = with_overrides(base, overrides).model_dump(mode="json")
    out = {}
    for key in overrides:
        parts = key.split(".")
        setting = ".".join(parts[:next((i for i, p in enumerate(parts) if p.isdigit()), len(parts))])
        out[setting] = _rounded(get_dotted(full, setting))
    return out


def _rounded(v: Any) -> Any:
    if isinstance(v, float):
        return round(v, 6)
    return [_rounded(x) for x in v] if isinstance(v, (list, tuple)) else v


def best_config_yaml(settings: dict[str, Any], metric: str, value: float,
                     per_seed: dict[str, float] | None = None, std: float | None = None) -> str:
    """The winner as a partial params file (nested keys) for `flexvar preset FILE`; its score as the mean
    +- s.d. over seeds with each seed's value in the header."""
    from flows.transfer import apply_settings

    nested = apply_settings({}, settings)
    spread = ""
    if per_seed:
        spread = (f" +- {std:.5f} (mean +- s.d. over {len(per_seed)} seeds: "
                  + ", ".join(f"{k} {v:.5f}" for k, v in per_seed.items()) + ")")
    head = (f"# best sweep trial: {metric} = {value:.5f}{spread}\n"
            f"# apply: flexvar preset <this file>   or   dvc exp run {dvc_set_args(settings)}\n")
    return head + yaml.safe_dump(nested, sort_keys=False, default_flow_style=None)


def dvc_set_args(settings: dict[str, Any]) -> str:
    return " ".join(f"-S '{k}={json.dumps(v, separators=(',', ':')) if isinstance(v, list) else v}'"
                    for k, v in settings.items())


def trials_table(trials: list[dict[str, Any]], space: list[str], panel: list[str], metric: str) -> str:
    """Markdown: one row per trial (settings, steps reached, panel loss, each member's val loss), best first."""
    head = ["trial", *space, "steps", metric, "s.d. over seeds", "val_loss (canonical)", *(f"val_loss/{n}" for n in panel)]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" for _ in head) + "|"]
    rank = sorted(trials, key=lambda t: (t["metrics"].get(metric) is None, t["metrics"].get(metric) or 0.0))
    for t in rank:
        m = t["metrics"]
        cells = [t["trial_id"], *(_cell(t["config"].get(k)) for k in space), _cell(m.get("step")), _cell(m.get(metric)),
                 _cell(m.get(f"{metric}_std")), _cell(m.get("val_loss")), *(_cell(m.get(f"val_loss/{n}")) for n in panel)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(v: Any) -> str:
    return "" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


def finish(grid, params: Params, root: Path, exp_dir: Path, parent_run_id: str, base: dict) -> dict[str, Any]:
    """Close the trials' MLflow runs, write best_params.yaml and trials.md, log them on the sweep run."""
    from pipeline.tracking import MlflowLogger

    client, exp_id = _store(params, root)
    metric, trials = params.sweep.metric, []
    for r in grid:
        work = exp_dir / "work" / r.metrics.get("trial_id", "") if r.metrics else None
        if work and (work / "mlflow_run").is_file():   # ASHA-stopped trials end here
            client.set_terminated((work / "mlflow_run").read_text().strip(), "FINISHED")
        keep = ("step", "start_step", "val_loss", "val_loss_panel", "val_acc_panel", metric, f"{metric}_std")
        trials.append({"trial_id": (r.metrics or {}).get("trial_id", ""), "config": r.config,
                       "metrics": {k: v for k, v in (r.metrics or {}).items() if k in keep or "/" in k},
                       "error": str(r.error) if r.error else None})
    best = grid.get_best_result(metric=metric, mode="min", scope="last")
    value, std = best.metrics[metric], best.metrics.get(f"{metric}_std")
    per_seed = {k.split("/")[-1]: v for k, v in best.metrics.items() if k.startswith(f"{metric}/seed")}
    settings = settings_of(base, best.config)
    (exp_dir / "best_params.yaml").write_text(best_config_yaml(settings, metric, value, per_seed, std))
    (exp_dir / "trials.md").write_text(trials_table(trials, list(params.sweep.search_space),
                                                    list(params.sweep.eval_panel), metric))
    tracker = MlflowLogger(client, parent_run_id, parent_run_id, "", exp_id)
    tracker.log_metrics({f"best_{metric}": value, **({f"best_{metric}_std": std} if std is not None else {})})
    tracker.log_params({f"best.{k}": v for k, v in best.config.items()})
    tracker.log_artifact(exp_dir / "best_params.yaml")
    tracker.log_artifact(exp_dir / "trials.md")
    client.set_terminated(parent_run_id, "FINISHED")
    return {"best_config": best.config, "best_settings": settings, "best_value": value, "best_std": std,
            "best_per_seed": per_seed, "trials": trials,
            "parent_run_id": parent_run_id,
            "best_file": str(exp_dir / "best_params.yaml"), "dvc_args": dvc_set_args(settings)}


@flow(name="flexvar-sweep")
def sweep_flow(root: str = ".", name: str = "sweep", params_file: str = "params.yaml", resume: bool = False,
               latents: str = "data/latents", tokenizer: str = "models/tokenizer", depth: int | None = None) -> dict:
    """Ray Tune over sweep.search_space; returns the best config and every trial's last metrics."""
    log = get_run_logger()
    root_p = Path(root).resolve()
    params = load_params(root_p / params_file, uses=PARAM_KEYS)
    exp_dir = root_p / RESULTS_DIR / name
    parent = sweep_run(params, root_p, exp_dir, name)
    ctx = {"root": str(root_p), "name": name, "base": sweep_base(params), "parent_run_id": parent,
           "latents": str((root_p / latents).resolve()), "tokenizer": str((root_p / tokenizer).resolve()),
           "depth": depth or min(params.variants.depths), "work_dir": str(exp_dir / "work")}
    log.info(f"sweep {name}: {params.sweep.num_samples} trials over {list(params.sweep.search_space)}, "
             f"MLflow parent run {parent}")
    grid = make_tuner(params, ctx, exp_dir, resume).fit()
    left = unfinished_trials(exp_dir)
    if left:
        raise SweepInterrupted(f"sweep {name} interrupted with {left} unfinished trials; "
                               f"continue with: python -m flows.sweep --name {name} --resume")
    out = finish(grid, params, root_p, exp_dir, parent, ctx["base"])
    log.info(f"best {params.sweep.metric} {out['best_value']:.4f} with {out['best_config']}")
    return out


def run_sweep(root: str | Path = ".", name: str = "sweep", params_file: str = "params.yaml", resume: bool = False,
              **kwargs) -> dict:
    """Start (or join) Ray and a Prefect API, then run the sweep flow."""
    import ray

    from flows.cluster import init_ray, prefect_api

    root = Path(root).resolve()
    params = load_params(root / params_file, uses=PARAM_KEYS)
    with prefect_api():
        started = init_ray(params.resources, root)
        try:
            return sweep_flow(str(root), name, params_file, resume, **kwargs)
        finally:
            if started:
                ray.shutdown()


@command("flows.sweep")
def main(argv: list[str] | None = None) -> int:
    ap = one_line_parser_errors(argparse.ArgumentParser(prog="python -m flows.sweep",
                                                        description=__doc__.split("\n\n")[0]))
    ap.add_argument("--root", default=".", help="project root (default: .)")
    ap.add_argument("--params", default="params.yaml", help="params file, relative to the root")
    ap.add_argument("--name", default=None, help="sweep name (folder under ray_results/; default: sweep-<time>)")
    ap.add_argument("--resume", action="store_true", help="continue the interrupted sweep --name (Tuner.restore)")
    ap.add_argument("--latents", default="data/latents", help="cached latents (extract_latents output)")
    ap.add_argument("--tokenizer", default="models/tokenizer", help="tokenizer folder (train_tokenizer output)")
    ap.add_argument("--depth", type=int, default=None, help="transformer depth (default: min of variants.depths)")
    ap.add_argument("--transfer", action="store_true", help="then retrain best and default at full length, "
                    "sample + evaluate both over variants.schedules, compare FID (flows/transfer.py)")
    ap.add_argument("--transfer-steps", type=int, default=None, help="training steps for --transfer "
                    "(default: train_transformer.steps)")
    ap.add_argument("--reference", default="data/reference", help="reference statistics (reference_stats output)")
    ap.add_argument("--feature-net", default="models/feature_net/model.pt", help="feature net (train_feature_net)")
    args = ap.parse_args(argv)
    if args.resume and not args.name:
        ap.error("--resume needs --name")
    name = args.name or time.strftime("sweep-%Y%m%d-%H%M%S")
    out = run_sweep(args.root, name, args.params, args.resume, latents=args.latents, tokenizer=args.tokenizer,
                    depth=args.depth)
    print((Path(out["best_file"]).parent / "trials.md").read_text())
    print(json.dumps({k: out[k] for k in ("best_settings", "best_value", "best_std", "best_per_seed", "best_file")},
                     indent=2))
    print(f"apply with:  flexvar preset {out['best_file']}\n        or:  dvc exp run {out['dvc_args']}")
    if args.transfer:
        from flows.transfer import transfer

        root = Path(args.root).resolve()
        params = load_params(root / args.params)   # every section: transfer samples and evaluates too
        res = transfer(root, args.params, root / RESULTS_DIR / name, out["best_settings"],
                       args.depth or min(params.variants.depths), latents=args.latents,
                       tokenizer=args.tokenizer, reference=args.reference, feature_net=args.feature_net,
                       steps=args.transfer_steps, parent_run_id=out["parent_run_id"])
        print(res["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
