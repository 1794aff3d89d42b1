"""The bad-input table: every `flexvar` command and every stage, given bad input, prints ONE stderr line
naming the argument (or params key), exits 2, prints no traceback, and leaves no file behind.

Cases run in-process (`main(argv)`) in a fresh working folder; the folder and the shared inputs are
listed before and after, so a stage that wrote (or deleted) anything fails its case.

The huge cases (a request whose memory estimate is far above the limit) run in a subprocess whose
address space is capped at what it had mapped after importing the command plus AS_HEADROOM_MB, and whose
peak RSS may grow by at most RSS_BOUND_MB: the refusal must come from the estimate, before anything of
the request's size is allocated (an allocation past the cap raises, and the case then fails on the
exit code and the traceback).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.tiny_checkpoint import save_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Real (tiny) models and a set of good and bad input files, shared by every case (read-only)."""
    from flexvar.config import TokenizerConfig
    from flexvar.tokenizer.vqvae import VQVAE, save_tokenizer

    root = tmp_path_factory.mktemp("inputs")
    model = save_tiny_checkpoint(root)
    other = root / "other_tokenizer"
    save_tokenizer(VQVAE(TokenizerConfig(ch=8, ch_mult=[1, 2], z_channels=8, codebook_dim=4, codebook_size=16)),
                   TokenizerConfig(ch=8, ch_mult=[1, 2], z_channels=8, codebook_dim=4, codebook_size=16), other)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / "image.png")
    big = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(big, format="PNG")
    (root / "truncated.png").write_bytes(big.getvalue()[: len(big.getvalue()) // 2])
    Image.fromarray(np.full((8, 32), 255, dtype=np.uint8)).save(root / "wide_mask.png")   # 32x8: not the image's shape
    (root / "notes.txt").write_text("not an image, not a checkpoint\n")
    (root / "a_folder").mkdir()
    (root / "no_images" / "train" / "cat").mkdir(parents=True)       # an image folder without images
    (root / "no_images" / "train" / "cat" / "notes.txt").write_text("not an image\n")
    prepared = root / "prepared"                      # passes the cheap folder check; the tokenizer fails first
    prepared.mkdir()
    (prepared / "dataset_dict.json").write_text("{}")
    (root / "reference" / "domain").mkdir(parents=True)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "broken.yaml").write_text("seed: [1, 2\n")
    wrong = yaml.safe_load((ROOT / "params.yaml").read_text())
    wrong["seed"] = "abc"
    (root / "wrong_types.yaml").write_text(yaml.safe_dump(wrong))
    for name, patch in {
        "params_bad_resolution.yaml": {"data": {"resolution": "big"}},
        "params_bad_metrics.yaml": {"evaluate": {"metrics": ["fid", "bogus"]}},
        "params_unknown_key.yaml": {"train_transformer": {"stepz": 3}},
        "params_huge_schedule.yaml": {"sample": {"schedules": {"huge": {"steps": 8, "size": [4000, 4000]}}}},
        "params_bad_batch.yaml": {"sample": {"batch_size": "many"}},
    }.items():
        p = yaml.safe_load((ROOT / "params.yaml").read_text())
        for section, values in patch.items():
            for k, v in values.items():
                if isinstance(v, dict) and isinstance(p[section].get(k), dict):
                    p[section][k].update(v)
                else:
                    p[section][k] = v
        (root / name).write_text(yaml.safe_dump(p))
    return {"root": root, "model": model, "tokenizer": root / "tokenizer", "other_tokenizer": other,
            "image": root / "image.png", "truncated": root / "truncated.png", "wide_mask": root / "wide_mask.png",
            "notes": root / "notes.txt", "folder": root / "a_folder", "prepared": prepared,
            "reference": root / "reference", "params": root / "params.yaml"}


def _listing(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*")}


def _run(entry: str, argv: list[str]) -> tuple[int, str, str]:
    """main(argv) of `flexvar` (entry 'flexvar') or a stage module; (exit code, stdout, stderr)."""
    import importlib

    main = importlib.import_module("flexvar.cli" if entry == "flexvar" else f"pipeline.{entry}").main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:          # argparse errors
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


AS_HEADROOM_MB = 1024     # address space a huge case may map beyond the imported command's
RSS_BOUND_MB = 64         # growth of its peak RSS while refusing (measured: 12-21 MB)

BOUNDED = r"""
import contextlib, importlib, io, json, resource, sys

def status_kb(key):
    return int(next(line for line in open("/proc/self/status") if line.startswith(key + ":")).split()[1])

entry, argv, headroom_mb = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
main = importlib.import_module("flexvar.cli" if entry == "flexvar" else "pipeline." + entry).main
import numpy, PIL.Image, torch, torch.nn.functional  # noqa: E401  the libraries a command loads lazily (mapped, not allocated)
from flexvar.seeding import seed_everything
seed_everything(0)   # process setup every stage does (use_deterministic_algorithms loads ~150 MB once), not the request
cap = status_kb("VmSize") * 1024 + headroom_mb * 2 ** 20
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
peak_before = status_kb("VmHWM")
out, err = io.StringIO(), io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    except BaseException as e:
        import traceback
        traceback.print_exc()
        rc = 99
print(json.dumps({"rc": rc, "out": out.getvalue(), "err": err.getvalue(),
                  "peak_growth_mb": (status_kb("VmHWM") - peak_before) / 1024}))
"""


def _run_bounded(entry: str, argv: list[str]) -> tuple[int, str, str, float]:
    """`_run` in a subprocess with its address space capped (AS_HEADROOM_MB above the imported command's);
    (exit code, stdout, stderr, peak RSS growth in MB while running)."""
    r = subprocess.run([sys.executable, "-c", BOUNDED, entry, json.dumps(argv), str(AS_HEADROOM_MB)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and r.stdout.strip(), f"the bounded run died (rc {r.returncode}): {r.stderr[-2000:]}"
    res = json.loads(r.stdout.strip().splitlines()[-1])
    return res["rc"], res["out"], res["err"], res["peak_growth_mb"]


I = "{%s}"   # placeholder for an input path (filled from the `inputs` fixture)


def _cases() -> list[tuple[str, str, list[str], str]]:
    """(id, entry, argv with {input} placeholders, what the one-line message must name)."""
    gen = ["generate", "--checkpoint", "{model}", "--device", "cpu"]
    img = ["--checkpoint", "{model}", "--device", "cpu", "--image", "{image}"]
    stage_p = ["--params", "{params}"]
    return [
        # generate: memory bounded, checkpoints, outputs, arguments
        ("generate-huge-scale", "flexvar", gen + ["--schedule", "1,2,99"], "--schedule"),
        ("generate-huge-size", "flexvar", gen + ["--size", "4000x4000"], "--size"),
        ("generate-huge-batch", "flexvar", gen + ["--num", "200000", "--batch-size", "200000"], "--batch-size"),
        ("generate-checkpoint-is-an-image", "flexvar", ["generate", "--checkpoint", "{image}"], "--checkpoint"),
        ("generate-checkpoint-wrong-kind", "flexvar", ["generate", "--checkpoint", "{tokenizer}/tokenizer.pt"],
         "--checkpoint"),
        ("generate-checkpoint-missing", "flexvar", ["generate", "--checkpoint", "{root}/nope"], "--checkpoint"),
        ("generate-tokenizer-not-its-own", "flexvar", gen + ["--tokenizer", "{other_tokenizer}"], "--tokenizer"),
        ("generate-out-is-a-folder", "flexvar", gen + ["--out", "{folder}/"], "--out"),
        ("generate-out-unwritable", "flexvar", gen + ["--out", "/proc/nope/x.png"], "--out"),
        ("generate-out-inside-a-file", "flexvar", gen + ["--out", "{notes}/x.png"], "--out"),
        ("generate-out-not-an-image-type", "flexvar", gen + ["--out", "grid.txt"], "--out"),
        ("generate-class-out-of-range", "flexvar", gen + ["--class", "99"], "--class"),
        ("generate-steps-zero", "flexvar", gen + ["--steps", "0"], "--steps"),
        ("generate-unknown-flag", "flexvar", gen + ["--bogus"], "--bogus"),
        # the four edit commands: images, masks, sizes
        ("refine-image-is-a-folder", "flexvar", ["refine"] + img[:-1] + ["{folder}"], "--image"),
        ("refine-image-not-an-image", "flexvar", ["refine"] + img[:-1] + ["{notes}"], "--image"),
        ("refine-image-truncated", "flexvar", ["refine"] + img[:-1] + ["{truncated}"], "--image"),
        ("refine-image-missing", "flexvar", ["refine"] + img[:-1] + ["{root}/nope.png"], "--image"),
        ("inpaint-mask-wrong-shape", "flexvar", ["inpaint"] + img + ["--mask", "{wide_mask}"], "--mask"),
        ("inpaint-box-outside", "flexvar", ["inpaint"] + img + ["--box", "0,0,99,99"], "--box"),
        ("outpaint-mask-is-a-folder", "flexvar", ["outpaint"] + img + ["--mask", "{folder}"], "--mask"),
        ("extend-size-smaller", "flexvar", ["extend"] + img + ["--size", "8x8"], "--size"),
        ("extend-huge-size", "flexvar", ["extend"] + img + ["--size", "16x40000"], "--size"),
        # import-official
        ("import-official-not-a-checkpoint", "flexvar",
         ["import-official", "--tokenizer", "{image}", "--out", "official"], "--tokenizer"),
        ("import-official-transformer-is-a-folder", "flexvar",
         ["import-official", "--transformer", "{folder}", "--out", "official"], "--transformer"),
        ("import-official-out-dot", "flexvar", ["import-official", "--tokenizer", "{image}", "--out", "."], "--out"),
        ("import-official-nothing", "flexvar", ["import-official", "--out", "official"], "--tokenizer"),
        # preset / check / params.yaml
        ("preset-unknown", "flexvar", ["preset", "nosuch", "--params", "{params}"], "nosuch"),
        ("preset-params-is-a-folder", "flexvar", ["preset", "smoke", "--params", "{folder}"], "--params"),
        ("preset-params-broken-yaml", "flexvar", ["preset", "smoke", "--params", "{root}/broken.yaml"], "broken.yaml"),
        ("check-wrong-type", "flexvar", ["check", "--params", "{root}/wrong_types.yaml"], "seed"),
        ("check-params-missing", "flexvar", ["check", "--params", "{root}/missing.yaml"], "missing.yaml"),
        ("init-dir-missing", "flexvar", ["init", "imagefolder:{root}/nope"], "SOURCE"),
        ("init-no-train-folder", "flexvar", ["init", "imagefolder:{root}/a_folder"], "SOURCE"),
        ("init-no-images", "flexvar", ["init", "imagefolder:{root}/no_images"], "SOURCE"),
        ("init-not-a-folder-source", "flexvar", ["init", "hf:mnist"], "SOURCE"),
        ("init-bad-minutes", "flexvar", ["init", "imagefolder:{root}/no_images", "--minutes", "0"], "--minutes"),
        ("init-bad-rate", "flexvar", ["init", "imagefolder:{root}/no_images", "--rate-gflops", "1,2,3"],
         "--rate-gflops"),
        ("check-bad-rate", "flexvar", ["check", "--params", "{root}/params.yaml", "--rate-gflops", "-5"],
         "--rate-gflops"),
        ("check-bad-batch-type", "flexvar", ["check", "--params", "{root}/params_bad_batch.yaml"], "sample.batch_size"),
        # every stage
        ("prepare-out-dot", "prepare", stage_p + ["--out", "."], "--out"),
        ("prepare-params-wrong-type", "prepare", ["--params", "{root}/params_bad_resolution.yaml", "--out", "prep"],
         "data.resolution"),
        ("train_tokenizer-data-missing", "train_tokenizer", stage_p + ["--data", "{root}/nope"], "--data"),
        ("train_tokenizer-out-dot", "train_tokenizer", stage_p + ["--data", "{prepared}", "--out", "."], "--out"),
        ("extract_latents-tokenizer-is-an-image", "extract_latents",
         stage_p + ["--prepared", "{prepared}", "--tokenizer", "{image}", "--out", "latents"], "--tokenizer"),
        ("train_transformer-latents-is-a-file", "train_transformer",
         stage_p + ["--depth", "2", "--latents", "{notes}", "--tokenizer", "{tokenizer}", "--out", "m",
                    "--metrics", "m.json", "--plots", "p"], "--latents"),
        ("train_transformer-params-unknown-key", "train_transformer",
         ["--params", "{root}/params_unknown_key.yaml", "--depth", "2"], "train_transformer.stepz"),
        ("sample-out-dot", "sample", stage_p + ["--depth", "2", "--schedule", "short", "--model", "{model}",
                                                "--out", "."], "--out"),
        ("sample-model-is-an-image", "sample", stage_p + ["--depth", "2", "--schedule", "short", "--model", "{image}",
                                                          "--out", "s"], "--model"),
        ("sample-huge-schedule", "sample", ["--params", "{root}/params_huge_schedule.yaml", "--depth", "2",
                                            "--schedule", "huge", "--model", "{model}", "--out", "s"],
         "sample.schedules.huge"),
        ("train_feature_net-prepared-is-a-file", "train_feature_net",
         stage_p + ["--prepared", "{notes}", "--out", "fn/model.pt", "--metrics", "fn.json", "--plot", "fn.csv"],
         "--prepared"),
        ("reference_stats-out-dot", "reference_stats", stage_p + ["--prepared", "{prepared}", "--out", "."], "--out"),
        ("reference_stats-out-holds-other-files", "reference_stats",
         stage_p + ["--prepared", "{prepared}", "--out", "{root}"], "--out"),
        ("evaluate-samples-not-npz", "evaluate",
         stage_p + ["--depth", "2", "--schedule", "short", "--samples", "{notes}", "--reference", "{reference}",
                    "--feature-net", "{image}", "--out", "e.json"], "--samples"),
        ("evaluate-params-bad-metric", "evaluate",
         ["--params", "{root}/params_bad_metrics.yaml", "--depth", "2", "--schedule", "short"], "evaluate.metrics"),
        ("report-metrics-dir-missing", "report", stage_p + ["--metrics-dir", "{root}/nope", "--out", "r"],
         "--metrics-dir"),
        ("report-out-dot", "report", stage_p + ["--metrics-dir", "{folder}", "--out", "."], "--out"),
    ]


CASES = _cases()
HUGE = {c[0] for c in CASES if "huge" in c[0]}   # refused by a memory estimate: run under a memory bound


def test_the_table_covers_every_command_and_stage():
    entries = {(c[1], c[2][0]) if c[1] == "flexvar" else (c[1], None) for c in CASES}
    commands = {cmd for entry, cmd in entries if entry == "flexvar"}
    stages = {entry for entry, _ in entries if entry != "flexvar"}
    assert commands == {"generate", "refine", "inpaint", "outpaint", "extend", "import-official", "preset", "check",
                        "init"}
    assert stages == {"prepare", "train_tokenizer", "extract_latents", "train_transformer", "sample",
                      "train_feature_net", "reference_stats", "evaluate", "report"}
    assert len(CASES) >= 25
    assert HUGE == {"generate-huge-scale", "generate-huge-size", "generate-huge-batch", "extend-huge-size",
                    "sample-huge-schedule"}


@pytest.mark.parametrize("case_id,entry,argv,named", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_naming_the_argument(case_id, entry, argv, named, inputs, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("the user's own file\n")   # must survive an --out . or a failed stage
    monkeypatch.chdir(work)
    argv = [a.format(**{k: str(v) for k, v in inputs.items()}) for a in argv]
    before_work, before_inputs = _listing(work), _listing(inputs["root"])
    if case_id in HUGE:
        rc, out, err, grown_mb = _run_bounded(entry, argv)
        print(f"\n[{case_id}] peak RSS growth {grown_mb:.1f} MB")
        assert grown_mb <= RSS_BOUND_MB, f"{case_id}: peak RSS grew by {grown_mb:.0f} MB while refusing"
    else:
        rc, out, err = _run(entry, argv)
    lines = [line for line in err.splitlines() if line.strip()]
    print(f"\n[{case_id}] rc={rc} stderr: {err.strip()}")
    assert rc == 2, (rc, out, err)
    assert len(lines) == 1, err
    assert "error:" in lines[0] and named in lines[0], lines[0]
    assert "Traceback" not in out + err
    assert _listing(work) == before_work, "files left behind (or deleted) in the working folder"
    assert _listing(inputs["root"]) == before_inputs, "the inputs were changed"
