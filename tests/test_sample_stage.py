"""`sample` stage on a tiny checkpoint: ADM-format npz, PNGs, per-class grid, MLflow run; bad schedule = exit 2."""
import json

import numpy as np
import yaml
from tests.tiny_checkpoint import CLASSES, save_tiny_checkpoint

from pipeline import sample


def write_params(project_root, tmp_path, **sample_overrides):
    params = yaml.safe_load((project_root / "params.yaml").read_text())
    params["sample"].update(per_class=2, batch_size=3, top_k=8, precision="fp32", **sample_overrides)
    params["tracking"]["uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_sample_stage_writes_adm_npz_pngs_and_grid(project_root, tmp_path):
    ckpt = save_tiny_checkpoint(tmp_path / "models")
    params = write_params(project_root, tmp_path)
    out = tmp_path / "samples" / "d2" / "canonical"
    rc = sample.main(["--params", str(params), "--depth", "2", "--schedule", "canonical", "--model", str(ckpt),
                      "--out", str(out)])
    assert rc == 0
    npz = np.load(out / "samples.npz")
    n = 2 * len(CLASSES)
    assert npz["arr_0"].shape == (n, 16, 16, 3) and npz["arr_0"].dtype == np.uint8
    assert npz["labels"].dtype == np.int64 and npz["labels"].tolist() == sorted(list(range(len(CLASSES))) * 2)
    assert len(list((out / "images").glob("*.png"))) == n
    assert (out / "grid.png").is_file() and (out / "info.json").is_file()
    info = json.loads((out / "info.json").read_text())   # the settings object generation took, as it was
    assert info["sampling"] == {"guidance": 1.5, "guidance_schedule": "ramp", "top_k": 8, "top_p": 0.0,
                                "greedy_rule": "official", "precision": "fp32"}
    again = tmp_path / "again"
    assert sample.main(["--params", str(params), "--depth", "2", "--schedule", "canonical", "--model", str(ckpt),
                        "--out", str(again)]) == 0
    assert np.array_equal(np.load(again / "samples.npz")["arr_0"], npz["arr_0"])   # seeded from params


def test_unknown_schedule_and_missing_model_exit_2(project_root, tmp_path, capsys):
    params = write_params(project_root, tmp_path)
    assert sample.main(["--params", str(params), "--depth", "2", "--schedule", "canonical",
                        "--model", str(tmp_path / "nope")]) == 2
    ckpt = save_tiny_checkpoint(tmp_path / "models")
    assert sample.main(["--params", str(params), "--depth", "2", "--schedule", "nope", "--model", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert "sample.schedules" in err and "Traceback" not in err
