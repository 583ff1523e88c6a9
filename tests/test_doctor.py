"""The environment doctor reports what a lesson needs and warns about what will break."""

import importlib

import sdlearn

# the module; `sdlearn.doctor` itself is the function
doctor_module = importlib.import_module("sdlearn.doctor")


def test_doctor_prints_and_reports(capsys):
    report = sdlearn.doctor()
    out = capsys.readouterr().out
    assert "torch" in out and report.versions["torch"] in out
    assert report.device in ("cpu", "cuda", "mps")
    assert report.threads >= 1 and report.cpus >= 1
    assert report.data_dir.endswith("data")
    assert report.data["tokenizers/clip-vit-l14"]  # shipped in the repository


def test_doctor_warns_about_missing_data(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SDLEARN_DATA", str(tmp_path / "nowhere"))
    report = sdlearn.doctor()
    assert not report.ok
    assert any("No data folder" in w for w in report.warnings)
    assert "WARNING" in capsys.readouterr().out


def test_doctor_warns_about_a_version_that_differs_from_the_pins(monkeypatch):
    real = doctor_module.pinned_versions()
    monkeypatch.setattr(doctor_module, "pinned_versions", lambda: {**real, "torch": "0.0.1"})
    report = doctor_module.check()
    assert any("torch" in w and "0.0.1" in w for w in report.warnings)


def test_pins_are_read_from_requirements():
    assert doctor_module.pinned_versions()["torch"] == "2.13.0"
