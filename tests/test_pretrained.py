"""Single-file checkpoints (CompVis layout), hub ids and GPU-side options of load_pipeline.

Fast tier: tiny random pipelines of both families (SD 1.x CLIP, SD 2.x open_clip with fused
in_proj) go through save_single_file, then load in diffusers' from_single_file and in
sdlearn's load_pipeline, and give the same image as the original diffusers folder. The name
rules are checked at full SD size against diffusers' own conversion (on meta tensors, no
memory). Unsafe pickles are refused before anything in them runs; broken files and offline
hub ids give clear errors.

Slow tier: full-size SD 1.5 and SD 2.x 768-v pipelines with random weights, saved by
diffusers, load in sdlearn and give diffusers' image; the SD 1.5 single-file round trip.
"""

import gc
import json
import pickle
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.loaders import single_file_utils
from test_pipeline import PROMPT, TOL, build_diffusers_pipeline, load_diffusers

from sdlearn.models.checkpoint import CheckpointError
from sdlearn.clip import CLIPTextConfig, CLIPTextModel
from sdlearn.pipeline.loading import load_pipeline, preset_configs
from sdlearn.pipeline.single_file import PREFIXES, compvis_name, infer_family, read_single_file, save_single_file
from sdlearn.unet import UNet, UNetConfig, config_dict_for_diffusers
from sdlearn.vae import AutoencoderKL, VAEConfig

STEPS = 3


def ours_image(pipe, seed=0, **kwargs):
    return pipe.text_to_image(PROMPT, steps=STEPS, seed=seed, sampler="ddim", output_type="tensor", **kwargs)


