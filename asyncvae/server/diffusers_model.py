"""Serving a real diffusers VAE: find it on disk, load the class its config names, on
the chosen device and dtype, and adapt it to :class:`~asyncvae.server.model.VAEModel`.

- ``--model`` is a VAE folder (``config.json`` + weights, the ``save_pretrained``
  layout) or a pipeline root (``model_index.json`` and a ``vae/`` subfolder).
- The class is ``config.json``'s ``_class_name`` (``AutoencoderKL``, ``AutoencoderTiny``,
  ``AutoencoderDC``, ``AutoencoderKLWan``, ``AutoencoderKLHunyuanVideo``,
  ``AutoencoderKLLTXVideo``, ``AutoencoderKLCogVideoX``, ... whatever the installed
  diffusers has). A model with 3-D convolutions is a *video* VAE: it decodes 5-D
  latents ``[B,C,T,h,w]`` itself; 4-D latents (and 4-D images to encode) go through it
  as one frame. A 2-D model decodes 5-D latents frame by frame (``F = T``).
- After loading, one tiny decode (a 4x4 latent; for video 1 and 3 latent frames)
  measures the spatial and temporal factors instead of trusting per-class attribute
  names, and proves the class works with this adapter: a class that doesn't is refused
  at start-up with a one-line error that names it.

Every failure is an :class:`~asyncvae.errors.InputError` with one line that says what
was wrong and what to do; the CLI prints it and exits 1.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from .config import DTYPE_ALIASES, check_device
from .model import BuiltinVAE, VAEModel

__all__ = ["DiffusersVAE", "ModelSource", "find_model", "load_model", "resolve_device", "resolve_dtype"]

#: Classes whose encode/decode keep no state between calls (safe to run from several
#: replica threads at once); every other class is called under a lock (Wan-style VAEs
#: keep a feature cache on the module during a call).
THREAD_SAFE_CLASSES = frozenset(
    {"AutoencoderKL", "AutoencoderTiny", "AutoencoderDC", "AsymmetricAutoencoderKL", "AutoencoderKLFlux2"}
)
#: Classes known not to fit the protocol, with the reason.
UNSUPPORTED = {
    "AutoencoderKLTemporalDecoder": "its decode needs num_frames and 4-D per-frame latents (Stable Video Diffusion)",
    "AutoencoderOobleck": "it is an audio VAE",
    "AutoencoderKLLTX2Audio": "it is an audio VAE",
    "AutoencoderKLKVAEAudio": "it is an audio VAE",
    "AutoencoderKLMiniMaxH3Audio": "it is an audio VAE",
    "MMAudioVAE": "it is an audio VAE",
}
PROBE_SIZE = 4
DOWNLOAD_HINT = (
    "download one first, e.g. `huggingface-cli download stabilityai/sd-vae-ft-mse --local-dir DIR` "
    "(a pipeline: add `--include 'vae/*' model_index.json`)"
)


@dataclass(frozen=True)
class ModelSource:
    """Where a VAE lives on disk and which diffusers class its config names."""

    #: The folder holding the VAE's ``config.json`` and weights.
    folder: Path
    #: ``_class_name`` from that ``config.json``.
    class_name: str
    #: The parsed ``config.json``.
    config: dict[str, Any]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"--model: cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise InputError(f"--model: {path} is not a JSON object")
    return data


def find_model(spec: str | Path) -> ModelSource:
    """Resolve ``--model``: a VAE folder, or a pipeline root whose ``vae/`` is used.

    Reads only JSON (fast, no weights); raises :class:`InputError` with the fix.
    """
    root = Path(spec).expanduser()
    if not root.exists():
        raise InputError(
            f"--model {str(spec)!r} is neither 'builtin' nor an existing local folder; {DOWNLOAD_HINT}"
        )
    if not root.is_dir():
        raise InputError(f"--model {str(spec)!r} is a file; pass the folder that holds config.json")
    folder = root
    if not (root / "config.json").is_file():
        if (root / "vae" / "config.json").is_file():
            folder = root / "vae"
        elif (root / "model_index.json").is_file():
            raise InputError(
                f"--model {str(spec)!r} is a pipeline root without a vae/ subfolder holding "
                "config.json; download the VAE too (`--include 'vae/*'`) or point --model at it"
            )
        else:
            raise InputError(
                f"--model {str(spec)!r} has no config.json (a diffusers VAE folder) and no "
                f"vae/config.json (a pipeline root); {DOWNLOAD_HINT}"
            )
    config = _read_json(folder / "config.json")
    name = config.get("_class_name")
    if not isinstance(name, str) or not name:
        raise InputError(
            f"--model: {folder / 'config.json'} names no _class_name; it is not a diffusers "
            "model saved with save_pretrained"
        )
    if name in UNSUPPORTED:
        raise InputError(f"--model: {name} is not supported by asyncvae serve: {UNSUPPORTED[name]}")
    return ModelSource(folder, name, config)


def _diffusers() -> Any:
    try:
        import diffusers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise InputError(f"--model needs diffusers: pip install diffusers ({e})") from None
    return diffusers


def model_class(source: ModelSource) -> Any:
    """The diffusers class ``source`` names (raises :class:`InputError` if it isn't one)."""
    diffusers = _diffusers()
    cls = getattr(diffusers, source.class_name, None)
    if cls is None:
        raise InputError(
            f"--model: {source.folder} holds a {source.class_name}, which diffusers "
            f"{diffusers.__version__} does not have; upgrade it: pip install -U diffusers"
        )
    if not (callable(getattr(cls, "encode", None)) and callable(getattr(cls, "decode", None))):
        raise InputError(
            f"--model: {source.folder} holds a {source.class_name}, not a VAE (no encode/decode); "
            "point --model at the pipeline root or its vae/ folder"
        )
    return cls


def resolve_device(device: str) -> torch.device:
    """``auto`` → cuda, else mps, else cpu; an unavailable device is an :class:`InputError`."""
    try:
        check_device(device)
    except ValueError as e:
        raise InputError(f"--device: {e}") from None
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(
                f"--device {device}: this torch ({torch.__version__}) sees no CUDA device; "
                "install a CUDA build of torch or use --device cpu"
            )
        index = int(device[5:]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise InputError(
                f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible "
                "(cuda:0 ...); check CUDA_VISIBLE_DEVICES"
            )
    if device == "mps" and not torch.backends.mps.is_available():
        raise InputError("--device mps: MPS is not available here; use --device cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``fp32``/``fp16``/``bf16`` (or their long names); ``auto`` → bfloat16 on CUDA
    with bf16 support, float16 on CUDA without it and on mps, float32 on cpu."""
    name = DTYPE_ALIASES.get(dtype)
    if name is None:
        raise InputError(f"--dtype {dtype!r}: use fp32, fp16, bf16 or auto")
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device.type == "mps" else torch.float32
    return getattr(torch, name)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


class DiffusersVAE(VAEModel):
    """A diffusers VAE (any class :func:`find_model` accepts) behind the server's model
    interface.

    ``path`` is a VAE folder or a pipeline root; ``device``/``dtype`` as ``--device``/
    ``--dtype``; ``tiling``/``slicing`` call ``enable_tiling()``/``enable_slicing()``.
    Encoding takes the mode of the latent distribution (deterministic); decoding
    clamps to [-1, 1]. Inputs and outputs are float32 CPU tensors; the forward pass
    runs on ``device`` in ``dtype`` under ``torch.inference_mode()``.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        device: str = "auto",
        dtype: str = "auto",
        tiling: bool = False,
        slicing: bool = False,
    ) -> None:
        source = find_model(path)
        cls = model_class(source)
        self.path = str(path)
        self.source = source
        self.class_name = source.class_name
        self.device = resolve_device(device)
        self.torch_dtype = resolve_dtype(dtype, self.device)
        try:
            vae = cls.from_pretrained(str(source.folder), torch_dtype=self.torch_dtype)
            vae = vae.to(self.device)
        except Exception as e:
            raise InputError(
                f"--model: could not load {source.class_name} from {source.folder} ({_first_line(e)}); "
                "check that the weights are complete (config.json + diffusion_pytorch_model.safetensors)"
            ) from None
        vae.eval()
        self.vae: Any = vae
        for flag, method in ((tiling, "enable_tiling"), (slicing, "enable_slicing")):
            if flag:
                try:
                    getattr(vae, method)()
                except (AttributeError, NotImplementedError):
                    raise InputError(
                        f"--{method[7:]}: {source.class_name} has no {method}(); run without --{method[7:]}"
                    ) from None
        cfg = vae.config
        channels = getattr(cfg, "latent_channels", None) or getattr(cfg, "z_dim", None)
        if not channels:
            raise InputError(
                f"--model: {source.class_name}'s config has neither latent_channels nor z_dim; "
                "this class is not supported by asyncvae serve"
            )
        self.latent_channels = int(channels)
        self.scaling_factor = float(getattr(cfg, "scaling_factor", None) or 1.0)
        self.shift_factor = float(getattr(cfg, "shift_factor", None) or 0.0)
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        self._mean_std = (
            (torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32))
            if mean is not None and std is not None and len(mean) == len(std) == self.latent_channels
            else None
        )
        self.video = any(isinstance(m, torch.nn.Conv3d) for m in vae.modules())
        self._temb = bool(getattr(cfg, "timestep_conditioning", False)) and (
            "temb" in inspect.signature(vae.decode).parameters
        )
        self.thread_safe = source.class_name in THREAD_SAFE_CLASSES
        where = f"{self.device}, {str(self.torch_dtype).rsplit('.', 1)[-1]}"
        label = source.folder.name
        if label == "vae":  # a pipeline root: name the pipeline
            label = f"{source.folder.parent.name}/vae"
        self.name = f"diffusers:{source.class_name}:{label} ({where})"
        self._probe()

    # ---- load-time checks
    def _probe(self) -> None:
        """Decode a tiny zero latent to measure the spatial and temporal factors."""
        s = PROBE_SIZE
        shape = [1, self.latent_channels, s, s]
        try:
            if self.video:  # 1 and 3 latent frames: some VAEs treat even counts specially
                one = self._decode_raw(torch.zeros(1, self.latent_channels, 1, s, s))
                shape = [1, self.latent_channels, 3, s, s]
                three = self._decode_raw(torch.zeros(*shape))
                self.temporal_factor = max(1, (int(three.shape[2]) - int(one.shape[2])) // 2)
                self._first_frames = int(one.shape[2])
                side = int(one.shape[-1])
            else:
                out = self._decode_raw(torch.zeros(*shape))
                self.temporal_factor = 1
                self._first_frames = 1
                side = int(out.shape[-1])
        except Exception as e:
            raise InputError(
                f"--model: {self.class_name} loaded, but a test decode of a {shape} latent failed "
                f"({_first_line(e)}); asyncvae serve supports diffusers VAEs whose decode(z).sample "
                "maps [B,C,h,w] or [B,C,T,h,w] latents to pixels"
            ) from None
        if side % s or side < s:
            raise InputError(
                f"--model: {self.class_name} decoded a {s}x{s} latent to width {side}, not a whole "
                "multiple; this class is not supported by asyncvae serve"
            )
        self.spatial_factor = side // s

    def decoded_frames(self, latent_frames: int) -> int:
        """Frames ``latent_frames`` decode to (measured at load; 2-D models: one per latent frame)."""
        if not self.video:
            return latent_frames
        return self._first_frames + (latent_frames - 1) * self.temporal_factor

    def unscale(self, latents: torch.Tensor, shift_factor: float | None = None) -> torch.Tensor:
        """Default un-scaling: per-channel ``latents * std / scaling_factor + mean`` when the
        config has ``latents_mean``/``latents_std`` (Wan, Mochi, ...), else
        ``latents / scaling_factor + shift``."""
        if self._mean_std is None:
            return super().unscale(latents, shift_factor)
        mean, std = self._mean_std
        view = (1, -1) + (1,) * (latents.dim() - 2)
        return latents * std.view(view) / self.scaling_factor + mean.view(view)

    # ---- the forward passes
    def _to_model(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(device=self.device, dtype=self.torch_dtype)

    @staticmethod
    def _sample(out: Any) -> torch.Tensor:
        if isinstance(out, torch.Tensor):
            return out
        if hasattr(out, "sample"):
            return out.sample
        return out[0]

    @staticmethod
    def _latent(out: Any) -> torch.Tensor:
        if isinstance(out, torch.Tensor):
            return out
        for attr in ("latent_dist", "latents", "latent"):
            v = getattr(out, attr, None)
            if v is not None:
                return v.mode() if attr == "latent_dist" else v
        first = out[0]
        return first.mode() if hasattr(first, "mode") else first

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        # thread_safe=False models are serialised by the server (ServerState), not here
        with torch.inference_mode():
            return fn(*args, **kwargs)

    def _decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        kwargs: dict[str, Any] = {}
        if self._temb:
            kwargs["temb"] = torch.zeros(z.shape[0], device=self.device, dtype=self.torch_dtype)
        out = self._call(self.vae.decode, self._to_model(z), **kwargs)
        return self._sample(out).float().clamp(-1.0, 1.0).cpu().contiguous()

    def _encode_raw(self, x: torch.Tensor) -> torch.Tensor:
        out = self._call(self.vae.encode, self._to_model(x))
        return self._latent(out).float().cpu().contiguous()

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B,3,H,W]`` → latents ``[B,C,h,w]`` (video models: as one frame)."""
        if self.video:
            return self._encode_raw(images.unsqueeze(2)).squeeze(2)
        return self._encode_raw(images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``[B,C,h,w]`` → images ``[B,3,H,W]`` (video models: as one frame)."""
        if self.video:
            return self._decode_raw(latents.unsqueeze(2)).squeeze(2)
        return self._decode_raw(latents)

    def decode_video(self, latents: torch.Tensor) -> torch.Tensor:
        """``[B,C,T,h,w]`` → ``[B,3,F,H,W]``: by the video VAE itself, or frame by frame
        with a 2-D model (``F = T``)."""
        if self.video:
            return self._decode_raw(latents)
        b, c, t, h, w = latents.shape
        frames = self._decode_raw(latents.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
        _, ch, hh, ww = frames.shape
        return frames.reshape(b, t, ch, hh, ww).permute(0, 2, 1, 3, 4).contiguous()

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """``[B,3,F,H,W]`` → ``[B,C,T,h,w]``: by the video VAE, or frame by frame (``T = F``)."""
        if self.video:
            return self._encode_raw(video)
        b, c, f, h, w = video.shape
        z = self._encode_raw(video.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w))
        _, zc, zh, zw = z.shape
        return z.reshape(b, f, zc, zh, zw).permute(0, 2, 1, 3, 4).contiguous()

    def check_video_frames(self, frames: int) -> None:
        """Video VAEs take ``first + k * temporal_factor`` frames; 2-D models any count."""
        if not self.video:
            return
        tf, first = self.temporal_factor, self._first_frames
        if frames < first or (frames - first) % tf:
            raise InputError(
                f"this endpoint's {self.class_name} encodes {first} + k*{tf} frames "
                f"({first}, {first + tf}, {first + 2 * tf}, ...), got {frames}; trim the clip"
            )


def load_model(
    spec: str | None,
    latent_channels: int = 4,
    *,
    device: str = "auto",
    dtype: str = "auto",
    tiling: bool = False,
    slicing: bool = False,
) -> VAEModel:
    """``"builtin"`` (or None) → :class:`BuiltinVAE` with ``latent_channels``; anything
    else is a local diffusers VAE folder or pipeline root → :class:`DiffusersVAE`."""
    if spec is None or spec == "builtin":
        return BuiltinVAE(latent_channels=latent_channels)
    return DiffusersVAE(spec, device=device, dtype=dtype, tiling=tiling, slicing=slicing)
