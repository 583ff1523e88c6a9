"""Speed of sdlearn's models against the libraries they are proven equal to.

    python -m sdlearn.bench unet                 # SD 1.5 UNet, batch 2, 4x32x32, fp32 on CPU
                                                 # (+ fp16 at 4x64x64 when CUDA is available)
    python -m sdlearn.bench unet --config sd2 --size 48 --repeats 7
    python -m sdlearn.bench pipeline             # SD 1.5 sizes, random weights, 64x64 fp32 on CPU
                                                 # (+ 512x512 fp16 when CUDA is available)
    python -m sdlearn.bench unet --repeats 31 --count-ops --json data/bench/unet-cpu.json
                                                 # what `make bench` runs: the record README.md quotes

Both models run in one process on the same weights (ours shares diffusers' parameter
tensors, so memory is paid once) and the same inputs. Repetitions are interleaved (ours,
theirs, theirs, ours, ...) after warm-up runs so that drifting machine load affects both
alike; the report gives the median time of each and the ratio ours / diffusers (lower is
better), and the largest difference between the outputs as a check that both computed
the same thing. The fastest call of each is reported too: on a CPU shared with other work,
noise only ever adds time, so the ratio of the fastest calls is the steadier estimate of the
models' own cost when the medians sit within a few per cent of each other.

--json FILE also writes the run as a record: the command, the machine (CPU, threads, library
versions) and, per timed case, every call's time, the medians, the fastest calls, their
ratios, the largest difference and (with --count-ops) the operator counts.

Each benchmark is a subcommand; add one with a `bench_<name>(args)` function and a parser
in `build_parser`.
"""

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch


class Times(list):
    """Seconds of each timed call of one function."""

    @property
    def median(self) -> float:
        return statistics.median(self)

    @property
    def best(self) -> float:
        return min(self)