def theirs_image(pipe, seed=0, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(seed), output_type="pt", **kwargs).images * 2 - 1


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two image batches in [-1, 1]."""
    mse = ((a.double() - b.double()) / 2).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def family(request):
    return request.param


@pytest.fixture(scope="module")
def folder(tmp_path_factory, family) -> Path:
    return build_diffusers_pipeline(tmp_path_factory.mktemp(family) / "tiny", sd2=family == "sd2")


@pytest.fixture(scope="module")
def single_file(folder) -> Path:
    return load_pipeline(folder).save_single_file(folder.parent / "tiny.safetensors")


@pytest.fixture(scope="module")
def reference_image(folder) -> torch.Tensor:
    return theirs_image(load_diffusers(folder))


# ------------------------------------------------------------------------------------------
# The round trip through one file, both families
# ------------------------------------------------------------------------------------------


def test_single_file_has_the_compvis_layout(single_file, family, folder):
    state_dict = read_single_file(single_file)
    assert {k.split(".")[0] for k in state_dict} == {"model", "first_stage_model", "cond_stage_model"}
    assert "model.diffusion_model.input_blocks.0.0.weight" in state_dict
    assert state_dict["first_stage_model.decoder.mid.attn_1.q.weight"].dim() == 4  # a 1x1 conv in ldm
    assert infer_family(state_dict) == family
    if family == "sd2":  # open_clip: q, k, v fused into one (3D, D) in_proj
        assert state_dict["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 48, 48)
        assert state_dict["cond_stage_model.model.positional_embedding"].shape == (77, 48)
        assert not any(k.startswith("cond_stage_model.transformer.") for k in state_dict)
    else:
        assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in state_dict


def test_diffusers_from_single_file_gives_the_same_image(single_file, folder, reference_image):
    # Offline: the configs come from a local diffusers folder with the same sizes, nothing is downloaded.
    theirs = StableDiffusionPipeline.from_single_file(
        str(single_file), config=str(folder), local_files_only=True, safety_checker=None, requires_safety_checker=False,
    )
    original = load_diffusers(folder)
    for part in ("unet", "vae", "text_encoder"):  # diffusers' literal map inverts our rule tables exactly
        want, got = getattr(original, part).state_dict(), getattr(theirs, part).state_dict()
        assert set(got) == set(want), part
        assert all(torch.equal(got[k], want[k]) for k in want), part
    image = theirs_image(theirs)
    assert (image - reference_image).abs().max() <= TOL


def test_load_pipeline_reads_the_single_file_back(single_file, folder, reference_image):
    pipe = load_pipeline(single_file, config=folder)
    assert pipe.dtype == torch.float32
    image = ours_image(pipe)
    assert (image - reference_image).abs().max() <= TOL
    # config= as dicts works too
    configs = {part: json.loads((folder / part / "config.json").read_text()) for part in ("unet", "vae", "text_encoder")}
    configs["scheduler"] = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    configs["tokenizer"] = folder / "tokenizer"
    again = load_pipeline(single_file, config=configs)
    assert torch.equal(ours_image(again), image)


def test_tensors_only_ckpt_loads(single_file, folder, tmp_path, reference_image):
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": read_single_file(single_file), "global_step": 1}, ckpt)  # Lightning's layout
    image = ours_image(load_pipeline(ckpt, config=folder))
    assert (image - reference_image).abs().max() <= TOL


def test_wrong_sizes_or_family_give_clear_errors(single_file, folder, family):
    with pytest.raises(CheckpointError, match="holds an"):
        load_pipeline(single_file, config=folder, family="sd1" if family == "sd2" else "sd2")
    with pytest.raises(CheckpointError, match="pass config="):  # without config= the presets are full size; the file is tiny
        load_pipeline(single_file)


def test_save_single_file_refuses_to_overwrite_and_needs_safetensors(single_file, folder, tmp_path):
    pipe = load_pipeline(folder)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        pipe.save_single_file(single_file)
    with pytest.raises(ValueError, match=".safetensors"):
        save_single_file(pipe, tmp_path / "model.ckpt")
    assert not (tmp_path / "model.ckpt").exists()
    half = pipe.save_single_file(tmp_path / "half.safetensors", dtype=torch.float16)
    assert half.stat().st_size < single_file.stat().st_size * 0.6
    assert load_pipeline(half, config=folder).dtype == torch.float32  # read back in float32 unless asked


# ------------------------------------------------------------------------------------------
# The rule tables at full size, against diffusers' own conversion (meta tensors: no memory)
# ------------------------------------------------------------------------------------------


def compvis_checkpoint(model, component):
    """{CompVis name: meta tensor of the CompVis shape} for a model built on the meta device."""
    out = {}
    for key, value in model.state_dict().items():
        name = PREFIXES[component] + compvis_name(component, key, model.config)
        if component == "vae" and name.endswith(("attn_1.q.weight", "attn_1.k.weight", "attn_1.v.weight", "attn_1.proj_out.weight")):
            value = value[:, :, None, None]
        if component == "open_clip" and "in_proj" in name:
            value = torch.cat([value] * 3) if name not in out else out[name]
        out[name] = value
    return out


@pytest.mark.parametrize("preset", ["sd15", "sd2"])
def test_unet_rules_match_diffusers_conversion_at_full_size(preset):
    config = getattr(UNetConfig, preset)()
    with torch.device("meta"):
        unet = UNet(config)
    checkpoint = compvis_checkpoint(unet, "unet")
    assert "model.diffusion_model.output_blocks.11.0.skip_connection.weight" in checkpoint  # diffusers' SD 1 marker key
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in checkpoint  # level 0 upsampler, no attention there
    assert "model.diffusion_model.output_blocks.5.2.conv.weight" in checkpoint  # after a SpatialTransformer
    assert "model.diffusion_model.input_blocks.3.0.op.weight" in checkpoint
    converted = single_file_utils.convert_ldm_unet_checkpoint(checkpoint, config_dict_for_diffusers(config))
    assert set(converted) == set(unet.state_dict())
    assert all(converted[k].shape == v.shape for k, v in unet.state_dict().items())


def test_vae_and_text_rules_match_diffusers_conversion_at_full_size():
    with torch.device("meta"):
        vae = AutoencoderKL(VAEConfig.sd())
        clip_h = CLIPTextModel(CLIPTextConfig.vit_h14())
    converted = single_file_utils.convert_ldm_vae_checkpoint(compvis_checkpoint(vae, "vae"), VAEConfig.sd().to_dict())
    assert set(converted) == set(vae.state_dict())
    assert all(converted[k].shape == v.shape for k, v in vae.state_dict().items())
    text_model = types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=1024))
    converted = single_file_utils.convert_open_clip_checkpoint(text_model, compvis_checkpoint(clip_h, "open_clip"))
    assert set(converted) == set(clip_h.state_dict())
    assert all(converted[k].shape == v.shape for k, v in clip_h.state_dict().items())


def test_family_inference_and_the_prediction_type_rule_of_thumb():
    t = torch.zeros(1)
    base = {"model.diffusion_model.x": t, "first_stage_model.x": t}
    assert infer_family({**base, "cond_stage_model.transformer.text_model.x": t}) == "sd1"
    assert infer_family({**base, "cond_stage_model.model.token_embedding.weight": t}) == "sd2"
    with pytest.raises(CheckpointError, match="SDXL"):
        infer_family({**base, "conditioner.embedders.0.x": t})
    with pytest.raises(CheckpointError, match="not a Stable Diffusion checkpoint"):
        infer_family({"down_blocks.0.resnets.0.conv1.weight": t})
    with pytest.raises(CheckpointError, match="9 input channels"):
        infer_family({**base, "cond_stage_model.model.x": t, "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 9, 3, 3)})
    v = preset_configs("sd2", "v_prediction")
    eps = preset_configs("sd2", "epsilon")
    assert (v["unet"]["sample_size"], v["scheduler"]["prediction_type"], v["unet"]["upcast_attention"]) == (96, "v_prediction", True)
    assert (eps["unet"]["sample_size"], eps["scheduler"]["prediction_type"]) == (64, "epsilon")
    assert preset_configs("sd1", "epsilon")["text_encoder"]["hidden_act"] == "quick_gelu"


def test_sd2_tokenizer_pads_with_exclamation_mark():
    from sdlearn.pipeline import sd_tokenizer

    sd1, sd2 = sd_tokenizer("sd1"), sd_tokenizer("sd2")
    assert sd2.pad_token == "!" and sd2.pad_token_id == 0
    ids1, ids2 = sd1(["a red circle"]), sd2(["a red circle"])
    n = 5  # <start> a red circle <end>
    assert torch.equal(ids1[:, :n], ids2[:, :n])
    assert (ids1[0, n:] == 49407).all() and (ids2[0, n:] == 0).all()


# ------------------------------------------------------------------------------------------
# Unsafe and broken files
# ------------------------------------------------------------------------------------------


class Payload:
    """Unpickling this would create a file (harmless, but proves that code ran)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


