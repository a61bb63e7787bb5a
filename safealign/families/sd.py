"""The Stable Diffusion families: `sd15`, `sd21` (v-prediction) and `sdxl` (two text encoders, time ids).

Each family wraps the diffusers components of a local checkpoint (a diffusers folder, or one single-file
``.safetensors`` checkpoint) behind the ``Family`` interface: prompts -> text-encoder states, images -> VAE latents
(scaled by the VAE's scaling factor, 8x smaller per side), latents -> images. What differs between the families
lives in class attributes (published configs, default resolution, number of text encoders) and in the SDXL
subclass (penultimate states of both encoders, pooled embeddings, time ids); code never branches on a name.

Nothing here downloads: loading is ``local_files_only`` and safetensors-only, never ``trust_remote_code``.
``build_random`` builds the same classes from the published configs (``size="full"``) or from shrunk ones
(``size="tiny"``) with random weights, for tests and benchmarks.
"""
from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from diffusers.loaders.single_file_utils import SingleFileComponentError
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from safealign.core.errors import MissingWeights, ParamsError
from safealign.core.hashing import file_sha256
from safealign.families.base import Cond, Family

Size = Literal["tiny", "full"]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TINY_RESOLUTION = 64  # tiny builds render 64 px images (8x8 latents)

# ---------------------------------------------------------------------------------------------- published configs
# The configs of the released checkpoints' diffusers folders (unet/, vae/, text_encoder*/ and scheduler/ config.json),
# written here so that random-weight builds need no download.
SCHEDULER_SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
UNET_SD15 = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
UNET_SD21 = dict(UNET_SD15, sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                 use_linear_projection=True)
UNET_SDXL = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
VAE_SD = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    sample_size=512, scaling_factor=0.18215,
)
VAE_SDXL = dict(VAE_SD, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, vocab_size=49408)
OPENCLIP_H = dict(CLIP_L, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                  hidden_act="gelu", projection_dim=512)
OPENCLIP_BIGG = dict(CLIP_L, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                     hidden_act="gelu", projection_dim=1280)


# ---------------------------------------------------------------------------------------------- tiny configs
def shrink_text(cfg: dict[str, Any]) -> dict[str, Any]:
    """A 2-layer, 32-wide text encoder of the same class and sequence length."""
    return dict(cfg, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                projection_dim=32)


