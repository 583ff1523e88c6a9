"""sdlearn.lessons: the tables lessons print are derived from the package and match the published layouts."""

from pathlib import Path

import pytest
import torch

from sdlearn.lessons import COMPVIS_CLASSES, compvis_unet_names
from sdlearn.unet import UNet, UNetConfig


def test_compvis_names_of_sd15_match_the_original_checkpoints():
    with torch.device("meta"):
        unet = UNet(UNetConfig.sd15())
    rows = compvis_unet_names(unet)
    theirs = {ours: compvis for ours, compvis, _, _ in rows}
    # names as they appear in the released v1-5-pruned.ckpt (model.diffusion_model.*)
    assert theirs == {**theirs, "time_embedding": "time_embed", "conv_in": "input_blocks.0.0",
                      "down_blocks.0.resnets.0": "input_blocks.1.0", "down_blocks.0.attentions.0": "input_blocks.1.1",
                      "down_blocks.0.downsamplers.0": "input_blocks.3.0.op", "down_blocks.3.resnets.1": "input_blocks.11.0",
                      "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
                      "mid_block.resnets.1": "middle_block.2", "up_blocks.0.upsamplers.0": "output_blocks.2.1.conv",
                      "up_blocks.1.attentions.2": "output_blocks.5.1", "up_blocks.1.upsamplers.0": "output_blocks.5.2.conv",
                      "up_blocks.3.resnets.2": "output_blocks.11.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    assert len(rows) == len(theirs) == 48
    assert [c for _, c, _, _ in rows].index("middle_block.0") > [c for _, c, _, _ in rows].index("input_blocks.11.0")
    classes = {ours_class: compvis_class for _, _, ours_class, compvis_class in rows}
    assert classes["Transformer2DModel"] == "SpatialTransformer" and classes["ResnetBlock2D"] == "ResBlock"
    assert set(COMPVIS_CLASSES) <= set(classes)


def _timed_notebook(path, seconds: list, run: dict | None = None):
    import json

    cells = [{"cell_type": "markdown", "metadata": {}, "source": "text"}]
    for i, s in enumerate(seconds):
        meta = {} if s is None else {"execution": {"iopub.execute_input": "2026-01-01T10:00:00.000000Z",
                                                   "shell.execute_reply": f"2026-01-01T10:{int(s) // 60:02d}:{s % 60:09.6f}Z"}}
        cells.append({"cell_type": "code", "metadata": meta, "source": f"x = {i}", "outputs": [], "execution_count": i + 1})
    path.write_text(json.dumps({"cells": cells, "metadata": {} if run is None else {"sdlearn": run}, "nbformat": 4, "nbformat_minor": 5}))


def test_lesson_times_add_up_the_recorded_cell_times(tmp_path):
    from sdlearn.lessons import lesson_times

    _timed_notebook(tmp_path / "00_a.ipynb", [1.5, 62.25], {"cpu": "Some CPU", "native_bf16": False, "seconds": 70.0})
    _timed_notebook(tmp_path / "01_b.ipynb", [0.5])
    (tmp_path / "notes.ipynb").write_text("not a lesson")
    times = lesson_times(tmp_path)
    assert [(t.name, t.seconds, t.cpu, t.native_bf16) for t in times] == [
        ("00_a.ipynb", 63.8, "Some CPU", False), ("01_b.ipynb", 0.5, None, None)]


def test_lesson_times_refuse_a_notebook_without_records(tmp_path):
    from sdlearn.lessons import lesson_times

    _timed_notebook(tmp_path / "00_a.ipynb", [1.0, None])
    with pytest.raises(ValueError, match="00_a.ipynb: 1 of 2 code cells have no recorded run time; re-execute it"):
        lesson_times(tmp_path)
    with pytest.raises(FileNotFoundError, match="no lesson notebooks"):
        lesson_times(tmp_path / "empty")


def test_the_shipped_lessons_have_their_times_recorded():
    from sdlearn.lessons import lesson_times

    times = lesson_times()
    assert len(times) >= 12 and all(t.seconds > 0 for t in times)


def test_lesson_times_keep_the_latest_run_on_each_class_of_cpu(tmp_path, monkeypatch):
    import importlib.util

    from sdlearn.lessons import CPU_CLASSES, lesson_times

    spec = importlib.util.spec_from_file_location("execute_notebooks", Path(__file__).parents[1] / "tools" / "execute_notebooks.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    monkeypatch.setattr("sdlearn.train.native_bf16", lambda: False)
    slow = tool.run_record(150.0, {"native bf16": {"cpu": "Fast CPU", "torch_threads": 2, "seconds": 50.0}})
    assert slow["native_bf16"] is False and slow["seconds"] == 150.0
    assert slow["runs"]["native bf16"]["seconds"] == 50.0 and slow["runs"]["no native bf16"]["seconds"] == 150.0  # both kept
    _timed_notebook(tmp_path / "01_a.ipynb", [1.0], slow)
    (t,) = lesson_times(tmp_path)
    assert [t.seconds_on(c) for c in CPU_CLASSES] == [50.0, 150.0]
    _timed_notebook(tmp_path / "01_a.ipynb", [1.0], {"cpu": "Fast CPU", "native_bf16": True, "seconds": 50.0})
    assert lesson_times(tmp_path)[0].seconds_on("no native bf16") is None  # never run on such a CPU: no number


def test_every_shipped_lesson_records_the_run_its_outputs_came_from():
    from sdlearn.lessons import cpu_class, lesson_times

    for t in lesson_times():
        assert t.runs[cpu_class(t.native_bf16)]["cpu"] == t.cpu, t.name
