"""Every figure the READMEs quote about a shipped model equals a value in that model's JSON record.

The READMEs (README.md, data/README.md, data/<model>/README.md) quote measurements: rates (%),
times (s, ms, min), PSNR (dB), step and parameter counts. Each is parsed and must equal, to
the digits it shows, a number in the JSON records it is about: data/<model>/*.json (and data/<model>/<run>/*.json) for
data/<model>/README.md, every such record for data/README.md and README.md. A section headed
"## Experiments" holds runs that are not the shipped model and have no record; it is skipped,
as are the few figures in FREE (each with the reason it is not a measurement of a model).

The tables of the DDPM and mini-SD READMEs, and the benchmark of README.md, are also read cell by
cell against the exact JSON entry, so a figure cannot pass by equalling some other number.
"""

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data"

FIGURE = re.compile(
    r"(?<![\w.])(?P<number>\d{1,3}(?:,\d{3})+|\d+(?:\.\d+)?)\s?(?P<unit>%|ms\b|s\b|min\b|dB\b| steps\b| parameters\b)")

# Figures in the shipped sections that are not measurements of a shipped model (file name -> {text: reason}).
FREE = {
    "README.md": {},
    "data/README.md": {},
    "data/tiny-vae/README.md": {},
    "data/ddpm-shapes/README.md": {"90% with 50 DDIM steps": "the course's goal, not a measurement",
                                   "15 minutes": "the course's budget"},
}


def readmes() -> list:
    return [REPO / "README.md", DATA / "README.md", *sorted(DATA.glob("*/README.md"))]


def records_for(readme: Path) -> list:
    """A model's own records (data/<model>/*.json, and those of its runs, data/<model>/<run>/*.json, as
    data/dreambooth-star/with-prior/), or every model's for the READMEs about them all."""
    folder = readme.parent if readme.parent != DATA and readme.parent.parent == DATA else DATA / "*"
    return sorted(set(folder.parent.glob(f"{folder.name}/*.json")) | set(folder.parent.glob(f"{folder.name}/*/training.json"))
                  | set(folder.parent.glob(f"{folder.name}/*/evaluation.json")))


def shipped_part(text: str) -> str:
    """The text before a "## Experiments" heading. In README.md (which is about the course, with
    lesson times no model records), the "## Speed" section and the paragraph on the training runs."""
    if text.startswith("# sdlearn"):
        speed = text.split("\n## Speed", 1)[1].split("\n## ", 1)[0]
        runs = next(p for p in text.split("\n\n") if "training runs behind the shipped models" in p)
        return runs + "\n\n" + speed
    return text.split("\n## Experiments", 1)[0]


def leaves(value) -> list:
    """Every number in a JSON value (bools excluded)."""
    if isinstance(value, dict):
        return [x for v in value.values() for x in leaves(v)]
    if isinstance(value, list):
        return [x for v in value for x in leaves(v)]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [value]
    return []


def matches(number: str, unit: str, values: list) -> bool:
    """Does the figure `number unit`, to the digits shown, equal one of the recorded values?"""
    digits = len(number.split(".")[1]) if "." in number else 0
    x = float(number.replace(",", ""))
    half = 0.5 * 10 ** -digits + 1e-9
    unit = unit.strip()
    if unit in ("steps", "parameters"):
        return any(v == x for v in values)
    if unit == "%":
        return any(abs(100 * v - x) <= half for v in values if 0 <= v <= 1)
    if unit == "min":
        return any(abs(v / 60 - x) <= half for v in values)
    return any(abs(v - x) <= half for v in values)  # s, ms, dB: recorded in the same unit


def unmatched(text: str, values: list, free: dict) -> list:
    """The figures of `text` that no recorded value matches."""
    missing = []
    part = shipped_part(text)
    for m in FIGURE.finditer(part):
        context = part[max(0, m.start() - 40): m.end() + 40]
        if any(phrase in context for phrase in free):
            continue
        if not matches(m.group("number"), m.group("unit"), values):
            missing.append(f"{m.group(0)!r} in ...{' '.join(context.split())}...")
    return missing


