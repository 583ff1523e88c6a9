"""Run every fault probe of the test suite as a learner would meet it, and count the outcomes.

    python tools/probe_faults.py [--verbose]

Each probe is a bad input, a corrupted file or a concurrent use, taken from the tables of
tests/test_faults.py (configs, weights, tokenizers, dtypes, threads, paths, devices, CLI,
evaluate and recipe arguments) and tests/test_guards.py (generation), plus save faults. It is
classified as

    clear error     refused with a message (commands: non-zero status, one line, no traceback)
    silent wrong    accepted: no error although the input is wrong
    unhelpful crash an exception that is not a user error (IndexError, RuntimeError, ...) or a traceback
    hang            still running after --limit seconds
    data loss       a file that existed before the probe changed or vanished

and the counts are printed as a table. Exit status 0 only when every probe gave a clear error.
"""

import argparse
import contextlib
import io
import json
import shutil
import signal
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import torch  # noqa: E402

import test_faults as faults  # noqa: E402
import test_guards as guards  # noqa: E402
try:
    from sdlearn.cli import USER_ERRORS  # noqa: E402
except ImportError:  # an older sdlearn, measured for comparison
    USER_ERRORS = (ValueError, TypeError, OSError)

OUTCOMES = ("clear error", "silent wrong", "unhelpful crash", "hang", "data loss")


class Hang(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int):
    def alarm(*_):
        raise Hang()

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


class Capture:
    """A stand-in for pytest's capsys: readouterr() returns what was written to stderr since the last call."""

    def __init__(self):
        self.err = io.StringIO()

    def readouterr(self):
        text, self.err = self.err.getvalue(), io.StringIO()
        return argparse.Namespace(out="", err=text)