def shrink_vae(cfg: dict[str, Any]) -> dict[str, Any]:
    """Same levels (so the same 8x latent factor), widths / 16 (at least 16), one layer per block.

    Chosen so that a VAE encode costs about what it does next to the UNet at full size (SD 1.5: 1.4 UNet
    forwards per image at 512 px, tiny: 1.25 at 64 px), which keeps the training benchmark honest.
    """
    widths = tuple(max(16, c // 16) for c in cfg["block_out_channels"])
    return dict(cfg, block_out_channels=widths, layers_per_block=1, norm_num_groups=8, sample_size=TINY_RESOLUTION)


def shrink_unet(cfg: dict[str, Any], text_dims: Sequence[int], pooled_dim: int) -> dict[str, Any]:
    """Same block types and conditioning as ``cfg``, 32-64 channels, one layer and one transformer per block."""
    n = len(cfg["block_out_channels"])
    tiny = dict(cfg, block_out_channels=tuple(32 if i == 0 else 64 for i in range(n)), layers_per_block=1,
                attention_head_dim=2, norm_num_groups=8, cross_attention_dim=sum(text_dims),
                sample_size=TINY_RESOLUTION // 8)
    if "transformer_layers_per_block" in cfg:
        tiny["transformer_layers_per_block"] = 1
    if cfg.get("addition_embed_type") == "text_time":
        tiny.update(addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + pooled_dim)
    return tiny


def byte_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """A CLIP tokenizer over the 256 byte symbols (with and without the end-of-word mark) and no merges.

    Built in memory, offline: the same class and special tokens as SD's tokenizers, with a 514-token vocabulary.
    """
    chars = [chr(c) for c in _byte_symbols()]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def _byte_symbols() -> list[int]:
    """GPT-2's reversible byte -> unicode code point map, in byte order of the printable ones first."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return printable + [256 + i for i in range(len(extra))]


# ---------------------------------------------------------------------------------------------- weights on disk
# The `base` stage's sample grid (benign, one seed each) and the tokenizer round-trip probe.
SAMPLE_PROMPTS = ("a photo of a cat sitting on a sofa", "a mountain lake at sunrise", "a bowl of fruit on a table",
                  "a city street in the rain")
TOKENIZER_PROBE = "a photo of an astronaut riding a horse on mars"
_SHARD = re.compile(r"-\d{5}-of-\d{5}$")


def weight_variant(filename: str) -> str | None:
    """The variant of a diffusers weight file: ``model.fp16.safetensors`` -> "fp16", ``model.safetensors`` -> None
    (shard suffixes ``-00001-of-00002`` ignored)."""
    parts = filename.split(".")
    return _SHARD.sub("", parts[-2]) if len(parts) >= 3 else None


def _hash_files(folder: Path, root: Path) -> dict[str, str]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in {".safetensors", ".json", ".txt"})
    return {str(p.relative_to(root)): file_sha256(p) for p in files}


def _place(module: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Move a module to ``device``, and cast it only if its dtype differs (diffusers warns on every cast)."""
    module = module.to(device)
    return module if next(module.parameters()).dtype == dtype else module.to(dtype)


class StableDiffusionFamily(Family):
    """SD 1.x / 2.x: one CLIP text encoder (last hidden states), a UNet over 4-channel VAE latents."""

    pipeline_name: ClassVar[str] = "StableDiffusionPipeline"  # the diffusers pipeline class (imported on use)
    pipeline_extras: ClassVar[dict[str, Any]] = dict(safety_checker=None, feature_extractor=None,
                                                     requires_safety_checker=False)
    default_resolution: ClassVar[int] = 512
    unet_config: ClassVar[dict[str, Any]] = UNET_SD15
    vae_config: ClassVar[dict[str, Any]] = VAE_SD
    text_configs: ClassVar[tuple[tuple[type, dict[str, Any]], ...]] = ((CLIPTextModel, CLIP_L),)
    scheduler_config: ClassVar[dict[str, Any]] = SCHEDULER_SD
    example_source: ClassVar[str] = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    family_name: ClassVar[str] = "sd15"  # its name in safealign.families.FAMILIES

    def __init__(self, unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoders: Sequence[torch.nn.Module],
                 tokenizers: Sequence[CLIPTokenizer], scheduler_config: dict[str, Any], image_size: int = 0,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        # 0: the size the UNet was trained at (its sample_size times the VAE factor), as diffusers' pipelines do
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_size = int(image_size or unet.config.sample_size * factor or self.default_resolution)
        self.unet = _place(unet, self.device, dtype)
        # fp16 overflows in the SDXL VAE (force_upcast in its config): keep such a VAE in float32
        upcast = dtype == torch.float16 and bool(vae.config.get("force_upcast", False))
        self.vae_dtype = torch.float32 if upcast else dtype
        self.vae = _place(vae, self.device, self.vae_dtype)
        self.text_encoders = [_place(enc, self.device, dtype) for enc in text_encoders]
        self.tokenizers = list(tokenizers)
        self.scheduler = DDPMScheduler.from_config(scheduler_config)
        self._empty: Cond | None = None
        self.eval()

    # ------------------------------------------------------------------ build / load / save
    @classmethod
    def pipeline_class(cls) -> Any:
        import diffusers  # the pipeline modules pull in image processors: import them only when used

        return getattr(diffusers, cls.pipeline_name)

    @classmethod
    def text_encoder_names(cls) -> list[str]:
        """Names of the text encoders in a diffusers folder: text_encoder, text_encoder_2, ..."""
        return ["text_encoder" + ("" if i == 0 else f"_{i + 1}") for i in range(len(cls.text_configs))]

    @classmethod
    def tokenizer_names(cls) -> list[str]:
        return [n.replace("text_encoder", "tokenizer") for n in cls.text_encoder_names()]

    @classmethod
    def build_random(cls, size: Size = "tiny", seed: int = 0, device: str = "cpu",
                     dtype: str = "float32") -> StableDiffusionFamily:
        """The family's classes with random weights: the published configs, or shrunk ones (``size="tiny"``)."""
        torch.manual_seed(seed)
        tokenizers, encoders = [], []
        for enc_cls, cfg in cls.text_configs:
            tok = byte_tokenizer(cfg["max_position_embeddings"])
            cfg = shrink_text(cfg) if size == "tiny" else dict(cfg)
            cfg.update(vocab_size=max(cfg["vocab_size"] if size == "full" else 0, len(tok)),
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            tokenizers.append(tok)
            encoders.append(enc_cls(CLIPTextConfig(**cfg)))
        dims = [e.config.hidden_size for e in encoders]
        pooled = encoders[-1].config.projection_dim
        unet_cfg = shrink_unet(cls.unet_config, dims, pooled) if size == "tiny" else cls.unet_config
        vae_cfg = shrink_vae(cls.vae_config) if size == "tiny" else cls.vae_config
        resolution = TINY_RESOLUTION if size == "tiny" else cls.default_resolution
        return cls(UNet2DConditionModel(**unet_cfg), AutoencoderKL(**vae_cfg), encoders, tokenizers,
                   dict(cls.scheduler_config), resolution, device, DTYPES[dtype])

    @classmethod
    def build_tiny(cls, seed: int = 0, device: str = "cpu") -> StableDiffusionFamily:
        return cls.build_random("tiny", seed, device)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", dtype: str = "float32", resolution: int = 0,
             options: dict[str, Any] | None = None, **_: Any) -> StableDiffusionFamily:
        """Load a local diffusers folder or single-file ``.safetensors`` checkpoint (no download, no remote code).

        options: ``config`` (single file: a local diffusers folder with the configs and tokenizers),
        ``variant`` (e.g. "fp16" for ``*.fp16.safetensors``), ``prediction_type`` (override the scheduler's).
        """
        options = cls.check_options(options)
        path = Path(cls._require_path(str(path)))
        kw: dict[str, Any] = dict(dtype=DTYPES[dtype], local_files_only=True, **cls.pipeline_extras)
        try:
            if path.is_dir():
                pipe = cls.pipeline_class().from_pretrained(str(path), use_safetensors=True,
                                                          variant=options.get("variant"), **kw)
            else:
                pipe = cls.pipeline_class().from_single_file(str(path), config=options.get("config"), **kw)
        except (OSError, ValueError, SingleFileComponentError) as e:
            raise MissingWeights(f"model.path={path}: could not load a {cls.__name__} pipeline offline ({e}). "
                                 + cls._what_to_put()) from None
        sched = dict(pipe.scheduler.config)
        if "prediction_type" in options:
            sched["prediction_type"] = options["prediction_type"]
        parts = pipe.components
        encoders = [parts[n] for n in cls.text_encoder_names()]
        tokenizers = [parts[n] for n in cls.tokenizer_names()]
        return cls(parts["unet"], parts["vae"], encoders, tokenizers, sched, resolution, device, DTYPES[dtype])

    @classmethod
    def prepare_base(cls, params: Any, out: Path, plots: Path, device: str) -> dict[str, Any]:
        """The `base` stage: check the local weights (files, variant, tokenizers against their text encoders),
        record their hashes in ``out/weights.json``, and render a sample grid of ``SAMPLE_PROMPTS`` into
        ``plots/base_samples.png`` (every family writes one)."""
        from safealign.core.io import write_json
        from safealign.evaluation.grids import save_grid

        m, s = params.model, params.sampling
        hashes = cls.check_weights(m)
        fam = cls.load(m.path, device, m.dtype, m.resolution, m.options)
        tokenizers = fam.check_tokenizers()
        seeds = list(range(len(SAMPLE_PROMPTS)))
        with torch.no_grad():
            images = fam.render(SAMPLE_PROMPTS, seeds, s.steps, s.guidance, s.batch_size, progress=True)
        save_grid(Path(plots) / "base_samples.png", ["sample"], [[img] for img in images], list(SAMPLE_PROMPTS))
        record = {"family": m.family, "path": str(m.path), "sha256": hashes}
        write_json(Path(out) / "weights.json", record)
        return {**record, "files": len(hashes), "resolution": fam.image_size, "prediction_type": fam.prediction_type,
                "dtype": m.dtype, "variant": m.options.get("variant"), "tokenizers": tokenizers,
                "samples": len(images), "protocol": {"steps": s.steps, "guidance": s.guidance, "sampler": "ddim"}}

    @classmethod
    def from_params(cls, params: Any, base: Path, device: str) -> StableDiffusionFamily:
        m = params.model
        record = Path(base) / "weights.json"
        if record.exists() and json.loads(record.read_text()).get("path") != str(m.path):
            raise MissingWeights(f"model.path={m.path} differs from the checked weights in {record}; "
                                 "run `dvc repro base` again")
        return cls.load(m.path, device, m.dtype, m.resolution, m.options)

    def pipeline(self, scheduler: Any = None) -> Any:
        """The matching diffusers pipeline over this family's own modules (shared, not copied)."""
        parts: dict[str, Any] = dict(zip(self.text_encoder_names(), self.text_encoders, strict=True))
        parts.update(zip(self.tokenizer_names(), self.tokenizers, strict=True))
        sched = scheduler or DDIMScheduler.from_config(self.scheduler.config, timestep_spacing="trailing")
        return self.pipeline_class()(unet=self.unet, vae=self.vae, scheduler=sched, **parts, **self.pipeline_extras)

    def save_components(self, folder: Path) -> None:
        """Write a diffusers folder (safetensors) that ``load`` reads back."""
        self.pipeline(self.scheduler).save_pretrained(str(folder), safe_serialization=True)

    def eval(self) -> None:
        for m in (self.unet, self.vae, *self.text_encoders):
            m.eval()
        for m in (self.vae, *self.text_encoders):
            m.requires_grad_(False)
        self._empty = None

    # ------------------------------------------------------------------ weights check (the `base` stage)
    @classmethod
    def check_weights(cls, model: Any) -> dict[str, str]:
        """Check that ``model.path`` holds this family's weights; returns {relative file: sha256}.

        ``model`` is the ``model`` section of params (``path``, ``options``). Raises ``MissingWeights`` naming
        ``model.path`` and what to put there when the files are absent, or pickle-only.
        """
        options = cls.check_options(getattr(model, "options", {}))
        path = Path(cls._require_path(model.path))
        if path.is_file():
            if path.suffix != ".safetensors":
                raise MissingWeights(f"model.path={path}: only .safetensors checkpoints load (pickle-based "
                                     f"{path.suffix} files are refused). " + cls._what_to_put())
            hashes = {path.name: file_sha256(path)}
            if options.get("config"):
                cfg = Path(options["config"])
                if not (cfg / "model_index.json").exists():
                    raise MissingWeights(f"model.options.config={cfg}: no model_index.json; put there the "
                                         f"configs and tokenizer(s) of {cls.example_source} (no weights needed)")
                hashes.update({f"config/{k}": v for k, v in _hash_files(cfg, cfg).items()})
            return hashes
        index = path / "model_index.json"
        if not index.exists():
            raise MissingWeights(f"model.path={path}: no model_index.json, so not a diffusers folder. "
                                 + cls._what_to_put())
        declared = json.loads(index.read_text())
        if declared.get("_class_name") != cls.pipeline_name:
            raise MissingWeights(f"model.path={path}: holds a {declared.get('_class_name')}, not the "
                                 f"{cls.pipeline_name} this family loads. " + cls._what_to_put())
        names = ["unet", "vae", *cls.text_encoder_names(), *cls.tokenizer_names(), "scheduler"]
        for name in names:
            sub = path / name
            if name not in declared or not sub.is_dir():
                raise MissingWeights(f"model.path={path}: lacks {name}/ ({cls.__name__} needs "
                                     f"{', '.join(names)}). " + cls._what_to_put())
            if name.startswith(("unet", "vae", "text_encoder")):
                cls._check_variant(path, sub, options.get("variant"))
        return _hash_files(path, path)

    @classmethod
    def _check_variant(cls, path: Path, sub: Path, variant: str | None) -> None:
        """``sub`` holds .safetensors weights of the variant asked for (``model.options.variant``, None = plain)."""
        found = sorted(p.name for p in sub.iterdir()) or ["nothing"]
        variants = {weight_variant(p.name) for p in sub.glob("*.safetensors")}
        if not variants:
            raise MissingWeights(f"model.path={path}: {sub.name}/ has no .safetensors weights (found "
                                 f"{', '.join(found)}); pickle-based .bin/.ckpt weights are refused. "
                                 + cls._what_to_put())
        if variant not in variants:
            named = sorted(v for v in variants if v)
            fix = (f"set model.options.variant (`-S '++model.options={{variant: {named[0]}}}'`)" if named and variant is None
                   else "remove model.options.variant (`-S '++model.options={}'`)" if None in variants
                   else f"set model.options.variant to one of: {', '.join(named)}")
            raise MissingWeights(f"model.path={path}: {sub.name}/ has no {variant or 'plain'} .safetensors weights "
                                 f"(found {', '.join(found)}); {fix}")

    def check_tokenizers(self) -> list[dict[str, Any]]:
        """Each tokenizer fits its text encoder: the same vocabulary size, its begin/end tokens in the vocabulary
        and distinct, and a test prompt that survives tokenize -> decode. A tokenizer folder with only its
        config loads as a 2-token tokenizer that maps every prompt to the same ids: this catches it.
        Returns one record per tokenizer (for metrics/base.json); raises MissingWeights naming the folder."""
        records = []
        for name, tok, enc in zip(self.tokenizer_names(), self.tokenizers, self.text_encoders, strict=True):
            where = f"model.path: {name}/"
            vocab, expected = len(tok), int(enc.config.vocab_size)
            if vocab != expected:
                raise MissingWeights(f"{where} has {vocab} tokens but its text encoder embeds {expected}; the "
                                     f"tokenizer files (vocab.json, merges.txt) are missing or belong to another "
                                     f"model. Copy {name}/ of {self.example_source}")
            specials = {"bos": tok.bos_token_id, "eos": tok.eos_token_id}
            in_vocab = all(i is not None and 0 <= i < expected for i in specials.values())
            if not in_vocab or specials["bos"] == specials["eos"]:
                raise MissingWeights(f"{where} special tokens {specials} are not distinct ids of its {expected}-token "
                                     f"vocabulary; copy {name}/ of {self.example_source}")
            ids = tok(TOKENIZER_PROBE).input_ids
            decoded = tok.decode(ids, skip_special_tokens=True)
            if "".join(decoded.split()) != "".join(TOKENIZER_PROBE.lower().split()) or ids[0] != specials["bos"]:
                raise MissingWeights(f"{where} does not round-trip the test prompt {TOKENIZER_PROBE!r} (decoded: "
                                     f"{decoded!r}); copy {name}/ of {self.example_source}")
            records.append({"name": name, "vocab": vocab, "bos": specials["bos"], "eos": specials["eos"],
                            "max_length": int(tok.model_max_length)})
        return records

    option_keys: ClassVar[tuple[str, ...]] = ("config", "variant", "prediction_type")

    @classmethod
    def check_options(cls, options: dict[str, Any] | None) -> dict[str, Any]:
        """``model.options``, validated by the family that owns them: unknown keys are named with the allowed."""
        options = dict(options or {})
        unknown = sorted(set(options) - set(cls.option_keys))
        if unknown:
            raise ParamsError(f"params.yaml: model.options.{unknown[0]}: unknown key for family "
                              f"{cls.family_name!r}; allowed: {', '.join(cls.option_keys)}")
        return options

    @classmethod
    def _require_path(cls, path: str) -> str:
        if not path:
            raise MissingWeights("model.path is empty. " + cls._what_to_put())
        if not Path(path).exists():
            raise MissingWeights(f"model.path={path}: not found. " + cls._what_to_put())
        return path

    @classmethod
    def _what_to_put(cls) -> str:
        name = cls.family_name
        names = ("unet", "vae", *cls.text_encoder_names(), *cls.tokenizer_names(), "scheduler")
        folders = ", ".join(f"{n}/" for n in names)
        return (f"Set model.path to a local diffusers folder of {cls.example_source} (model_index.json, {folders} "
                "with .safetensors weights) or to a single-file .safetensors checkpoint (then model.options.config "
                f"names a local folder with its configs and tokenizers): `dvc exp run -S model.family={name} "
                "-S model.path=/path/to/weights`.")

    # ------------------------------------------------------------------ LoRA
    def add_lora(self, rank: int, alpha: float, targets: Sequence[str], init: str = "gaussian",
                 name: str = "default") -> None:
        super().add_lora(rank, alpha, targets, init, name)
        self._tuner_layers: list[Any] | None = None

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """As ``Family.adapters_disabled``, through the adapted layers only (cached): diffusers' toggle walks all
        ~2,000 modules of an SD UNet twice per DPO step, which costs as much as the VAE encode at tiny size."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        if getattr(self, "_tuner_layers", None) is None:
            self._tuner_layers = [m for m in self.raw_unet.modules() if isinstance(m, BaseTunerLayer)]
        for layer in self._tuner_layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in self._tuner_layers:
                layer.enable_adapters(True)

    # ------------------------------------------------------------------ encoding
    def tokenize(self, tokenizer: CLIPTokenizer, prompts: Sequence[str]) -> torch.Tensor:
        ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        return ids.to(self.device)

    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        ids = self.tokenize(self.tokenizers[0], prompts)
        return {"encoder_hidden_states": self.text_encoders[0](ids)[0]}  # (N, 77, D): last hidden states

    def empty_cond(self, n: int) -> Cond:
        if self._empty is None:
            with torch.no_grad():
                self._empty = self.encode_prompts([""])
        return {k: v.expand(n, *v.shape[1:]) for k, v in self._empty.items()}

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> (N, 4, H/8, W/8): the mean of the VAE posterior, scaled (and shifted)."""
        x = images.to(self.device, self.vae_dtype) * 2 - 1
        z = self.vae.encode(x).latent_dist.mode()
        shift = self.vae.config.get("shift_factor") or 0.0
        return ((z - shift) * self.vae.config.scaling_factor).to(self.dtype)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        shift = self.vae.config.get("shift_factor") or 0.0
        z = x0.to(self.vae_dtype) / self.vae.config.scaling_factor + shift
        return (self.vae.decode(z).sample.float() + 1) / 2

    def latent_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


class SD15Family(StableDiffusionFamily):
    """Stable Diffusion 1.5: epsilon prediction, 512 px."""


class SD21Family(StableDiffusionFamily):
    """Stable Diffusion 2.1: v-prediction (the DPO target is the scheduler's velocity), OpenCLIP-H text, 768 px."""

    default_resolution = 768
    unet_config = UNET_SD21
    text_configs = ((CLIPTextModel, OPENCLIP_H),)
    scheduler_config = dict(SCHEDULER_SD, prediction_type="v_prediction")
    example_source = "stabilityai/stable-diffusion-2-1"
    family_name = "sd21"


class SDXLFamily(StableDiffusionFamily):
    """SDXL base: CLIP-L and OpenCLIP-bigG penultimate states concatenated, pooled embeds and time ids, 1024 px."""

    pipeline_name = "StableDiffusionXLPipeline"
    pipeline_extras: ClassVar[dict[str, Any]] = {}
    default_resolution = 1024
    unet_config = UNET_SDXL
    vae_config = VAE_SDXL
    text_configs = ((CLIPTextModel, CLIP_L), (CLIPTextModelWithProjection, OPENCLIP_BIGG))
    example_source = "stabilityai/stable-diffusion-xl-base-1.0"
    family_name = "sdxl"
    zero_empty_prompt: bool = True  # SDXL's force_zeros_for_empty_prompt: the CFG negative is zeros

    @classmethod
    def load(cls, path: str | Path, *args: Any, **kwargs: Any) -> SDXLFamily:
        fam = super().load(path, *args, **kwargs)
        index = Path(path) / "model_index.json"
        if index.is_file():  # the pipeline's own setting (True for SDXL base)
            fam.zero_empty_prompt = bool(json.loads(index.read_text()).get("force_zeros_for_empty_prompt", True))
        return fam

    def time_ids(self, n: int) -> torch.Tensor:
        """(N, 6): original size, crop top-left, target size, all from the render resolution (no crop)."""
        s = float(self.image_size)
        return torch.tensor([s, s, 0.0, 0.0, s, s], device=self.device, dtype=self.dtype).expand(n, 6)

    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        states = []
        for tok, enc in zip(self.tokenizers, self.text_encoders, strict=True):
            out = enc(self.tokenize(tok, prompts), output_hidden_states=True)
            states.append(out.hidden_states[-2])  # penultimate layer, before the final layer norm
        pooled = out[0]  # (N, P): the projected pooled output of the last encoder
        return {"encoder_hidden_states": torch.cat(states, dim=-1), "text_embeds": pooled,
                "time_ids": self.time_ids(len(prompts))}

    def empty_cond(self, n: int) -> Cond:
        if self.zero_empty_prompt and self._empty is None:
            with torch.no_grad():
                self._empty = {k: torch.zeros_like(v) if k != "time_ids" else v
                               for k, v in self.encode_prompts([""]).items()}
        return super().empty_cond(n)
