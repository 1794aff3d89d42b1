"""dvc.yaml's code deps cover every project file each stage's command imports (so `dvc repro` never
returns a stale result after a library edit), and the check itself catches a missing dep."""
from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from tests.import_closure import ROOT, closure, covered, stage_commands, uncovered


def test_every_imported_project_file_is_covered_by_a_dep():
    missing = {stage: files for stage, files in uncovered().items() if files}
    assert not missing, ("dvc.yaml deps miss files the stage imports (add the file or its package folder): "
                         f"{missing}")


def test_every_stage_runs_a_project_module_and_its_code_deps_exist():
    stages = stage_commands()
    assert set(stages) >= {"prepare", "train_tokenizer", "extract_latents", "train_transformer", "sample",
                           "train_feature_net", "reference_stats", "evaluate", "report"}
    for stage, (module, deps) in stages.items():
        assert module.startswith("pipeline."), stage
        for dep in deps:
            if dep.split("/")[0] in ("flexvar", "pipeline", "flows"):
                assert (ROOT / dep).exists(), f"{stage}: dep {dep} does not exist"


def test_closure_follows_imports_inside_functions_and_package_inits():
    files = {str(f) for f in closure("pipeline.train_tokenizer")}
    # imported inside run()/write_outputs(), not at the top of the module
    assert {"flexvar/tokenizer/training.py", "flexvar/tokenizer/vqvae.py", "flexvar/data/splits.py"} <= files
    assert {"pipeline/__init__.py", "flexvar/__init__.py", "flexvar/tokenizer/__init__.py"} <= files
    assert "flexvar/generation/generate.py" not in files


def _copy_code(tmp_path: Path) -> Path:
    root = tmp_path / "proj"
    for pkg in ("flexvar", "pipeline", "flows"):
        shutil.copytree(ROOT / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    return root


def test_guard_fails_when_a_dep_is_removed(tmp_path):
    root = _copy_code(tmp_path)
    dvc = yaml.safe_load((root / "dvc.yaml").read_text())
    dvc["stages"]["sample"]["deps"].remove("flexvar/generation")
    (root / "dvc.yaml").write_text(yaml.safe_dump(dvc))
    missing = uncovered(root)
    assert "flexvar/generation/generate.py" in missing["sample"]
    assert "flexvar/generation/sampling.py" in missing["sample"]
    assert not any(missing[s] for s in missing if s != "sample")


def test_guard_fails_when_a_stage_gains_an_import_without_a_dep(tmp_path):
    root = _copy_code(tmp_path)
    stage = root / "pipeline" / "report.py"
    stage.write_text(stage.read_text().replace("import json\n", "import json\n\nfrom flexvar.grid import image_grid\n", 1))
    missing = uncovered(root)
    assert missing["report"] == ["flexvar/grid.py"]


def test_covered_matches_folders_by_whole_path_parts():
    assert covered(Path("flexvar/tokenizer/vqvae.py"), ["flexvar/tokenizer"])
    assert not covered(Path("flexvar/tokenizer_extra/vqvae.py"), ["flexvar/tokenizer"])
    assert not covered(Path("flexvar/config.py"), ["flexvar/tokenizer"])