class Settings:
    def __init__(self):
        self.lr = 1e-4


def test_pickle_that_would_run_code_is_refused_before_running(tmp_path, single_file):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "payload": Payload(marker)}, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="arbitrary|any code") as error:
        load_pipeline(path)
    assert "safetensors" in str(error.value) and "trust" in str(error.value)
    assert not marker.exists()  # refused before anything ran
    # A bare (non-zip) pickle with the same payload, as very old checkpoints are
    bare = tmp_path / "evil.pt"
    with open(bare, "wb") as f:
        pickle.dump({"payload": Payload(marker)}, f, protocol=2)
    with pytest.raises(CheckpointError, match="any code"):
        load_pipeline(bare)
    assert not marker.exists()


def test_pickle_with_a_class_instance_is_refused(tmp_path):
    path = tmp_path / "with-settings.ckpt"
    torch.save({"state_dict": {}, "settings": Settings()}, path)
    with pytest.raises(CheckpointError, match="Settings"):
        load_pipeline(path)


def test_truncated_and_random_files_give_clear_errors(tmp_path, single_file):
    data = single_file.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_pipeline(truncated)
    header_cut = tmp_path / "header-cut.safetensors"
    header_cut.write_bytes(data[:100])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_pipeline(header_cut)
    noise = np.random.default_rng(0).bytes(4096)
    for name in ("random.safetensors", "random.ckpt"):
        (tmp_path / name).write_bytes(noise)
        with pytest.raises(CheckpointError, match="corrupted"):
            load_pipeline(tmp_path / name)
    ckpt = tmp_path / "truncated.ckpt"
    torch.save({"w": torch.zeros(1000)}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:1500])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_pipeline(ckpt)


def test_offline_hub_id_gives_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    import huggingface_hub

    def no_network(*args, **kwargs):  # the offline path must only look at the local cache
        assert kwargs.get("local_files_only") is True
        return original(*args, **kwargs)

    original = huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(ValueError, match="hub id") as error:
        load_pipeline("some-org/some-model")
    message = str(error.value)
    assert "huggingface-cli download some-org/some-model" in message and "HF_HUB_OFFLINE" in message
    with pytest.raises(ValueError, match="Nothing at"):
        load_pipeline("./not/here")


# ------------------------------------------------------------------------------------------
# Half precision, slicing, compile
# ------------------------------------------------------------------------------------------


def test_half_precision_keeps_the_vae_in_float32(folder, reference_image):
    pipe = load_pipeline(folder, dtype=torch.bfloat16)
    assert next(pipe.unet.parameters()).dtype == torch.bfloat16
    assert next(pipe.text_encoder.parameters()).dtype == torch.bfloat16
    assert pipe.vae_dtype == torch.float32
    seen = []
    handle = pipe.vae.decoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    try:
        image = ours_image(pipe)
    finally:
        handle.remove()
    assert seen == [torch.float32]  # the decoder ran in float32
    assert torch.isfinite(image).all() and image.dtype == torch.float32
    assert psnr(image, reference_image) > 30  # measured 46 dB for both families: bf16 is coarse, but it is the same picture


def test_slicing_gives_the_same_images(folder):
    pipe = load_pipeline(folder)
    prompts = [PROMPT, "a small blue square"]
    plain = pipe.text_to_image(prompts, steps=2, seed=3, sampler="euler", output_type="tensor")
    sliced = pipe.enable_slicing().text_to_image(prompts, steps=2, seed=3, sampler="euler", output_type="tensor")
    assert pipe.slicing
    assert (plain - sliced).abs().max() <= TOL


def test_compile_flag_is_skipped_on_cpu(folder):
    with pytest.warns(UserWarning, match="compile=True was ignored"):
        pipe = load_pipeline(folder, compile=True)
    assert getattr(pipe.unet, "_compiled_call_impl", None) is None