@dataclass
class Timing:
    label: str
    ours: Times
    theirs: Times
    max_abs_diff: float
    operator_calls: dict = field(default_factory=dict)  # {"sdlearn": n, "diffusers": n} per forward pass, with --count-ops

    @property
    def ours_s(self) -> float:
        return self.ours.median

    @property
    def theirs_s(self) -> float:
        return self.theirs.median

    @property
    def ratio(self) -> float:
        """Median time of ours / median time of diffusers'."""
        return self.ours_s / self.theirs_s

    @property
    def best_ratio(self) -> float:
        """Fastest call of ours / fastest call of diffusers'."""
        return self.ours.best / self.theirs.best

    def record(self) -> dict:
        """This case as JSON-ready numbers (milliseconds, rounded to 1 us; ratios to 3 decimals)."""
        ms = lambda seconds: round(seconds * 1000, 3)  # noqa: E731
        return {
            "label": self.label, "calls": len(self.ours),
            "sdlearn_ms": ms(self.ours_s), "diffusers_ms": ms(self.theirs_s), "ratio": round(self.ratio, 3),
            "sdlearn_fastest_ms": ms(self.ours.best), "diffusers_fastest_ms": ms(self.theirs.best),
            "fastest_ratio": round(self.best_ratio, 3), "max_abs_diff": self.max_abs_diff,
            **({"operator_calls": self.operator_calls} if self.operator_calls else {}),
            "sdlearn_calls_ms": [ms(t) for t in self.ours], "diffusers_calls_ms": [ms(t) for t in self.theirs],
        }

    def line(self) -> str:
        return (
            f"{self.label}: sdlearn {self.ours_s * 1000:.1f} ms, diffusers {self.theirs_s * 1000:.1f} ms, "
            f"ratio {self.ratio:.3f} (lower is better; fastest calls {self.ours.best * 1000:.1f} / "
            f"{self.theirs.best * 1000:.1f} ms, ratio {self.best_ratio:.3f}; {len(self.ours)} calls each), "
            f"max |diff| {self.max_abs_diff:.2e}"
        )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict, repeats: int = 5, warmup: int = 1, device: torch.device | None = None) -> dict:
    """Seconds of every timed call of each function (Times), calls interleaved with alternating order."""
    device = device or torch.device("cpu")
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    _sync(device)
    times = {name: Times() for name in names}
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            _sync(device)
            start = time.perf_counter()
            fns[name]()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def count_operator_calls(fn) -> dict:
    """How many times one call of `fn` runs each torch operator (aten::...), from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {event.key: event.count for event in prof.key_averages() if event.key.startswith("aten::")}


def operator_line(ours: dict, theirs: dict, top: int = 4) -> str:
    """One line comparing two operator counts: totals and the operators whose counts differ most."""
    differing = sorted(set(ours) | set(theirs), key=lambda k: -abs(ours.get(k, 0) - theirs.get(k, 0)))
    shown = ", ".join(f"{k[6:]} {ours.get(k, 0)} vs {theirs.get(k, 0)}" for k in differing[:top] if ours.get(k, 0) != theirs.get(k, 0))
    return (f"  operator calls per forward pass: sdlearn {sum(ours.values())}, diffusers {sum(theirs.values())}"
            + (f" (most different: {shown})" if shown else ""))


# UNet ------------------------------------------------------------------------------------------


def build_unet_pair(config, device="cpu", dtype=torch.float32, seed=0):
    """diffusers' UNet2DConditionModel with seeded random weights, and sdlearn's UNet sharing them."""
    from diffusers import UNet2DConditionModel

    from sdlearn.models.unet import UNet, config_dict_for_diffusers

    torch.manual_seed(seed)
    theirs = UNet2DConditionModel(**config_dict_for_diffusers(config)).eval()
    if dtype != torch.float32 or torch.device(device).type != "cpu":
        theirs = theirs.to(device=device, dtype=dtype)
    with torch.device("meta"):  # no second random init: the weights are taken from diffusers'
        ours = UNet(config)
    ours.load_state_dict(theirs.state_dict(), strict=True, assign=True)
    return ours.eval(), theirs


def _unet_case(ours, theirs, label, batch, size, device, dtype, repeats, warmup, count_ops=False) -> Timing:
    config = ours.config
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, config.in_channels, size, size, generator=g).to(device, dtype)
    context = torch.randn(batch, 77, config.cross_attention_dim, generator=g).to(device, dtype)
    t = torch.full((batch,), 500, device=device)
    with torch.inference_mode():
        diff = (ours(x, t, context).float() - theirs(x, t, context).sample.float()).abs().max().item()
        times = time_interleaved(
            {"ours": lambda: ours(x, t, context), "theirs": lambda: theirs(x, t, context, return_dict=False)},
            repeats=repeats,
            warmup=warmup,
            device=torch.device(device),
        )
        operators = {}
        if count_ops:
            ours_ops = count_operator_calls(lambda: ours(x, t, context))
            theirs_ops = count_operator_calls(lambda: theirs(x, t, context, return_dict=False))
            print(operator_line(ours_ops, theirs_ops), flush=True)
            operators = {"sdlearn": sum(ours_ops.values()), "diffusers": sum(theirs_ops.values())}
    return Timing(label, times["ours"], times["theirs"], diff, operators)


def bench_unet(args) -> list:
    from sdlearn.models.unet import UNetConfig

    config = getattr(UNetConfig, args.config)()
    results = []
    ours, theirs = build_unet_pair(config, "cpu", torch.float32)
    label = f"UNet {args.config}, batch {args.batch}, 4x{args.size}x{args.size}, fp32, CPU ({torch.get_num_threads()} threads)"
    results.append(_unet_case(ours, theirs, label, args.batch, args.size, "cpu", torch.float32, args.repeats, args.warmup, args.count_ops))
    print(results[-1].line(), flush=True)
    del ours, theirs
    if torch.cuda.is_available() and not args.cpu_only:
        ours, theirs = build_unet_pair(config, "cuda", torch.float16)
        size = args.cuda_size
        label = f"UNet {args.config}, batch {args.batch}, 4x{size}x{size}, fp16, {torch.cuda.get_device_name()}"
        results.append(_unet_case(ours, theirs, label, args.batch, size, "cuda", torch.float16, args.repeats * 4, args.warmup + 2))
        print(results[-1].line(), flush=True)
    return results


# Pipeline --------------------------------------------------------------------------------------


def build_pipeline_pair(preset: str = "sd15", device="cpu", dtype=torch.float32, seed=0):
    """diffusers' StableDiffusionPipeline with seeded random weights, and sdlearn's StableDiffusion on the same tensors.

    preset "tiny" (toy sizes, seconds) or "sd15" (Stable Diffusion 1.5's sizes: 1.07 B parameters).
    The UNet and the autoencoder share diffusers' parameter tensors (memory is paid once); the
    text encoder is copied. Both use DDIM on SD's noise schedule. In half precision sdlearn
    keeps its autoencoder in float32 (as load_pipeline does); diffusers upcasts its own for the
    decode when force_upcast is set, so both decode in float32.
    """
    from diffusers import AutoencoderKL as DiffusersVAE
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig as HFCLIPTextConfig
    from transformers import CLIPTextModel as HFCLIPTextModel
    from transformers import CLIPTokenizer as HFCLIPTokenizer

    from sdlearn.models.clip import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    from sdlearn.pipeline.stable_diffusion import SD_SCHEDULER_CONFIG, StableDiffusion
    from sdlearn.pipeline.loading import SD_TOKENIZER
    from sdlearn.models.unet import UNet, UNetConfig, config_dict_for_diffusers
    from sdlearn.models.vae import AutoencoderKL, VAEConfig

    if preset == "sd15":
        unet_config, vae_config, text_config = UNetConfig.sd15(), VAEConfig.sd(), CLIPTextConfig.vit_l14()
    else:
        unet_config, vae_config = UNetConfig.tiny(), VAEConfig.tiny(scaling_factor=0.5)
        text_config = CLIPTextConfig.tiny(hidden_size=32, intermediate_size=64, bos_token_id=49406, eos_token_id=49407)
    scheduler_config = {**SD_SCHEDULER_CONFIG, "_class_name": "DDIMScheduler"}
    scheduler_config.pop("skip_prk_steps")
    torch.manual_seed(seed)
    theirs_unet = UNet2DConditionModel(**config_dict_for_diffusers(unet_config)).eval()
    theirs_vae = DiffusersVAE(**{k: v for k, v in vae_config.to_dict().items() if not k.startswith("_")}).eval()
    hf_text = {k: v for k, v in text_config.to_dict().items() if k not in ("architectures",)}
    theirs_text = HFCLIPTextModel(HFCLIPTextConfig(**hf_text)).eval()
    theirs = StableDiffusionPipeline(
        unet=theirs_unet, vae=theirs_vae, text_encoder=theirs_text, tokenizer=HFCLIPTokenizer.from_pretrained(SD_TOKENIZER),
        scheduler=DDIMScheduler(**{k: v for k, v in scheduler_config.items() if not k.startswith("_")}),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    if torch.device(device).type != "cpu" or dtype != torch.float32:
        theirs.to(device=device, dtype=dtype)
    theirs.set_progress_bar_config(disable=True)
    with torch.device("meta"):  # no second random init: the tensors are diffusers'
        unet, vae = UNet(unet_config), AutoencoderKL(vae_config)
    unet.load_state_dict(theirs.unet.state_dict(), strict=True, assign=True)
    vae.load_state_dict(theirs.vae.state_dict(), strict=True, assign=True)
    text_encoder = CLIPTextModel(text_config)
    text_encoder.load_checked_state_dict(theirs.text_encoder.state_dict())
    ours = StableDiffusion(unet, vae, text_encoder, CLIPTokenizer.from_pretrained(SD_TOKENIZER), scheduler_config)
    ours.to(device=device, dtype=dtype)  # in half precision: vae back to float32 (its own copy)
    return ours, theirs


def bench_pipeline(args) -> list:
    runs = [("cpu", torch.float32, args.config, args.size, args.steps, args.repeats)]
    if torch.cuda.is_available() and not args.cpu_only:
        runs.append(("cuda", torch.float16, "sd15", args.cuda_size, args.cuda_steps, args.repeats * 2))
    results = []
    prompt = "a large red circle in the top left"
    for device, dtype, preset, size, steps, repeats in runs:
        ours, theirs = build_pipeline_pair(preset, device, dtype)
        where = f"{device} ({torch.get_num_threads()} threads)" if device == "cpu" else torch.cuda.get_device_name()
        tag = f"{preset}, {size}x{size} px, {str(dtype).removeprefix('torch.')}, {where}"
        g = torch.Generator().manual_seed(1)
        h = size // ours.vae_scale_factor
        z = torch.randn(2, 4, h, h, generator=g).to(device, dtype)  # (2B, 4, h, w): both guidance halves
        context = torch.randn(2, 77, ours.unet.config.cross_attention_dim, generator=g).to(device, dtype)
        t = torch.full((2,), 500, device=device)
        latents = z[:1]
        with torch.inference_mode():
            # 1. One UNet step with guidance (batch 2)
            diff = (ours.unet(z, t, context).float() - theirs.unet(z, t, context).sample.float()).abs().max().item()
            times = time_interleaved({"ours": lambda: ours.unet(z, t, context), "theirs": lambda: theirs.unet(z, t, context, return_dict=False)},
                                       repeats=repeats, warmup=1, device=torch.device(device))
            results.append(Timing(f"UNet step with guidance, {tag}", times["ours"], times["theirs"], diff))
            print(results[-1].line(), flush=True)

            # 2. VAE decode of one latent, both in float32
            upcast = dtype in (torch.float16, torch.bfloat16) and theirs.vae.config.force_upcast

            def decode_theirs():
                vae = theirs.vae.to(torch.float32) if upcast else theirs.vae
                x = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
                if upcast:
                    theirs.vae.to(dtype)  # as diffusers' pipeline does after an upcast decode
                return x.clamp(-1, 1)

            diff = (ours.decode_latents(latents).float() - decode_theirs().float()).abs().max().item()
            times = time_interleaved({"ours": lambda: ours.decode_latents(latents), "theirs": decode_theirs},
                                       repeats=repeats, warmup=1, device=torch.device(device))
            results.append(Timing(f"VAE decode, {tag}", times["ours"], times["theirs"], diff))
            print(results[-1].line(), flush=True)

            # 3. End to end: text -> image, DDIM, guidance 7.5
            def generate_ours():
                return ours.text_to_image(prompt, height=size, width=size, steps=steps, seed=0, sampler="ddim", output_type="tensor")

            def generate_theirs():
                return theirs(prompt, height=size, width=size, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                              output_type="pt").images * 2 - 1

            diff = (generate_ours().float().cpu() - generate_theirs().float().cpu()).abs().max().item()
            times = time_interleaved({"ours": generate_ours, "theirs": generate_theirs},
                                       repeats=max(1, repeats // 2), warmup=0, device=torch.device(device))
            results.append(Timing(f"text_to_image {steps} DDIM steps, {tag}", times["ours"], times["theirs"], diff))
            print(results[-1].line(), flush=True)
        del ours, theirs
    return results


# Command line ----------------------------------------------------------------------------------


def _multiple_of(step: int):
    """An argparse type: a positive whole number divisible by `step` (a side the UNet and VAE can halve)."""
    from sdlearn.cli import POSITIVE_INT

    def parse(text: str) -> int:
        value = POSITIVE_INT(text)
        if value % step:
            raise argparse.ArgumentTypeError(f"must be a multiple of {step}, got {value}")
        return value

    parse.__name__ = "whole number"
    return parse


def build_parser() -> argparse.ArgumentParser:
    from sdlearn.cli import NON_NEGATIVE_INT, POSITIVE_INT, ArgumentParser

    parser = ArgumentParser(prog="python -m sdlearn.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    unet = commands.add_parser("unet", help="sdlearn's UNet vs diffusers' UNet2DConditionModel")
    unet.add_argument("--config", default="sd15", choices=["tiny", "tiny_sd2", "sd15", "sd2"], help="UNetConfig preset")
    unet.add_argument("--batch", type=POSITIVE_INT, default=2, help="batch size (2 = one image with classifier-free guidance)")
    unet.add_argument("--size", type=_multiple_of(8), default=32, help="latent height and width on the CPU (a multiple of 8)")
    unet.add_argument("--cuda-size", type=_multiple_of(8), default=64, help="latent height and width on CUDA (fp16)")
    unet.add_argument("--repeats", type=POSITIVE_INT, default=9, help="timed calls of each model (the median and the fastest are reported)")
    unet.add_argument("--warmup", type=NON_NEGATIVE_INT, default=1, help="untimed calls of each model first")
    unet.add_argument("--cpu-only", action="store_true", help="skip the CUDA run even if a GPU is present")
    unet.add_argument("--count-ops", action="store_true", help="also count the torch operators each model runs on the CPU (torch.profiler)")
    unet.add_argument("--json", type=Path, default=None, help="also write the run's record to this JSON file")
    unet.set_defaults(run=bench_unet)
    pipe = commands.add_parser("pipeline", help="sdlearn's StableDiffusion vs diffusers' StableDiffusionPipeline: UNet step, VAE decode, generation")
    pipe.add_argument("--config", default="sd15", choices=["tiny", "sd15"], help="model sizes (random weights) on the CPU")
    pipe.add_argument("--size", type=_multiple_of(8), default=64, help="image height and width on the CPU (fp32, a multiple of 8)")
    pipe.add_argument("--steps", type=POSITIVE_INT, default=3, help="sampler steps of the end-to-end run on the CPU")
    pipe.add_argument("--cuda-size", type=_multiple_of(8), default=512, help="image height and width on CUDA (SD 1.5 sizes, fp16)")
    pipe.add_argument("--cuda-steps", type=POSITIVE_INT, default=20, help="sampler steps of the end-to-end run on CUDA")
    pipe.add_argument("--repeats", type=POSITIVE_INT, default=3, help="timed calls of each (the median and the fastest are reported)")
    pipe.add_argument("--cpu-only", action="store_true", help="skip the CUDA run even if a GPU is present")
    pipe.add_argument("--json", type=Path, default=None, help="also write the run's record to this JSON file")
    pipe.set_defaults(run=bench_pipeline)
    return parser


def write_record(path: Path, argv, results: list) -> dict:
    """The run as a JSON record (see the module docstring), written atomically; returns it."""
    import diffusers

    from sdlearn.doctor import cpu_name
    from sdlearn.models.files import write_text

    record = {
        "command": "python -m sdlearn.bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "cpu": cpu_name(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "results": [timing.record() for timing in results],
    }
    write_text(Path(path), json.dumps(record, indent=2) + "\n")  # makes the folder if missing
    return record


def main(argv=None) -> int:
    from sdlearn.cli import USER_ERRORS, CLIError, report_error, writable_folder

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.json is not None:
        try:
            if args.json.is_dir():  # checked before the benchmark, not after it
                raise CLIError(f"--json {args.json} is a folder; give a file name.")
            writable_folder(args.json.parent, "--json's folder")  # made if missing
        except USER_ERRORS as exc:
            report_error(f"{parser.prog} {args.command}", exc)
            return 2
    results = args.run(args)
    if args.json is not None:
        write_record(args.json, argv, results)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