@pytest.mark.parametrize("readme", readmes(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_quoted_figure_is_in_the_record(readme):
    name = str(readme.relative_to(REPO))
    values = [x for path in records_for(readme) for x in leaves(json.loads(path.read_text()))]
    missing = unmatched(readme.read_text(), values, FREE.get(name, {}))
    assert not missing, f"{name} quotes figures no JSON record holds:\n" + "\n".join(missing)


def test_the_check_fails_when_either_side_changes():
    readme = DATA / "shapes-classifier" / "README.md"
    text = readme.read_text()
    values = [x for path in records_for(readme) for x in leaves(json.loads(path.read_text()))]
    assert "195,160 parameters" in text and unmatched(text, values, {}) == []
    assert unmatched(text.replace("195,160", "195,161"), values, {})  # the README edited
    training = json.loads((readme.parent / "training.json").read_text())
    training["parameters"] += 1
    changed = leaves(json.loads((readme.parent / "evaluation.json").read_text())) + leaves(training)
    assert unmatched(text, changed, {})  # the record edited


# ---------------------------------------------------------------------------------------
# Tables and the benchmark, cell by cell
# ---------------------------------------------------------------------------------------


def table_rows(text: str, first_cell: str) -> dict:
    """{first column: [other cells]} of the markdown table whose header starts with first_cell."""
    rows, inside = {}, False
    for line in shipped_part(text).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            inside = True
            continue
        if inside and line.startswith("|"):
            if not set(cells[0]) <= set("-"):
                rows[cells[0]] = cells[1:]
        elif inside:
            break
    return rows


def pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def test_ddpm_table_is_its_evaluation():
    text = (DATA / "ddpm-shapes" / "README.md").read_text()
    report = json.loads((DATA / "ddpm-shapes" / "evaluation.json").read_text())
    rows = table_rows(text, "sampler")
    assert rows, "data/ddpm-shapes/README.md lost its table"
    steps = sorted({row["steps"] for row in report["results"]})
    for row in report["results"]:
        cell = rows[row["sampler"]][steps.index(row["steps"])]
        assert cell.split(" / ")[:2] == [pct(row["clean_rate"]), pct(row["asked_rate"])], (row["sampler"], row["steps"], cell)
    assert len(rows) == len({row["sampler"] for row in report["results"]})
    assert f"Told nothing (DDIM, 50 steps; `unconditional`): {100 * report['unconditional']['clean_rate']:.0f}%" in text


def test_mini_sd_table_is_its_evaluation():
    text = (DATA / "mini-sd" / "README.md").read_text()
    report = json.loads((DATA / "mini-sd" / "evaluation.json").read_text())
    rows = table_rows(text, "sampler")
    header = next(line for line in text.splitlines() if line.startswith("| sampler"))
    columns = [c.strip() for c in header.strip().strip("|").split("|")][1:]
    assert set(rows) == set(report["samplers"])
    for sampler, row in report["samplers"].items():
        expected = {
            "colour": row["train_pairs"]["colour"]["accuracy"], "shape": row["train_pairs"]["shape"]["accuracy"],
            "size": row["train_pairs"]["size"]["accuracy"], "position": row["train_pairs"]["position"]["accuracy"],
            "all four": row["train_pairs"]["all"]["accuracy"], "held-out pair": row["held_out_pair_accuracy"],
        }
        if "train_pairs_clean_and_asked" in row:
            expected["clean and as asked"] = row["train_pairs_clean_and_asked"]["accuracy"]
            expected["held-out clean and as asked"] = row["held_out_clean_and_asked"]["accuracy"]
            expected["judges agree"] = row["judges_agree"]["all"]
        assert set(expected) == set(columns), (columns, sorted(expected))
        for column, value in expected.items():
            assert rows[sampler][columns.index(column)] == pct(value), (sampler, column)


def test_readme_benchmark_is_the_bench_record():
    text = (REPO / "README.md").read_text()
    speed = text.split("## Speed", 1)[1].split("\n## ", 1)[0]
    record = json.loads((DATA / "bench" / "unet-cpu.json").read_text())
    (row,) = record["results"]
    quoted = " ".join(speed.split())
    assert f"{row['calls']} calls each" in quoted
    assert f"median ratio {row['ratio']:.3f} ({row['sdlearn_ms']:.0f} ms vs {row['diffusers_ms']:.0f} ms)" in quoted
    assert (f"fastest-call ratio {row['fastest_ratio']:.3f} ({row['sdlearn_fastest_ms']:.0f} ms vs "
            f"{row['diffusers_fastest_ms']:.0f} ms)") in quoted
    assert f"{row['operator_calls']['sdlearn']:,} operator calls per forward pass against {row['operator_calls']['diffusers']:,}" in quoted
    assert f"max |diff| {row['max_abs_diff']:g}" in quoted
    assert record["cpu"] in quoted and record["command"].removeprefix("python -m ") in quoted


def _evaluation(name: str) -> dict:
    return json.loads((DATA / name / "evaluation.json").read_text())


def test_lesson_12_runs_meet_their_targets():
    """What the shipped personalise runs were made to reach (data/README.md), read from their records."""
    lora = _evaluation("lora-star")
    large = lora["adapted"]["concept"]["large"]["faithfulness"]
    assert lora["n"] >= 100 and lora["original"] == 200
    assert large["shape"]["accuracy"] >= 0.9 and large["colour"]["accuracy"] >= 0.95 and large["position"]["accuracy"] >= 0.9
    assert lora["base"]["concept"]["large"]["faithfulness"]["shape"]["accuracy"] < 0.05  # the base model draws no star
    assert abs(lora["drift_points"]) <= 3
    sun = _evaluation("ti-sun")
    assert sun["adapted"]["concept"]["large"]["faithfulness"]["all"]["accuracy"] >= 0.9 and sun["drift_points"] == 0
    ti_star = _evaluation("ti-star")  # what textual inversion cannot learn
    assert ti_star["adapted"]["concept"]["large"]["faithfulness"]["shape"]["accuracy"] < 0.1
    with_prior = json.loads((DATA / "dreambooth-star" / "with-prior" / "evaluation.json").read_text())
    assert abs(with_prior["drift_points"]) <= 5