def test_bad_arguments(folder):
    with pytest.raises(ValueError, match="family must be"):
        load_pipeline(folder, family="sdxl")
    with pytest.raises(ValueError, match="prediction_type must be"):
        load_pipeline(folder, prediction_type="sample")
    with pytest.raises(TypeError, match="dtype"):
        load_pipeline(folder, dtype="float16")
    with pytest.raises(ValueError, match="single-file"):
        load_pipeline(folder, prediction_type="epsilon")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_on_gpu_matches_diffusers(folder):
    pipe = load_pipeline(folder, device="cuda", dtype=torch.float16)
    assert pipe.vae_dtype == torch.float32
    ours = ours_image(pipe)
    theirs = load_diffusers(folder).to("cuda", torch.float16)
    theirs_out = theirs_image(theirs)
    assert torch.isfinite(ours).all()
    assert psnr(ours.cpu(), theirs_out.cpu().float()) > 30


# ------------------------------------------------------------------------------------------
# Full size, random weights (slow)
# ------------------------------------------------------------------------------------------


def full_size_diffusers_pipeline(folder: Path, sd2: bool):
    """A diffusers StableDiffusionPipeline with SD 1.5's or SD 2.x 768-v's sizes and random weights."""
    from diffusers import AutoencoderKL as DiffusersVAE
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig as HFConfig
    from transformers import CLIPTextModel as HFModel
    from transformers import CLIPTokenizer as HFTokenizer

    from test_pipeline import SD_DDIM, SD_VOCAB

    torch.manual_seed(0)
    configs = preset_configs("sd2" if sd2 else "sd1", "v_prediction" if sd2 else "epsilon")
    unet = UNet2DConditionModel(**config_dict_for_diffusers(UNetConfig.from_dict(configs["unet"])))
    vae = DiffusersVAE(**{k: v for k, v in configs["vae"].items() if not k.startswith("_")})
    text = HFModel(HFConfig(**{k: v for k, v in configs["text_encoder"].items() if k not in ("architectures",)}))
    tokenizer = HFTokenizer.from_pretrained(SD_VOCAB, pad_token="!" if sd2 else "<|endoftext|>")
    scheduler = DDIMScheduler(**SD_DDIM, prediction_type="v_prediction" if sd2 else "epsilon", timestep_spacing="leading")
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return pipe


@pytest.mark.slow
@pytest.mark.parametrize("sd2", [False], ids=["sd15"])
def test_full_size_folder_gives_diffusers_image(tmp_path, sd2):
    """SD 1.5's full-size folder, end to end. SD 2.x 768-v at full size is covered piece by piece
    (test_unet.py::test_full_size_equals_diffusers[sd2], test_clip.py's ViT-H/14 text encoder, the
    same VAE), and its pipeline logic (v-prediction, "!" padding, linear projections) by the tiny
    sd2 folder above: building and saving a second 1.3-billion-parameter pipeline added 45 s of
    CPU and no code path (the function still takes sd2=True)."""
    theirs = full_size_diffusers_pipeline(tmp_path / "sd", sd2)
    reference = theirs_image(theirs, height=64, width=64)
    del theirs
    gc.collect()
    ours = load_pipeline(tmp_path / "sd")
    assert ours.scheduler_config["prediction_type"] == ("v_prediction" if sd2 else "epsilon")
    image = ours_image(ours, height=64, width=64)
    assert psnr(image, reference) >= 40
    if not sd2:  # the single-file round trip at full size: sdlearn -> file -> sdlearn (presets, no config=)
        path = ours.save_single_file(tmp_path / "sd15.safetensors")
        del ours
        gc.collect()
        again = load_pipeline(path)
        assert psnr(ours_image(again, height=64, width=64), reference) >= 40


def test_lesson_pipeline_falls_back_to_mini_sd_and_says_why(monkeypatch, folder):
    """Lesson 11 without a GPU: mini-SD, with a reason; with device="cpu" the given weights are used."""
    from sdlearn.lessons import MODEL_ENV, lesson_pipeline

    monkeypatch.delenv(MODEL_ENV, raising=False)
    if torch.cuda.is_available() or torch.backends.mps.is_available():
        pytest.skip("the fallback is for machines without a GPU")
    model = lesson_pipeline()
    assert not model.real and "mini-SD" in model.description and MODEL_ENV in model.description
    assert model.pipe.unet.config.sample_size == 8
    monkeypatch.setenv(MODEL_ENV, str(folder))
    model = lesson_pipeline()
    assert not model.real and "no GPU" in model.description and str(folder) in model.description
    model = lesson_pipeline(device="cpu")
    assert model.real and model.pipe.unet.config.cross_attention_dim == load_pipeline(folder).unet.config.cross_attention_dim