def run_call(call) -> tuple[str, str]:
    """An API probe: a clear error is a user-error exception with a message of some words."""
    try:
        call()
    except Hang:
        raise
    except USER_ERRORS as exc:
        return ("clear error", str(exc)) if len(str(exc).split()) >= 4 else ("unhelpful crash", f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # noqa: BLE001 (classifying it is the point)
        return "unhelpful crash", f"{type(exc).__name__}: {exc}"
    return "silent wrong", "accepted"


def run_command(module: str, args: list) -> tuple[str, str]:
    """A command probe: non-zero status, one line on stderr, no traceback."""
    capture = Capture()
    with contextlib.redirect_stderr(capture.err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code, err = faults.run_module(module, args, capture)
        except Hang:
            raise
        except Exception as exc:  # noqa: BLE001
            return "unhelpful crash", f"{type(exc).__name__}: {exc}"
    lines = [line for line in err.splitlines() if line.strip()]
    if code == 0:
        return "silent wrong", "exit status 0"
    if "Traceback" in err or len(lines) != 1:
        return "unhelpful crash", err[-300:]
    return "clear error", lines[0]


def probes(work: Path) -> list:
    """(name, kind, thunk, watched paths) for every probe; thunk() -> (outcome, detail)."""
    pipe = faults.tiny_shapes_pipeline()
    model = pipe.save_pretrained(work / "tiny-sd")
    found = []

    # generation (tests/test_guards.py)
    for name, (call, _) in guards.calls(pipe).items():
        found.append((f"generate: {name}", lambda call=call: run_call(call), [model]))

    # configs
    for part, key, value, _ in faults.CONFIG_FAULTS:
        def config_probe(part=part, key=key, value=value):
            folder = work / f"config-{part}-{key}"
            shutil.rmtree(folder, ignore_errors=True)
            shutil.copytree(model / part, folder)
            config = json.loads((folder / "config.json").read_text())
            (folder / "config.json").write_text(json.dumps({**config, key: value}))
            return run_call(lambda: faults.PART_CLASSES[part].from_pretrained(folder))
        found.append((f"config {part}: {key}={json.dumps(value)}", config_probe, [model]))

    # corrupted weights, tokenizer files, dtypes
    for part in sorted(faults.PART_CLASSES):
        def weights_probe(part=part):
            folder = work / f"nan-{part}"
            shutil.rmtree(folder, ignore_errors=True)
            shutil.copytree(model / part, folder)
            faults.corrupt_tensor(next(folder.glob("*.safetensors")))
            return run_call(lambda: faults.PART_CLASSES[part].from_pretrained(folder))
        found.append((f"NaN bytes in {part} weights", weights_probe, [model]))

    def single_file_probe():
        path = work / "single.safetensors"
        pipe.save_single_file(path, overwrite=True)
        faults.corrupt_tensor(path)
        config = {"unet": pipe.unet.config.to_dict(), "vae": pipe.vae.config.to_dict(),
                  "text_encoder": pipe.text_encoder.config.to_dict(), "scheduler": pipe.scheduler_config,
                  "tokenizer": REPO / "data" / "tokenizers" / "shapes"}
        return run_call(lambda: faults.load_pipeline(path, config=config, family="sd1"))
    found.append(("NaN bytes in a single-file checkpoint", single_file_probe, [model]))

    def truncated_file_probe():
        path = work / "cut.safetensors"
        pipe.save_single_file(path, overwrite=True)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return run_call(lambda: faults.load_pipeline(path))
    found.append(("single-file checkpoint cut in half", truncated_file_probe, [model]))

    for cut in (1, 10, 40):
        def merges_probe(cut=cut):
            folder = work / f"merges-{cut}"
            shutil.rmtree(folder, ignore_errors=True)
            shutil.copytree(REPO / "data" / "tokenizers" / "shapes", folder)
            lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
            (folder / "merges.txt").write_text("\n".join(lines[:-cut]) + "\n", encoding="utf-8")
            return run_call(lambda: faults.CLIPTokenizer.from_pretrained(folder))
        found.append((f"merges.txt missing its last {cut} lines", merges_probe, []))

    def vocab_probe():
        folder = work / "vocab"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(REPO / "data" / "tokenizers" / "shapes", folder)
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        kept = dict(list(vocab.items())[:-12]) | {k: vocab[k] for k in ("<|startoftext|>", "<|endoftext|>")}
        (folder / "vocab.json").write_text(json.dumps(kept), encoding="utf-8")
        return run_call(lambda: faults.CLIPTokenizer.from_pretrained(folder))
    found.append(("vocab.json missing 12 tokens", vocab_probe, []))

    for dtype in (torch.int8, torch.int32, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.complex64):
        found.append((f"save_single_file(dtype={dtype})",
                      lambda dtype=dtype: run_call(lambda: pipe.save_single_file(work / "int.safetensors", dtype=dtype)), [model]))

    def thread_probe():
        torch.manual_seed(0)
        layer = faults.Transformer2DModel(4, 8, 32, num_layers=1, cross_attention_dim=24, norm_num_groups=8).eval()
        x, context = torch.randn(1, 32, 4, 4), torch.randn(1, 7, 24)
        inside, done, result = faults.threading.Event(), faults.threading.Event(), {}

        def recording():
            with torch.no_grad(), faults.record_attention(layer) as maps:
                inside.set()
                done.wait(30)
                layer(x, context)
            result["calls"] = dict(maps.calls)

        thread = faults.threading.Thread(target=recording)
        thread.start()
        inside.wait(30)
        with torch.no_grad():
            layer(2 * x, context)  # another thread's generation
        done.set()
        thread.join(30)
        return ("clear error", "only its own call recorded") if result["calls"] == {"transformer_blocks.0.attn2": 1} \
            else ("silent wrong", f"recorded {result['calls']}")
    found.append(("record_attention while another thread generates", thread_probe, []))

    # paths and devices
    for typo in ("tiny-sdd", "./tiny-sdd", "tiny-sd/unett", "tiny-s"):
        def path_probe(typo=typo):
            with contextlib.chdir(work):  # where the learner's tiny-sd/ is
                outcome, detail = run_call(lambda: faults.load_pipeline(typo))
            if outcome == "clear error" and "taken for a Hugging Face hub id" in detail:
                return "unhelpful crash", detail  # the hub message for a local path
            return outcome, detail
        found.append((f"load_pipeline({typo!r}) (mistyped local path)", path_probe, [model]))
    for device in ("meta", "cuda:7", "nonsense", "xla"):
        found.append((f"load_pipeline(device={device!r})", lambda device=device: run_call(lambda: faults.load_pipeline(model, device=device)), [model]))

    # saving faults
    def failed_save_probe():
        target = work / "saved"
        if not target.exists():
            pipe.save_pretrained(target)
        before = faults.snapshot(target)
        import sdlearn.models.files as files
        original = files.fsync_file

        def broken(path):
            raise OSError(28, "No space left on device")
        files.fsync_file = broken
        try:
            outcome, detail = run_call(lambda: pipe.save_pretrained(target, overwrite=True))
        finally:
            files.fsync_file = original
        if faults.snapshot(target) != before:
            return "data loss", "the previous model changed"
        faults.load_pipeline(target)
        return outcome, detail
    found.append(("save_pretrained(overwrite=True) onto a full disk", failed_save_probe, []))

    # commands
    out = work / "cli" / "a.png"
    out.parent.mkdir()
    for args, _ in faults.generate_faults(model, out):
        found.append(("sdlearn " + " ".join(a for a in args if a not in (PROMPT_ARG, str(model), str(out))),
                      lambda args=args: run_command("sdlearn", args), [model]))
    for args, _ in faults.EVALUATE_FAULTS:
        args = [str(work / "missing" / "x.json") if a == "MISSING/x.json" else str(work) if a == "TMP" else a for a in args]
        found.append(("python -m sdlearn.evaluate " + " ".join(args), lambda args=args: run_command("sdlearn.evaluate", args),
                      [REPO / "data" / "ddpm-shapes", REPO / "data" / "mini-sd"]))
    for module, cases in faults.RECIPE_FAULTS.items():
        for args, _ in cases:
            target = work / "recipe-out"
            found.append((f"python -m {module} " + " ".join(args),
                          lambda module=module, args=args, target=target: run_command(module, faults.recipe_args(module, target, args)), []))
        for name, rel in ((f"leftover {faults.LEFTOVERS[module]}", faults.LEFTOVERS[module]), ("--out is a file", None)):
            def leftover_probe(module=module, rel=rel):
                target = work / f"leftover-{module}"
                shutil.rmtree(target, ignore_errors=True)
                if rel is None:
                    target.write_text("notes")
                else:
                    (target / rel).parent.mkdir(parents=True)
                    (target / rel).write_bytes(b"a learner's model")
                before = faults.snapshot(target)
                outcome, detail = run_command(module, faults.recipe_args(module, target, []))
                if faults.snapshot(target) != before:
                    return "data loss", "the leftover changed"
                if target.is_file():
                    target.unlink()
                return outcome, detail
            found.append((f"python -m {module}: {name}", leftover_probe, []))
    # python -m sdlearn.bench
    for args in (["unet", "--config", "tiny", "--repeats", "-1", "--cpu-only"], ["unet", "--config", "tiny", "--batch", "0", "--cpu-only"],
                 ["unet", "--config", "tiny", "--size", "0", "--cpu-only"], ["pipeline", "--config", "tiny", "--size", "0"]):
        found.append(("python -m sdlearn.bench " + " ".join(args), lambda args=args: run_command("sdlearn.bench", args), []))
    return found


PROMPT_ARG = faults.PROMPT


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=60, help="seconds after which a probe counts as a hang")
    parser.add_argument("--verbose", action="store_true", help="print every probe, not only those that are not clear errors")
    args = parser.parse_args(argv)
    import sdlearn.train

    def no_training(*a, **k):
        raise AssertionError("training started")  # a recipe that accepts a bad argument must not run for minutes here

    sdlearn.train.train = no_training
    for name in ("ddpm", "mini_sd", "tiny_vae", "classifier", "clip"):
        setattr(__import__(f"sdlearn.recipes.{name}", fromlist=["train"]), "train", no_training)
    counts = dict.fromkeys(OUTCOMES, 0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        found = probes(work)
        for name, thunk, watched in found:
            before = faults.snapshot(*watched) if watched else None
            try:
                with time_limit(args.limit):
                    outcome, detail = thunk()
            except Hang:
                outcome, detail = "hang", f"still running after {args.limit} s"
            if watched and faults.snapshot(*watched) != before:
                outcome, detail = "data loss", "a watched file changed"
            counts[outcome] += 1
            if args.verbose or outcome != "clear error":
                print(f"{outcome:15s} {name}: {' '.join(str(detail).split())[:160]}")
    print(f"\n{len(found)} probes")
    for outcome in OUTCOMES:
        print(f"  {outcome:15s} {counts[outcome]}")
    return 0 if counts["clear error"] == len(found) else 1


if __name__ == "__main__":
    sys.exit(main())
