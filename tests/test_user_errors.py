"""Every user error of every command ends in one `error:` line naming the key or path and the
fix, with exit status 2, and no traceback: values of the wrong type, output folders that cannot
be created, the crop key by the user's name, a file that is not a checkpoint, a checkpoint of
another class count, Hydra's own composition errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from segcon.overrides import check_value_types
from segcon.utils.errors import ConfigError
from tests.test_train import _tiny_cli_args


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


TRAIN_ERRORS = [
    ("data.batch_size=abc", "error: data.batch_size=abc: data.batch_size takes an integer, not 'abc' (e.g. "
                            "data.batch_size=4)"),
    ("optim.lr=fast", "error: optim.lr=fast: optim.lr takes a number or null, not 'fast' (e.g. optim.lr=0.001)"),
    ("trainer.max_steps=1.5", "error: trainer.max_steps=1.5: trainer.max_steps takes an integer, not 1.5"),
    ("data.crop_size=[0,0]", "error: data.crop_size must be [height, width] (or one size) in positive integers, "
                             "got [0, 0]"),
    ("model=nope", "error: In 'train': Could not find 'model/nope' Available options in 'model': deeplabv3plus_r101"),
    ("hydra.run.dir={file}/run", "error: hydra.run.dir={file}/run: the output folder cannot be created ({file} is a "
                                 "file, not a folder)"),
]

# segcon-train's console entry run once per case in one process (Hydra's global state cleared
# between runs): each case's exit status and stderr, as JSON
_RUN_CASES = """
import contextlib, io, json, sys
from hydra.core.global_hydra import GlobalHydra
from segcon.train import cli
common, cases, results = json.loads(sys.argv[1]), json.loads(sys.argv[2]), []
for case in cases:
    err = io.StringIO()
    sys.argv = ["segcon-train", *common, *case]
    with contextlib.redirect_stderr(err):
        try:
            cli()
            status = 0
        except SystemExit as stop:
            status = stop.code
    GlobalHydra.instance().clear()
    results.append([status, err.getvalue()])
print(json.dumps(results))
"""


def test_segcon_train_user_errors(data_dir: Path, tmp_path: Path) -> None:
    import json
    import os
    import subprocess
    import sys

    (tmp_path / "a_file").write_text("")
    cases = [[o.replace("{file}", str(tmp_path / "a_file"))] for o, _ in TRAIN_ERRORS]
    for case in cases:
        if not case[0].startswith("hydra.run.dir"):
            case.append(f"hydra.run.dir={tmp_path / 'run'}")
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    proc = subprocess.run([sys.executable, "-c", _RUN_CASES, json.dumps(_tiny_cli_args(data_dir)), json.dumps(cases)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for (status, stderr), (_, said) in zip(json.loads(proc.stdout.splitlines()[-1]), TRAIN_ERRORS, strict=True):
        assert status == 2, stderr[-3000:]
        assert _one_error_line(stderr).startswith(said.replace("{file}", str(tmp_path / "a_file")))


def test_values_of_the_types_a_key_takes_pass(data_dir: Path) -> None:
    """The annotation of the parameter decides where it says more than the preset's value does:
    `trainer.devices` takes "auto", `trainer.limit_val_batches` a fraction (the presets hold
    integers), OHEM's `min_kept` only an integer; a null switches a number off."""
    from tests.conftest import compose_train, tiny_overrides

    fine = ["trainer.devices=auto", "trainer.limit_val_batches=0.5", "optim.lr=1", "divergence.explode_factor=null",
            "data.crop_size=[32,48]", "trainer.precision=bf16-mixed"]
    reference = compose_train(tiny_overrides(data_dir))
    cfg = compose_train([*tiny_overrides(data_dir), *fine])
    check_value_types(cfg, [(o, o.split("=")[0]) for o in fine], reference)
    reference = compose_train([*tiny_overrides(data_dir), "loss=ohem"])
    bad = compose_train([*tiny_overrides(data_dir), "loss=ohem", "loss.ohem.min_kept=2.5"])
    with pytest.raises(ConfigError, match=r"loss\.ohem\.min_kept takes an integer, not 2\.5"):
        check_value_types(bad, [("loss.ohem.min_kept=2.5", "loss.ohem.min_kept")], reference)


def _main(tool: str):
    from segcon import evaluate, export, predict

    return {"eval": evaluate.main, "predict": predict.main, "export": export.main}[tool]


@pytest.mark.parametrize(("tool", "args", "said"), [
    ("eval", ["ckpt={text}"], "error: {text} is not a checkpoint or torch file"),
    ("eval", ["ckpt={run}", "data.num_classes=3"], "error: data.num_classes=3: {ckpt} was trained with 5 classes "
                                                   "(background, field, block, blob, crack)"),
    ("eval", ["ckpt={run}", "data.val_batch_size=abc"], "error: data.val_batch_size=abc: data.val_batch_size takes an "
                                                        "integer, not 'abc'"),
    ("eval", ["ckpt={run}", "out_dir={file}/eval"], "error: out_dir={file}/eval: the output folder cannot be created"),
    ("predict", ["ckpt={run}", "input={images}", "output={file}/pred"], "error: output={file}/pred: the output folder "
                                                                         "cannot be created ({file} is a file"),
    ("export", ["ckpt={run}", "out={file}/m/model.onnx"], "error: out={file}/m: the output folder cannot be created"),
])
def test_eval_predict_and_export_user_errors(
    tool: str, args: list[str], said: str, trained_run: Path, data_dir: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import json

    (tmp_path / "a_file").write_text("")
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    ckpt = json.loads((trained_run / "metrics.json").read_text())["val/checkpoint"]
    names = {"{text}": tmp_path / "notes.txt", "{run}": trained_run, "{file}": tmp_path / "a_file", "{ckpt}": ckpt,
             "{images}": data_dir / "synthetic-tiny" / "images" / "val"}

    def fill(text: str) -> str:
        for k, v in names.items():
            text = text.replace(k, str(v))
        return text

    status = _main(tool)([*map(fill, args), "logger=csv"] if tool == "eval" else list(map(fill, args)))
    assert status == 2
    assert _one_error_line(capsys.readouterr().err).startswith(fill(said))


def test_segcon_table_user_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from segcon.table import main

    assert main([str(tmp_path / "nope")]) == 2
    assert _one_error_line(capsys.readouterr().err) == f"error: {tmp_path / 'nope'}: no such sweep directory"
    assert main([str(tmp_path)]) == 2
    assert _one_error_line(capsys.readouterr().err).startswith("error: no finished job")


def test_the_output_folder_error_names_the_key_and_what_is_in_the_way(tmp_path: Path) -> None:
    from segcon.utils.io import make_output_dir

    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match=rf"^out_dir={tmp_path}/f/a/b: the output folder cannot be created "
                                          rf"\({tmp_path}/f is a file, not a folder\)"):
        make_output_dir(tmp_path / "f" / "a" / "b", "out_dir")
    assert make_output_dir(tmp_path / "x" / "y", "out_dir").is_dir()
